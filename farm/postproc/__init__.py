"""Post-processing of rendered frames: encoding now; interpolation, upscaling,
color and quality scores build on it."""
