"""Encoding a clip in parallel segments and joining them without re-encoding.

Each replica encodes its run of frames as a self-contained H.264 MP4 segment
(``encode_segment``): it starts with an IDR frame, has no B-frames (closed
GOPs, decode order = presentation order) and its timestamps start at the
segment's first frame index, so a segment says where it belongs.
``concat_segments`` then remuxes the compressed packets of all segments into
one MP4 (PyAV demux -> mux, no decoding) with timestamps rewritten to run
0, 1, 2, ... frames without gaps, so the result has exactly the total frame
count, the frame rate and the duration of the whole clip.

Remuxing is valid because every segment comes from the same encoder settings
at the same size, so their sequence and picture parameter sets (the MP4's
avcC, stored once per file) are identical; ``concat_segments`` checks this and
refuses segments whose parameters differ rather than writing a file that
decodes wrongly.
"""

from __future__ import annotations

import fractions
import io
from collections.abc import Sequence

import numpy as np

from farm.postproc.encode import encode_h264_mp4, frame_rate


def encode_segment(
    frames: np.ndarray,
    fps: int | float | fractions.Fraction,
    start_frame: int,
    *,
    crf: int | None = 18,
    preset: str = "veryfast",
    bitrate_kbps: int | None = None,
    threads: int | None = None,
) -> bytes:
    """H.264 MP4 segment of uint8 frames (F, H, W, 3) whose frame i has pts
    start_frame + i (time base 1/fps). Segments of one clip must share fps,
    size and encoder settings (crf or bitrate, preset) to be joined by ``concat_segments``. (The MP4 edit
    list that places a segment at start_frame is stored in milliseconds, so a
    segment on its own may report its start rounded to 1 ms.)"""
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if len(frames) == 0:
        raise ValueError("a segment needs at least one frame")
    return encode_h264_mp4(frames, fps, start_frame=start_frame, crf=crf, preset=preset,
                           bitrate_kbps=bitrate_kbps, threads=threads)


def concat_segments(segments: Sequence[bytes], fps: int | float | fractions.Fraction) -> bytes:
    """Joins H.264 MP4 segments, in the order given, into one MP4 without
    re-encoding. Frame k of the result (counting across segments) gets pts =
    dts = k in time base 1/fps and lasts one frame, whatever timestamps the
    segments had; so frames = sum of the segments' frames and duration =
    frames / fps. Raises ValueError for segments that cannot be joined
    losslessly (different codec parameters, not starting with a keyframe,
    B-frames or gaps in their timestamps)."""
    import av

    if not segments:
        raise ValueError("no segments to join")
    rate = frame_rate(fps)
    frame_time_base = 1 / rate
    output_buffer = io.BytesIO()
    with av.open(output_buffer, mode="w", format="mp4") as output:
        output_stream = None
        reference = None
        next_frame = 0
        for position, data in enumerate(segments):
            with av.open(io.BytesIO(data)) as segment:
                if not segment.streams.video:
                    raise ValueError(f"segment {position} has no video stream")
                stream = segment.streams.video[0]
                parameters = _codec_parameters(stream)
                if reference is None:
                    reference = parameters
                    output_stream = output.add_stream_from_template(stream)
                    output_stream.time_base = frame_time_base
                elif parameters != reference:
                    raise ValueError(
                        f"segment {position} was encoded with different parameters than segment 0 "
                        f"({_describe_difference(reference, parameters)}); encode all segments alike"
                    )
                packets = [packet for packet in segment.demux(stream) if packet.size > 0]
                frame_indices = _frame_indices(packets, stream.time_base, rate, position)
                for packet, index in zip(packets, frame_indices, strict=True):
                    packet.stream = output_stream
                    packet.time_base = frame_time_base
                    packet.pts = packet.dts = next_frame + index
                    packet.duration = 1
                    output.mux(packet)
                next_frame += len(packets)
    return output_buffer.getvalue()


def _frame_indices(packets, time_base: fractions.Fraction, rate: fractions.Fraction, position: int) -> list[int]:
    """Each packet's frame index within its segment (0, 1, 2, ...), from its pts.
    Checks what a lossless remux relies on: a keyframe first, decode order =
    presentation order (no B-frames) and one frame per frame interval."""
    if not packets:
        raise ValueError(f"segment {position} has no frames")
    if not packets[0].is_keyframe:
        raise ValueError(f"segment {position} does not start with a keyframe")
    if any(packet.pts is None for packet in packets):
        raise ValueError(f"segment {position} has packets without timestamps")
    # Rounded to whole frames: the segment's MP4 edit list may have shifted
    # its timestamps by a fraction of a frame (it is kept in milliseconds).
    positions = [round(packet.pts * time_base * rate) for packet in packets]
    indices = [value - positions[0] for value in positions]
    if indices != list(range(len(packets))):
        raise ValueError(
            f"segment {position} frames are not consecutive in decode order at {rate} fps "
            f"(frame offsets {indices[:8]}{'...' if len(indices) > 8 else ''}); B-frames or dropped frames?"
        )
    return indices


def _codec_parameters(stream) -> dict:
    context = stream.codec_context
    return {
        "codec": context.name,
        "width": context.width,
        "height": context.height,
        "pix_fmt": context.pix_fmt,
        "extradata": bytes(context.extradata or b""),
    }


def _describe_difference(reference: dict, parameters: dict) -> str:
    differing = [key for key in reference if reference[key] != parameters[key]]
    return ", ".join(
        f"{key}: {reference[key]!r} vs {parameters[key]!r}" if key != "extradata" else "SPS/PPS differ"
        for key in differing
    )
