"""Frame-parallel post-processing of one clip: the plan, the work of one chunk, and
the join.

A clip of F frames is cut into chunks of ``chunk_frames`` frames that share one
seam frame with their neighbours (``plan_chunks(F, chunk_frames, overlap=1)``), so
that every pair of neighbouring frames, which interpolation and the quality
measurements work on, lies inside exactly one chunk. Each chunk then runs, on
whichever worker takes it (a post-processing replica, or a thread here):

1. color matching with the clip-wide statistics (``ColorStats`` of every chunk's own
   frames, combined before any chunk is processed, so every chunk applies the same
   Lab transform and the clip does not flicker at the seams). It runs on the
   engine's frames, before interpolation and upscaling multiply the pixels: the
   transform is per pixel, and interpolated frames are blends of matched frames;
2. interpolation (optical flow, or a learned model when one is loaded);
3. quality measurements of its pairs (on the interpolated frames, before upscaling:
   the measurements analyse frames shrunk to 256 pixels anyway);
4. upscaling (Lanczos, or a learned super-resolution model);
5. the Lab statistics of its delivered frames (shrunk, cheap: what a later render
   may take as its color reference);
6. encoding of its frames, minus the seam frame it shares with the chunk before,
   as an H.264 segment whose timestamps start at its first frame's index in the
   joined clip.

``postprocess_clip`` joins the segments without re-encoding (``concat_segments``),
concatenates the pair measurements into the clip's quality scores, and checks that
the result has exactly ``(F - 1) * factor + 1`` frames. Workers are reached through
a ``ChunkRunner``: ``LocalChunkRunner`` runs chunks in threads of this process;
``farm.serve.postproc.ServeChunkRunner`` fans them out to the Serve deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from farm.domain.states import Stage
from farm.postproc.chunks import Chunk, plan_chunks
from farm.postproc.color import ColorStats, lab_statistics, match_color
from farm.postproc.interpolate import interpolate
from farm.postproc.quality import PairMeasurements, QualityScores, measure_pairs, score
from farm.postproc.segments import concat_segments, encode_segment
from farm.postproc.upscale import upscale

CPU = "CPU"
# Lab statistics (color references, and the clip statistics a color match starts
# from) are taken on frames shrunk to this longer side: the mean is unchanged and
# the std barely, at a fraction of the cost.
STATISTICS_MAX_SIDE = 256
# At most this many frames of an MP4 are decoded to take its statistics.
STATISTICS_MAX_FRAMES = 32
# Stages whose time is charged as encoding; the rest is post-processing.
ENCODING_STAGES = ("encode",)


@dataclasses.dataclass(frozen=True)
class ChunkWork:
    """What every chunk of one clip does (the same for all of them)."""

    interpolation_factor: int = 1
    upscale_factor: int = 1
    color_source: ColorStats | None = None
    """The whole clip's statistics; with color_reference, the chunk is matched to it."""
    color_reference: ColorStats | None = None
    color_strength: float = 1.0
    measure: bool = True
    """Measure the quality of the chunk's frame pairs."""
    statistics: bool = True
    """Take the Lab statistics of the delivered frames."""
    encode: bool = True
    fps: int = 24
    """Frame rate of the output (the engine's fps times the interpolation factor)."""
    crf: int | None = 18
    bitrate_kbps: int | None = None
    preset: str = "veryfast"
    threads: int = 1
    """Encoder threads (a replica's cores)."""
    return_frames: bool = False
    """Send the delivered frames back (tests and benchmarks; never a render)."""

    def seam_frames(self, chunk: Chunk) -> int:
        """Leading output frames of the chunk that the chunk before already delivers."""
        if chunk.leading_overlap == 0:
            return 0
        return (chunk.leading_overlap - 1) * self.interpolation_factor + 1


@dataclasses.dataclass
class ChunkResult:
    """What a worker sends back for one chunk."""

    index: int
    frames_out: int
    """Frames this chunk adds to the joined clip."""
    segment: bytes | None = None
    frames: np.ndarray | None = None
    measurements: PairMeasurements | None = None
    statistics: ColorStats | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall seconds by stage on the worker."""
    device_kind: str = CPU
    device_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Device-seconds by metering phase (POSTPROCESSING, ENCODING): for a CPU worker
    its seconds times the cores it holds."""
    worker: str = ""
    retries: int = 0
    """Times the chunk was sent again because its worker died."""


