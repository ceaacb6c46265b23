"""Post-processing of rendered frames, as functions over uint8 (F, H, W, 3) arrays:
frame interpolation, upscaling, color harmonization, quality scores, chunk planning
for frame-parallel work, and H.264 encoding (whole clips or segments joined without
re-encoding)."""
