"""Frame-parallel post-processing through the real Serve deployment: 1 vs 2 replicas.

The clip: 121 frames of 768x512 (LTX-Video's default output), a textured scene
panning with a textured square crossing it (the same as postproc_stages.py). The
work: 2x interpolation (optical flow) then H.264 encoding, plus the quality
measurements every render gets, chunk by chunk on the post-processing deployment
(`farm.serve.postproc`), joined without re-encoding. This process plays the engine
replica: it puts the chunks into Ray's object store, fans them out through the
deployment's handle and joins the segments, exactly as a render attempt (`farm.render.attempt.AttemptRunner`) does.

Each replica is single-threaded (OpenCV, x264), so 1 replica uses one core and 2
replicas two. The same run deploys both (two Serve applications, one of 1 replica
and one of 2; an idle replica takes no CPU) and alternates their runs, so that drift
in the machine's load falls on both alike. It reports the speed-up (of the medians,
and of the best runs), each stage's frames per second per core (from the per-chunk
stage times the replicas send back, in the best 1-replica run), and what that means
for a GPU node. Ray's settings are the farm's own (`farm.cli.embedded.QUIET_RAY_ENV`:
workers at normal priority, quiet Serve bookkeeping).

Run: .venv/bin/python benchmarks/postproc.py [--frames 121] [--chunk-frames 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from postproc_stages import synthetic_clip  # noqa: E402

from farm.config import PostprocConfig  # noqa: E402
from farm.postproc.encode import probe_mp4  # noqa: E402
from farm.postproc.pipeline import postprocess_clip, store_clip  # noqa: E402

FPS = 24
FACTOR = 2
# The paper's LTX-Video speed on an H100: 121 frames of 768x512 in 2 s (no GPU engine
# benchmark was measured here).
H100_SECONDS_PER_RENDER = 2.0


async def one_run(frames, runner, chunk_frames: int) -> dict:
    started = time.perf_counter()
    stored = await store_clip(frames, runner, chunk_frames)
    stored_at = time.perf_counter()
    result = await postprocess_clip(stored, runner, fps=FPS, interpolation_factor=FACTOR, preset="veryfast")
    finished = time.perf_counter()
    return {
        "wall_s": finished - started,
        "put_s": stored_at - started,
        "join_s": result.report.get("join_seconds", 0.0),
        "stage_seconds": result.report["stage_seconds"],
        "chunks": len(result.report["chunks"]),
        "workers": sorted({c["worker"] for c in result.report["chunks"]}),
        "video": result.video,
        "frames_out": result.num_frames,
    }


def deploy(replicas: int, args):
    from ray import serve

    from farm.serve.postproc import ServeChunkRunner, postproc_deployment

    config = PostprocConfig(replicas=replicas, chunk_frames=args.chunk_frames)
    handle = serve.run(postproc_deployment(config, name="postproc"), name=f"postproc-{replicas}", route_prefix=None)
    return ServeChunkRunner(handle, retries=0)


def summarize(frames, replicas: int, runs: list[dict]) -> dict:
    probe = probe_mp4(runs[-1]["video"])
    expected = (len(frames) - 1) * FACTOR + 1
    assert probe["frames"] == expected == runs[-1]["frames_out"], (probe["frames"], expected)
    assert abs(probe["fps"] - FPS * FACTOR) < 1e-6 and abs(probe["duration_s"] - expected / (FPS * FACTOR)) < 1e-3
    walls = [run["wall_s"] for run in runs]
    median = statistics.median(walls)
    best = min(runs, key=lambda run: run["wall_s"])
    # Stage times of the best run: the one least disturbed by anything else on the machine.
    stages = best["stage_seconds"]
    return {
        "replicas": replicas, "walls_s": [round(w, 3) for w in walls], "median_wall_s": round(median, 3),
        "best_wall_s": round(best["wall_s"], 3),
        "put_s": round(statistics.median(r["put_s"] for r in runs), 3),
        "join_s": round(statistics.median(r["join_s"] for r in runs), 3),
        "chunks": runs[-1]["chunks"], "workers": len(runs[-1]["workers"]),
        "stage_core_seconds": {stage: round(seconds, 3) for stage, seconds in stages.items()},
        "video_bytes": len(runs[-1]["video"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--chunk-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from farm.cli.embedded import QUIET_RAY_ENV

    frames = synthetic_clip(args.frames, args.height, args.width)
    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)
    # Two logical CPUs: room for two 1-CPU replicas; this process needs none reserved.
    # address="local": a cluster of its own, never one that happens to run on the machine.
    # Three logical CPUs hold both applications' replicas (1 + 2); only the application
    # being measured works, so at most two replicas run on the two cores at any time.
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
    try:
        runners = {replicas: deploy(replicas, args) for replicas in (1, 2)}
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for runner in runners.values():
            # Warm-up: every replica imports, builds its DIS flow and x264 once.
            for _ in range(2):
                asyncio.run(one_run(frames[:4 * args.chunk_frames], runner, args.chunk_frames))
        for _ in range(args.repeats):
            for replicas, runner in runners.items():
                runs[replicas].append(asyncio.run(one_run(frames, runner, args.chunk_frames)))
        one, two = summarize(frames, 1, runs[1]), summarize(frames, 2, runs[2])
    finally:
        serve.shutdown()
        ray.shutdown()

    out_frames = (args.frames - 1) * FACTOR + 1
    per_frame_stage = {"interpolate": args.frames, "quality": out_frames, "statistics": out_frames,
                       "encode": out_frames}
    stages = one["stage_core_seconds"]
    rates = {stage: round(per_frame_stage[stage] / seconds, 1) for stage, seconds in stages.items()
             if stage in per_frame_stage and seconds > 0}
    core_seconds = sum(stages.values()) + one["join_s"] + one["put_s"]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "clip": f"{args.frames} frames {args.width}x{args.height}, {FACTOR}x interpolation -> {out_frames} frames, "
                f"chunks of {args.chunk_frames}",
        "one_replica": one, "two_replicas": two,
        "speedup_of_medians": round(one["median_wall_s"] / two["median_wall_s"], 3),
        "speedup_of_best": round(one["best_wall_s"] / two["best_wall_s"], 3),
        "frames_per_second_per_core": rates,
        "output_frames_per_second_per_core_interpolate": round(out_frames / stages["interpolate"], 1),
        "core_seconds_per_render": round(core_seconds, 2),
        "cores_per_h100_ltx": round(core_seconds / H100_SECONDS_PER_RENDER, 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