@dataclasses.dataclass
class StatisticsResult:
    index: int
    statistics: ColorStats
    seconds: float
    device_kind: str = CPU
    device_seconds: float = 0.0
    worker: str = ""
    retries: int = 0


def _timed(seconds: dict[str, float], stage: str, started: float) -> float:
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - started
    return now


def reference_statistics(frames: np.ndarray) -> ColorStats:
    """Lab statistics of frames shrunk to STATISTICS_MAX_SIDE (see that constant)."""
    count, height, width, _ = frames.shape
    shrink = min(1.0, STATISTICS_MAX_SIDE / max(height, width))
    if shrink < 1.0:
        size = (max(2, round(width * shrink)), max(2, round(height * shrink)))
        frames = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])
    return lab_statistics(frames)


def chunk_statistics(frames: np.ndarray, chunk: Chunk, index: int = 0) -> StatisticsResult:
    """The statistics of a chunk's own frames (its leading seam frame belongs to the
    chunk before), for combining into the clip's."""
    started = time.perf_counter()
    stats = reference_statistics(frames[chunk.leading_overlap:])
    return StatisticsResult(index=index, statistics=stats, seconds=time.perf_counter() - started)


def process_chunk(frames: np.ndarray, chunk: Chunk, work: ChunkWork, index: int = 0, *,
                  upscaler=None, interpolator=None) -> ChunkResult:
    """Runs every stage of ``work`` on one chunk's frames (``clip[chunk.frames]``).
    upscaler / interpolator: learned models with ``upscale(frames, factor)`` /
    ``interpolate(frames, factor)``; None uses Lanczos / optical flow."""
    if len(frames) != chunk.size:
        raise ValueError(f"chunk {index} covers {chunk.size} frames but got {len(frames)}")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    output = frames
    if work.color_reference is not None:
        output = match_color(output, work.color_reference, work.color_strength, source=work.color_source)
        started = _timed(seconds, "color", started)
    if work.interpolation_factor > 1:
        output = (interpolator.interpolate(output, work.interpolation_factor) if interpolator is not None
                  else interpolate(output, work.interpolation_factor))
        started = _timed(seconds, "interpolate", started)
    measurements = None
    if work.measure:
        measurements = measure_pairs(output)
        started = _timed(seconds, "quality", started)
    if work.upscale_factor > 1:
        output = (upscaler.upscale(output, work.upscale_factor) if upscaler is not None
                  else upscale(output, work.upscale_factor))
        started = _timed(seconds, "upscale", started)
    kept = output[work.seam_frames(chunk):]
    statistics = None
    if work.statistics:
        statistics = reference_statistics(kept)
        started = _timed(seconds, "statistics", started)
    segment = None
    if work.encode:
        segment = encode_segment(kept, work.fps, chunk.interpolated_start(work.interpolation_factor),
                                 crf=work.crf, preset=work.preset, bitrate_kbps=work.bitrate_kbps,
                                 threads=work.threads)
        started = _timed(seconds, "encode", started)
    return ChunkResult(
        index=index, frames_out=len(kept), segment=segment, frames=kept.copy() if work.return_frames else None,
        measurements=measurements, statistics=statistics, seconds=seconds,
    )


def warm_up(threads: int = 1) -> float:
    """Runs every stage a render's chunk always runs (quality, statistics, encoding) on
    a tiny clip, once, and returns the seconds it took. OpenCV builds its Lab tables on
    first use (about 0.14 s on a 2-core machine), which a worker should pay when it
    starts, not the first render it serves."""
    started = time.perf_counter()
    frames = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    frames[1:] = 64  # some change between frames, for the flow
    process_chunk(frames, Chunk(0, len(frames)), ChunkWork(threads=threads))
    match_color(frames, ColorStats(mean=(50.0, 0.0, 0.0), std=(10.0, 1.0, 1.0), pixels=1), 1.0,
                source=reference_statistics(frames))
    return time.perf_counter() - started


