"""The render replica (the Serve deployment's class, not deployed) without a Ray cluster:
on the tiny LTX-Video model, its chunks run in a local thread, it streams the attempt's
typed events (`farm.render.attempt`, where candidates and the quality gate are tested)
and reads its chaos drill from the environment; and the post-processing replica's
priority."""

from __future__ import annotations

import asyncio
import socket

import pytest

from farm.config import PostprocConfig, Task
from farm.domain.engine import EngineRequest
from farm.domain.events import Done, RenderProgress
from farm.domain.states import Stage
from farm.engines.tiny import tiny_model_configs
from farm.render.render_thread import FAIL_AT_STEP_ENV, InjectedFault
from farm.serve.render_replica import RenderReplica


def replica(models_dir, tmp_path) -> RenderReplica:
    model = next(m for m in tiny_model_configs(models_dir) if m.name == "ltx-video-tiny")
    config = PostprocConfig(chunk_frames=4)
    return RenderReplica(model.model_dump_json(), str(tmp_path / "artifacts"), None, config.model_dump_json())


def request(seed: int = 10) -> EngineRequest:
    return EngineRequest(render_id="r-post", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a lighthouse at night",
                         negative_prompt="", image=None, width=64, height=64, num_frames=9, fps=8,
                         num_inference_steps=2, guidance_scale=3.0, seed=seed)


def run(server: RenderReplica, req: EngineRequest) -> tuple[list, BaseException | None]:
    async def go():
        events = []
        try:
            async for batch in server.render(req):
                events += batch
        except Exception as error:  # noqa: BLE001 - returned for the test to inspect
            return events, error
        return events, None

    return asyncio.run(go())


def test_the_replica_streams_the_attempts_typed_events(models_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(FAIL_AT_STEP_ENV, raising=False)
    server = replica(models_dir, tmp_path)
    events, error = run(server, request())
    assert error is None
    assert all(isinstance(e, RenderProgress) for e in events[:-1]) and isinstance(events[-1], Done)
    assert [(e.step, e.total_steps) for e in events if isinstance(e, RenderProgress) and e.step] == [(1, 2), (2, 2)]
    # Outside Ray, the node is the host's name.
    assert server.node == socket.gethostname() and events[-1].node == server.node
    assert {e.node for e in events if isinstance(e, RenderProgress) and e.stage == Stage.ENCODING_PROMPT} == {
        server.node}
    info = server.info()
    assert info["node"] == server.node and info["startup_seconds"] > 0


def test_a_chaos_drill_fails_every_render_at_its_step(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "2")
    events, error = run(replica(models_dir, tmp_path), request())
    assert isinstance(error, InjectedFault) and f"{FAIL_AT_STEP_ENV}=2" in str(error)
    # Step 1 may still be in the batch the failure ends; step 2 never finished.
    assert [e.step for e in events if isinstance(e, RenderProgress) and e.step] in ([], [1])


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    # The engine class runs here without Ray: nothing may start a cluster.
    # (Ray's APIs would start a local cluster on first use: farm.serve.render_replica.node_name
    # asks for the node id.)
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
