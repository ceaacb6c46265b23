"""The engine replica's post-processing orchestration, without a Ray cluster: the
EngineServer class itself (not deployed) on the tiny LTX-Video model, its chunks run
in a local thread. Candidates, the quality gate (fail and retry with new seeds),
monotonic steps, the done event's keys and the manifest."""

from __future__ import annotations

import asyncio
import json

import fsspec
import pytest

from farm.config import PostprocConfig, QualityGate, Task
from farm.domain.engine import EngineRequest
from farm.domain.spec import ResolvedPostprocess
from farm.engines.tiny import tiny_model_configs
from farm.postproc.encode import probe_mp4
from farm.serve.engine import EngineServer, QualityRejected


def server(models_dir, tmp_path, **postproc) -> EngineServer:
    model = next(m for m in tiny_model_configs(models_dir) if m.name == "ltx-video-tiny")
    config = PostprocConfig(chunk_frames=4, **postproc)
    return EngineServer(model.model_dump_json(), str(tmp_path / "artifacts"), None, config.model_dump_json())


def request(post: ResolvedPostprocess | None = None, seed: int = 10) -> EngineRequest:
    return EngineRequest(render_id="r-post", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a lighthouse at night",
                         negative_prompt="", image=None, width=64, height=64, num_frames=9, fps=8,
                         num_inference_steps=2, guidance_scale=3.0, seed=seed, postprocess=post)


def run(engine: EngineServer, req: EngineRequest) -> tuple[list[dict], BaseException | None]:
    async def go():
        events = []
        try:
            async for batch in engine.render(req):
                events += batch
        except Exception as error:  # noqa: BLE001 - returned for the test to inspect
            return events, error
        return events, None

    return asyncio.run(go())


def steps_of(events) -> list[tuple[int, int]]:
    return [(e["step"], e["total_steps"]) for e in events if e["kind"] == "progress" and e.get("step")]


def test_candidates_are_rendered_scored_and_the_best_one_delivered(models_dir, tmp_path):
    engine = server(models_dir, tmp_path)
    events, error = run(engine, request(ResolvedPostprocess(candidates=3, interpolation_factor=2)))
    assert error is None
    done = events[-1]
    assert done["kind"] == "done"
    assert [c["seed"] for c in done["candidates"]] == [10, 11, 12]
    chosen = [c for c in done["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["score"] == max(c["score"] for c in done["candidates"])
    assert done["seed"] == chosen[0]["seed"]
    assert set(done["quality"]) == {"temporal_consistency", "flicker", "motion_smoothness", "frozen", "issues"}
    # Steps count across the candidates, and only go forward.
    assert steps_of(events) == [(step, 6) for step in range(1, 7)]
    phases = {phase for phase, _, _ in done["timings"]}
    assert {"DENOISING", "POSTPROCESSING", "ENCODING", "WRITING"} <= phases
    with fsspec.open(done["artifact_uri"], "rb") as f:
        video = probe_mp4(f.read())
    assert (video["frames"], video["fps"]) == (17, 16.0)
    with fsspec.open(done["manifest_uri"], "r") as f:
        manifest = json.load(f)
    assert manifest["seed"] == done["seed"] and manifest["spec"]["seed"] == done["seed"]
    assert manifest["postprocess"]["output"] == {"frames": 17, "height": 64, "width": 64, "fps": 16}
    assert len(manifest["postprocess"]["candidates"]) == 3


def test_quality_gate_fail_fails_the_render_and_charges_what_ran(models_dir, tmp_path):
    # Random-weight video is noise: any flicker threshold near 0 is crossed.
    engine = server(models_dir, tmp_path, quality=QualityGate(action="fail", max_flicker=0.01))
    events, error = run(engine, request())
    assert isinstance(error, QualityRejected) and "flicker" in str(error)
    charged = [phase for e in events for phase, _, _ in e.get("finished_phases", ())]
    assert "POSTPROCESSING" in charged and "ENCODING" in charged


def test_quality_gate_retry_renders_new_seeds_then_gives_up(models_dir, tmp_path):
    engine = server(models_dir, tmp_path, quality=QualityGate(action="retry", max_flicker=0.01, max_retries=2))
    events, error = run(engine, request(seed=40))
    assert isinstance(error, QualityRejected) and "after 2 retries" in str(error)
    # Three renders (seeds 40, 41, 42): steps 1..6 in order, the total growing with each retry.
    assert [step for step, _ in steps_of(events)] == list(range(1, 7))
    assert steps_of(events)[-1] == (6, 6)


def test_quality_gate_retry_delivers_a_clip_that_passes(models_dir, tmp_path):
    engine = server(models_dir, tmp_path, quality=QualityGate(action="retry", max_flicker=1e9, max_retries=2))
    events, error = run(engine, request())
    assert error is None and events[-1]["kind"] == "done" and events[-1]["candidates"] is None


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    # The engine class runs here without Ray: nothing may start a cluster.
    # (Ray's APIs would start a local cluster on first use: farm.serve.engine.node_name asks
    # for the node id.)
    import ray
    import ray._private.auto_init_hook as auto_init

    monkeypatch.setattr(auto_init, "enable_auto_connect", False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a unit test must not start Ray"))


def test_post_processing_lowers_every_thread_of_its_process_and_never_raises_one():
    """The engine preempts post-processing on shared cores: the replica lowers all its
    threads (Linux's nice is per thread, and Ray's threads already run). Run in a child
    process, since a priority once lowered cannot be raised without privileges."""
    import subprocess
    import sys

    child = """
import os, threading
from farm.serve.postproc import lower_priority
started = threading.Event(); done = threading.Event()
threading.Thread(target=lambda: (started.set(), done.wait()), daemon=True).start()
started.wait()
def levels():
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})
lower_priority(7)
after = levels()
lower_priority(3)
print(after, levels())
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[7]", "[7]"], out.stdout + out.stderr