def device_seconds_by_phase(seconds: dict[str, float], scale: float) -> dict[str, float]:
    """Stage seconds -> device-seconds of the POSTPROCESSING and ENCODING phases."""
    phases: dict[str, float] = {}
    for stage, value in seconds.items():
        phase = Stage.ENCODING if stage in ENCODING_STAGES else Stage.POSTPROCESSING
        phases[phase] = phases.get(phase, 0.0) + value * scale
    return phases


class ChunkRunner(Protocol):
    """Where chunks run. ``put`` stores a chunk's frames once where workers can read
    them; ``statistics`` and ``process`` run one chunk on some worker."""

    async def put(self, frames: np.ndarray) -> Any: ...

    async def statistics(self, frames_ref: Any, chunk: Chunk, index: int) -> StatisticsResult: ...

    async def process(self, frames_ref: Any, chunk: Chunk, work: ChunkWork, index: int) -> ChunkResult: ...


class LocalChunkRunner:
    """Runs chunks in threads of this process (OpenCV, numpy and x264 release the GIL).
    Device time is charged as CPU, one core per running chunk."""

    def __init__(self, workers: int = 1, upscaler=None, interpolator=None):
        import concurrent.futures

        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="postproc")
        self.upscaler, self.interpolator = upscaler, interpolator

    async def put(self, frames: np.ndarray) -> np.ndarray:
        return frames

    async def statistics(self, frames_ref: np.ndarray, chunk: Chunk, index: int) -> StatisticsResult:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, chunk_statistics, frames_ref, chunk, index)
        result.device_seconds = result.seconds
        return result

    async def process(self, frames_ref: np.ndarray, chunk: Chunk, work: ChunkWork, index: int) -> ChunkResult:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._executor,
            lambda: process_chunk(frames_ref, chunk, work, index, upscaler=self.upscaler,
                                  interpolator=self.interpolator))
        result.device_seconds = device_seconds_by_phase(result.seconds, 1.0)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False)


@dataclasses.dataclass
class StoredClip:
    """A clip's frames put where the workers can read them, chunk by chunk."""

    chunks: list[Chunk]
    refs: list[Any]
    shape: tuple[int, int, int, int]


async def store_clip(frames: np.ndarray, runner: ChunkRunner, chunk_frames: int) -> StoredClip:
    """Plans the chunks (one shared seam frame) and puts each chunk's frames once."""
    if len(frames) == 0:
        raise ValueError("no frames to post-process")
    chunks = plan_chunks(len(frames), chunk_frames, overlap=1) if len(frames) > 1 else [Chunk(0, 1)]
    refs = [await runner.put(np.ascontiguousarray(frames[chunk.frames])) for chunk in chunks]
    return StoredClip(chunks=chunks, refs=refs, shape=tuple(frames.shape))


@dataclasses.dataclass
class ClipResult:
    video: bytes | None
    quality: QualityScores
    statistics: ColorStats | None
    frames: np.ndarray | None
    num_frames: int
    height: int
    width: int
    fps: int
    timings: list[tuple[str, str, float]]
    """(phase, device kind, device-seconds): POSTPROCESSING and ENCODING."""
    report: dict
    """For the manifest: chunks, per-stage seconds, retries."""


