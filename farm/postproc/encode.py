"""H.264 MP4 encoding with PyAV."""

from __future__ import annotations

import fractions
import io

import numpy as np


def check_frames(frames: np.ndarray) -> None:
    """Raises ValueError unless frames is what every post-processing stage takes:
    a uint8 numpy array (F, H, W, 3), RGB."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        described = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {described}")


def frame_rate(fps: int | float | fractions.Fraction) -> fractions.Fraction:
    """fps as an exact fraction: 24 -> 24, 29.97002997 -> 30000/1001 (floats are
    read as the nearest fraction with a denominator of at most 1001)."""
    rate = fractions.Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encodes uint8 frames (F, H, W, 3) as H.264 in MP4, one frame per 1/fps s.
    Width and height must be even (yuv420p); every model's size multiple is."""
    return encode_h264_mp4(frames, fps, start_frame=0, crf=crf, preset=preset)


def encode_h264_mp4(
    frames: np.ndarray,
    fps: int | float | fractions.Fraction,
    *,
    start_frame: int = 0,
    crf: int | None = 18,
    preset: str = "veryfast",
    bitrate_kbps: int | None = None,
    threads: int | None = None,
) -> bytes:
    """Encodes uint8 frames (F, H, W, 3) as H.264 (yuv420p) in MP4, frame i with
    pts start_frame + i in time base 1/fps. The stream starts with an IDR
    frame and has no B-frames, so every GOP is closed and decode order is
    presentation order (what joining segments without re-encoding needs).

    Rate control: constant quality ``crf`` (0..51, lower is better), or with
    ``bitrate_kbps`` an average bitrate instead (crf is then ignored).
    threads: x264's threads; None lets x264 choose (about 1.5 per core), 1 keeps
    the encoder on one core (a post-processing replica's share)."""
    import av

    check_frames(frames)
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 in yuv420p needs even sizes, got {width}x{height}")
    rate = frame_rate(fps)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = 1 / rate
        # No B-frame reordering surprises for players; closed GOPs. (One dict: in PyAV
        # stream.options and codec_context.options are the same, and assigning either
        # replaces the other.)
        options = {"preset": preset, "bf": "0", "flags": "+cgop"}
        if bitrate_kbps is not None:
            # Average bitrate: x264's ABR mode over the whole stream (or segment).
            stream.bit_rate = int(bitrate_kbps) * 1000
        else:
            # CRF keeps quality, not bitrate, fixed.
            options["crf"] = str(18 if crf is None else crf)
        stream.options = options
        if threads is not None:
            stream.codec_context.thread_count = int(threads)
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            frame.pts = start_frame + index
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
