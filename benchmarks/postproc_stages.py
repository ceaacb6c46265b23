"""Throughput of each post-processing stage, in frames per second per CPU core.

The clip: 121 frames of 768x512 (LTX-Video's default output) of a textured
scene panning slowly with a textured object crossing it, so optical flow has
real work to do. The process is pinned to one CPU and OpenCV and torch use
one thread, so the numbers are per core: a post-processing replica with N
cores handles about N times as many frames, chunk by chunk.

Stages: interpolate 2x (optical flow), upscale 2x (Lanczos), color match
(clip statistics + one Lab transform), quality scores, encode H.264 (whole
clip, and as 4 segments + remux concatenation).

Run: .venv/bin/python benchmarks/postproc_stages.py [--frames 121] [--width 768] [--height 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np
import torch

from farm.postproc.chunks import plan_chunks
from farm.postproc.color import ColorStats, lab_statistics, match_color
from farm.postproc.encode import encode_mp4, probe_mp4
from farm.postproc.interpolate import interpolate
from farm.postproc.quality import quality_scores
from farm.postproc.segments import concat_segments, encode_segment
from farm.postproc.upscale import upscale

FPS = 24


def synthetic_clip(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A multi-scale color texture panning 2 px/frame, and a textured square
    crossing it at 6 px/frame."""
    rng = np.random.default_rng(seed)

    def texture(rows: int, columns: int) -> np.ndarray:
        layers = [
            cv2.GaussianBlur(rng.normal(size=(rows, columns, 3)).astype(np.float32), (0, 0), sigma) * sigma**0.8
            for sigma in (2.0, 6.0, 16.0)
        ]
        combined = sum(layers)
        return (combined - combined.mean()) / combined.std()

    world = 115 + 35 * texture(height, width + 2 * count)
    side = height // 4
    square = 160 + 50 * texture(side, side)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        frame = world[:, 2 * index : 2 * index + width].copy()
        left = (40 + 6 * index) % (width - side)
        top = height // 3
        frame[top : top + side, left : left + side] = square
        frames[index] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames


def timed(function, *args, **kwargs):
    """(result, (wall seconds, CPU seconds)). On a pinned process CPU time is the
    core's work, unaffected by other processes queueing for the same core."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, (time.perf_counter() - started, time.process_time() - started_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=512)
    arguments = parser.parse_args()

    # Per-core numbers: one CPU for the whole process (libx264 threads included), one thread for the libraries.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    frames = synthetic_clip(arguments.frames, arguments.height, arguments.width)
    count = len(frames)
    print(
        f"{count} frames of {arguments.width}x{arguments.height}, one core; "
        f"{platform.processor() or platform.machine()}, OpenCV {cv2.__version__}, numpy {np.__version__}"
    )

    rows = []
    interpolated, seconds = timed(interpolate, frames, 2)
    rows.append(("interpolate 2x (DIS flow)", seconds, len(interpolated)))
    upscaled, seconds = timed(upscale, frames, 2)
    rows.append(("upscale 2x (Lanczos)", seconds, len(upscaled)))
    reference = ColorStats(mean=(55.0, 2.0, -6.0), std=(18.0, 9.0, 12.0), pixels=1)
    matched, seconds = timed(lambda: match_color(frames, reference, source=lab_statistics(frames)))
    rows.append(("color match (stats + transform)", seconds, len(matched)))
    scores, seconds = timed(quality_scores, frames)
    rows.append(("quality scores", seconds, count))
    video, seconds = timed(encode_mp4, frames, FPS)
    rows.append(("encode H.264 (whole clip)", seconds, count))

    def encode_segments() -> list[bytes]:
        return [encode_segment(frames[chunk.frames], FPS, chunk.start) for chunk in plan_chunks(count, 32, overlap=0)]

    joined, seconds = timed(lambda: concat_segments(encode_segments(), FPS))
    rows.append(("encode 4 segments + concat", seconds, count))
    segments = encode_segments()
    _, seconds = timed(concat_segments, segments, FPS)
    rows.append(("  of which concat (remux)", seconds, count))

    print()
    # Rates from CPU seconds: frames per second of one core's work.
    print(f"{'stage':34s} {'wall s':>7s} {'CPU s':>7s} {'in frames/s':>12s} {'out frames':>11s} {'out frames/s':>13s}")
    for name, (wall, cpu), produced in rows:
        print(f"{name:34s} {wall:7.2f} {cpu:7.2f} {count / cpu:12.1f} {produced:11d} {produced / cpu:13.1f}")

    probe = probe_mp4(joined)
    print()
    print(
        f"segments joined: {probe['frames']} frames, {probe['fps']} fps, {probe['duration_s']:.3f} s "
        f"({len(joined) / 1e6:.2f} MB; whole-clip encode {len(video) / 1e6:.2f} MB)"
    )
    print(
        f"quality of the synthetic clip: consistency {scores.temporal_consistency:.2f}, flicker "
        f"{scores.flicker:.2f}, smoothness {scores.motion_smoothness:.2f}, frozen {scores.frozen}"
    )


if __name__ == "__main__":
    main()
