"""H.264 MP4 encoding with PyAV."""

from __future__ import annotations

import fractions
import io

import numpy as np


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encodes uint8 frames (F, H, W, 3) as H.264 in MP4, one frame per 1/fps s.
    Width and height must be even (yuv420p); every model's size multiple is."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 in yuv420p needs even sizes, got {width}x{height}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = fractions.Fraction(1, fps)
        # No B-frame reordering surprises for players; CRF keeps quality, not bitrate, fixed.
        stream.options = {"crf": str(crf), "preset": preset, "movflags": "+faststart"}
        stream.codec_context.options = {"bf": "0"}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def probe_mp4(data: bytes) -> dict:
    """Decodes an MP4 fully and reports what a player would see."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "frames": len(frames),
            "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
            "pixels": np.stack(frames) if frames else None,
        }
