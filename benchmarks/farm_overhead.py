"""What the farm costs around its engine.

1. Efficiency under a backlog: N renders (each about 1 s in the tiny engine)
   submitted at once through the gRPC gateway, versus a bare loop in one process
   making the same engine calls and writing the same MP4s. Ratio of throughputs,
   both measured in this run. Goal: >= 0.90. The farm's throughput under the backlog
   is its rate of completions, from the first render finished to the last (N - 1
   intervals), as the bare loop's is its renders over their summed times; the rate
   from the first submit (which adds the first render's latency while 19 more are
   submitted) is printed beside it.
2. Idle overhead: one render on an idle farm (after a pause), submit-to-SUCCEEDED
   as the client sees it, minus the bare time of the same render after the same
   pause (the two alternate, so both start equally cold); medians of 10. Goal: < 150 ms.

Run: .venv/bin/python benchmarks/farm_overhead.py [--renders 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from farm.client import FarmClient, find_api_key
from farm.config import FarmConfig, Task
from farm.domain.engine import EngineRequest
from farm.v1 import render_pb2 as pb

MODEL = "ltx-video-tiny"
# Sized so that one render takes about a second in the tiny engine on 2 cores.
SHAPE = dict(width=384, height=256, num_frames=33, num_inference_steps=20, guidance_scale=3.0, fps=24)


class BareEngine:
    """The same engine calls, post-processing and MP4 writes as the farm, in one
    process, no farm."""

    def __init__(self, config: FarmConfig, artifacts_dir: str = "bare-artifacts"):
        from farm.engines import load_engine
        from farm.postproc.pipeline import LocalChunkRunner
        from farm.storage.artifacts import ArtifactStore

        self.engine = load_engine(config.model(MODEL))
        self.artifacts = ArtifactStore(str(config.home / artifacts_dir))
        self.postproc = config.postproc
        self.runner = LocalChunkRunner(workers=config.postproc.replicas)

    def render(self, index: int) -> float:
        from farm.postproc.pipeline import postprocess_clip, store_clip
        from farm.render.manifest import build_manifest

        request = EngineRequest(render_id=f"bare{index}", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a harbor at dusk",
                                negative_prompt="", image=None, seed=index, **SHAPE)
        started = time.perf_counter()
        output = self.engine.render(request, lambda progress: None, lambda: False)
        # What the farm does with every clip: chunked quality measurements and encoding,
        # here in threads of this process, as many as the farm's post-processing replicas.
        stored = asyncio.run(store_clip(output.frames, self.runner, self.postproc.chunk_frames))
        clip = asyncio.run(postprocess_clip(stored, self.runner, fps=request.fps, threads=self.postproc.threads))
        timings = [(t.phase, t.device_kind, t.seconds) for t in output.timings] + clip.timings
        manifest = build_manifest(self.engine.describe(), request, timings, output.frames.shape, None,
                                  cpu_threads=output.cpu_threads)
        manifest["quality"] = clip.quality.to_dict()
        self.artifacts.write(request.render_id, 1, clip.video, manifest)
        return time.perf_counter() - started


def bare_loop(config: FarmConfig, count: int) -> list[float]:
    """`count` bare renders back to back, after one warm-up."""
    bare = BareEngine(config)
    return [bare.render(index) for index in range(count + 1)][1:]


def phase_medians(artifacts: Path, render_ids: list[str] | None = None) -> dict[str, float]:
    import json
    from collections import defaultdict

    seconds = defaultdict(list)
    for manifest in artifacts.glob("renders/*/attempt-1/manifest.json"):
        if render_ids is not None and manifest.parent.parent.name not in render_ids:
            continue
        for timing in json.loads(manifest.read_text())["timings"]:
            seconds[timing["phase"]].append(timing["seconds"])
    return {phase: round(statistics.median(values), 3) for phase, values in seconds.items()}


IDLE_PAUSE_S = 0.5
# Where an idle render's time goes: the first event of each stage, as the store saw it.
MILESTONES = ("QUEUED", "LOADING", "ENCODING_PROMPT", "DENOISING", "DECODING", "POSTPROCESSING", "WRITING",
              "SUCCEEDED")


def followed(client: FarmClient, render_id: str) -> dict[str, float]:
    """Follows a render to its end; wall-clock time of each milestone's first event,
    and "seen": when the client received the final one."""
    times: dict[str, float] = {}
    for event in client.watch(render_id, timeout=600):
        at = event.time.ToDatetime().timestamp() if event.HasField("time") else time.time()
        state, stage = pb.RenderState.Name(event.state)[len("RENDER_STATE_"):], pb.Stage.Name(event.stage)[6:]
        name = state if state in ("QUEUED", "SUCCEEDED") else stage
        times.setdefault(name, at)
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            times["seen"] = time.time()
    return times


def timeline(submitted: list[float], milestones: list[dict[str, float]]) -> str:
    """Median seconds from each milestone to the next one present."""
    spans: dict[str, list[float]] = {}
    for start, times in zip(submitted, milestones):
        points = [("submit", start)] + [(m, times[m]) for m in MILESTONES if m in times] + [("seen", times["seen"])]
        for (a, t0), (b, t1) in zip(points, points[1:]):
            spans.setdefault(f"{a}->{b}", []).append(t1 - t0)
    return ", ".join(f"{name} {statistics.median(v) * 1000:.0f} ms" for name, v in spans.items())


def drain_rate(renders: list[pb.Render]) -> float:
    """Renders finished per second while the backlog drained: the intervals between
    the first completion and the last, as the store timed them."""
    finished = sorted(r.finished_at.ToDatetime().timestamp() for r in renders)
    return (len(finished) - 1) / (finished[-1] - finished[0])


def spec(seed: int) -> pb.RenderSpec:
    return pb.RenderSpec(model=MODEL, task=pb.TASK_TEXT_TO_VIDEO, prompt="a harbor at dusk", seed=seed, **SHAPE)


def start_farm(config_path: Path, home: Path) -> tuple[subprocess.Popen, str]:
    ready = home / "gateway.ready"
    log = open(home / "serve.log", "ab")
    # The farm's own processes as in production: its CPU replicas set their allocator themselves.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"FARM_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-m", "farm", "serve", "--config", str(config_path),
                                "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"farm serve exited; see {home / 'serve.log'}")
        if ready.exists():
            target = f"127.0.0.1:{ready.read_text().strip()}"
            with FarmClient(target) as probe:
                if probe.is_serving():
                    return process, target
        time.sleep(0.5)
    raise SystemExit("farm did not start")


def temporary_farm(prefix: str) -> tuple[Path, Path, FarmConfig]:
    """A fresh FARM_HOME with a config (ports picked by the OS) and the tiny models."""
    from farm.engines.tiny import make_tiny_models

    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    values = {"home": str(home), "gateway": {"port": 0, "metrics_port": 0}, "scheduler": {"metrics_port": 0}}
    config_path = home / "farm.yaml"
    config_path.write_text(yaml.safe_dump(values))
    config = FarmConfig(**values)
    make_tiny_models(config.models_dir)
    return home, config_path, config


def with_replica_allocator() -> None:
    """Runs this process (the bare loop) with the allocator settings of the farm's CPU
    replicas (farm.serve.allocator), so that the comparison is of the farm, not of malloc."""
    from farm.serve.allocator import KEEP_FREED_MEMORY

    if os.environ.get("GLIBC_TUNABLES") != KEEP_FREED_MEMORY:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, GLIBC_TUNABLES=KEEP_FREED_MEMORY))


def main() -> None:
    with_replica_allocator()
    parser = argparse.ArgumentParser()
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--idle-runs", type=int, default=10)
    args = parser.parse_args()

    home, config_path, config = temporary_farm("farm-bench-")

    # The bare loop runs before the farm starts and again after it stops; their
    # union is the reference, so a drift in the machine's speed hits both sides.
    print("bare loop (before) ...", flush=True)
    bare = bare_loop(config, args.renders)

    process, target = start_farm(config_path, home)
    try:
        with FarmClient(target, find_api_key(home)) as client:
            client.wait(client.submit(spec(0)).id)  # warm-up
            print(f"backlog of {args.renders} ...", flush=True)
            started = time.perf_counter()
            ids = [client.submit(spec(i + 1)).id for i in range(args.renders)]
            # Renders of one priority run oldest first: following the last one is enough.
            client.wait(ids[-1])
            farm_elapsed = time.perf_counter() - started
            finals = [client.get(rid) for rid in ids]
            assert all(r.state == pb.RENDER_STATE_SUCCEEDED for r in finals), [r.error for r in finals]
            end_to_end_throughput = args.renders / farm_elapsed
            farm_throughput = drain_rate(finals)

            # Diagnostic: the bare loop again with the farm idle beside it tells how much of
            # the gap is the farm's background activity rather than its render path.
            print("bare loop beside the idle farm ...", flush=True)
            beside = bare_loop(config, max(args.renders // 2, 3))
            # Idle overhead: a render after a pause, against the bare render after the same
            # pause, alternating, so both start equally cold (threads asleep, caches cold).
            print("idle overhead ...", flush=True)
            idle, bare_idle, idle_submitted, idle_milestones, idle_ids = [], [], [], [], []
            paused = BareEngine(config, "bare-idle-artifacts")
            paused.render(0)  # warm-up
            for i in range(args.idle_runs):
                time.sleep(IDLE_PAUSE_S)
                bare_idle.append(paused.render(2000 + i))
                time.sleep(IDLE_PAUSE_S)
                begun, submitted = time.perf_counter(), time.time()
                render = client.submit(spec(1000 + i))
                idle_milestones.append(followed(client, render.id))
                idle.append(time.perf_counter() - begun)
                idle_submitted.append(submitted)
                idle_ids.append(render.id)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    print("bare loop (after) ...", flush=True)
    bare += bare_loop(config, args.renders)
    bare_median = statistics.median(bare)
    bare_throughput = len(bare) / sum(bare)
    print(f"bare: {bare_median * 1000:.0f} ms per render (median), {bare_throughput:.3f} renders/s")
    print(f"bare beside the idle farm: {statistics.median(beside) * 1000:.0f} ms per render (median), "
          f"{len(beside) / sum(beside):.3f} renders/s")

    efficiency = farm_throughput / bare_throughput
    print("median seconds per phase, bare:", phase_medians(config.home / "bare-artifacts"))
    print("median seconds per phase, farm:", phase_medians(config.home / "artifacts"))
    print("median seconds per phase, bare after a pause:", phase_medians(config.home / "bare-idle-artifacts"))
    print("median seconds per phase, farm idle renders:", phase_medians(config.home / "artifacts", idle_ids))
    print("idle render timeline (medians):", timeline(idle_submitted, idle_milestones))
    overhead_ms = (statistics.median(idle) - statistics.median(bare_idle)) * 1000
    hot_overhead_ms = (statistics.median(idle) - bare_median) * 1000
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"farm: {farm_throughput:.3f} renders/s from the first completion to the last; from the first submit, "
          f"{args.renders} renders in {farm_elapsed:.2f} s = {end_to_end_throughput:.3f} renders/s")
    print(f"efficiency (farm / bare throughput): {efficiency:.3f}  (goal >= 0.90); from the first submit "
          f"{end_to_end_throughput / bare_throughput:.3f}")
    print(f"idle submit-to-SUCCEEDED median {statistics.median(idle) * 1000:.0f} ms, bare after the same pause "
          f"{statistics.median(bare_idle) * 1000:.0f} ms: overhead {overhead_ms:.0f} ms  (goal < 150 ms); "
          f"against the back-to-back bare median {bare_median * 1000:.0f} ms it would be {hot_overhead_ms:.0f} ms")


if __name__ == "__main__":
    main()