def _merge_timings(entries: Sequence[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    merged: dict[tuple[str, str], float] = {}
    for phase, kind, seconds in entries:
        merged[(phase, kind)] = merged.get((phase, kind), 0.0) + seconds
    return [(phase, kind, seconds) for (phase, kind), seconds in merged.items()]


async def measure_clip(stored: StoredClip, runner: ChunkRunner) -> tuple[QualityScores, list, dict]:
    """Quality scores of a stored clip, its chunks measured in parallel (no other stage)."""
    work = ChunkWork(measure=True, statistics=False, encode=False)
    results = await asyncio.gather(*(runner.process(ref, chunk, work, index)
                                     for index, (chunk, ref) in enumerate(zip(stored.chunks, stored.refs))))
    quality = score(PairMeasurements.concatenate(r.measurements for r in results))
    timings = _merge_timings([(phase, r.device_kind, s) for r in results for phase, s in r.device_seconds.items()])
    return quality, timings, _report(results, [])


def _report(results: Sequence[ChunkResult], statistics: Sequence[StatisticsResult]) -> dict:
    stage_seconds: dict[str, float] = {}
    for result in results:
        for stage, seconds in result.seconds.items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    if statistics:
        stage_seconds["clip_statistics"] = sum(s.seconds for s in statistics)
    return {
        "chunks": [
            {"index": r.index, "frames_out": r.frames_out, "worker": r.worker, "retries": r.retries,
             "seconds": {stage: round(value, 4) for stage, value in r.seconds.items()}}
            for r in results
        ],
        "stage_seconds": {stage: round(value, 4) for stage, value in stage_seconds.items()},
        "retries": sum(r.retries for r in results) + sum(s.retries for s in statistics),
    }


async def postprocess_clip(
    stored: StoredClip,
    runner: ChunkRunner,
    *,
    fps: int,
    interpolation_factor: int = 1,
    upscale_factor: int = 1,
    color_reference: ColorStats | None = None,
    color_strength: float = 1.0,
    crf: int | None = 18,
    bitrate_kbps: int | None = None,
    preset: str = "veryfast",
    threads: int = 1,
    encode: bool = True,
    return_frames: bool = False,
) -> ClipResult:
    """Post-processes a stored clip across the runner's workers and joins the result
    into one MP4 of exactly (F - 1) * interpolation_factor + 1 frames at
    fps * interpolation_factor, in order."""
    count, height, width, _ = stored.shape
    items = list(enumerate(zip(stored.chunks, stored.refs)))
    statistics_results: list[StatisticsResult] = []
    source = None
    if color_reference is not None:
        # Clip-wide statistics first, so that every chunk applies the same transform.
        statistics_results = list(await asyncio.gather(
            *(runner.statistics(ref, chunk, index) for index, (chunk, ref) in items)))
        source = ColorStats.combine(r.statistics for r in statistics_results)
    out_fps = fps * interpolation_factor
    work = ChunkWork(
        interpolation_factor=interpolation_factor, upscale_factor=upscale_factor, color_source=source,
        color_reference=color_reference, color_strength=color_strength, fps=out_fps, crf=crf,
        bitrate_kbps=bitrate_kbps, preset=preset, threads=threads, encode=encode, return_frames=return_frames,
    )
    results = sorted(await asyncio.gather(*(runner.process(ref, chunk, work, index) for index, (chunk, ref) in items)),
                     key=lambda r: r.index)
    expected = (count - 1) * interpolation_factor + 1
    delivered = sum(r.frames_out for r in results)
    if delivered != expected:
        raise RuntimeError(f"post-processing delivered {delivered} frames, expected {expected}")

    timings = [(phase, r.device_kind, s) for r in results for phase, s in r.device_seconds.items()]
    timings += [(Stage.POSTPROCESSING, r.device_kind, r.device_seconds) for r in statistics_results]
    video = None
    report = _report(results, statistics_results)
    if encode:
        started = time.perf_counter()
        video = await asyncio.to_thread(concat_segments, [r.segment for r in results], out_fps)
        joined = time.perf_counter() - started
        # The join runs on the caller's CPU, one core.
        timings.append((Stage.ENCODING, CPU, joined))
        report["join_seconds"] = round(joined, 4)
    quality = score(PairMeasurements.concatenate(r.measurements for r in results))
    statistics = ColorStats.combine(r.statistics for r in results) if all(r.statistics for r in results) else None
    frames = np.concatenate([r.frames for r in results]) if return_frames else None
    if upscale_factor > 1:
        from farm.postproc.upscale import upscaled_size

        height, width = upscaled_size(height, width, upscale_factor)
    return ClipResult(video=video, quality=quality, statistics=statistics, frames=frames, num_frames=expected,
                      height=height, width=width, fps=out_fps, timings=_merge_timings(timings), report=report)


def statistics_of_mp4(data: bytes, max_frames: int = STATISTICS_MAX_FRAMES) -> ColorStats:
    """Lab statistics of an MP4 (at most max_frames frames, evenly spread, each shrunk
    like ``reference_statistics``), for a color reference whose manifest has none."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError("the video has no frames")
    step = max(1, len(frames) // max_frames)
    return reference_statistics(np.stack(frames[::step][:max_frames]))
