"""A replica that dies mid-render loses nothing: the attempt is released, the render
requeued (attempt + 1) and finished elsewhere, and only the finishing attempt is charged."""

from __future__ import annotations

import os
import signal

from farm.jobs.store import JobStore
from farm.serve.flags import hold_next_render
from farm.v1 import render_pb2 as pb
from tests.integration.test_render_path import small_spec


def kill_engine_replica(model: str) -> None:
    # The state API needs Ray's dashboard, which farm does not start; the GCS table does not.
    from ray._private.state import actors

    replicas = [a for a in actors().values()
                if a["State"] == "ALIVE" and f"engine-{model}" in a["Name"] and a["Name"].startswith("SERVE_REPLICA")]
    assert replicas, "no engine replica found"
    # SIGKILL: the process vanishes as in a crash or an OOM kill, with no clean-up.
    os.kill(replicas[0]["Pid"], signal.SIGKILL)


def test_killed_engine_replica_loses_no_render(client, farm_config, holds):
    config, _ = farm_config
    # Held after step 3 until its replica is killed; the hold is used up, so attempt 2 runs through.
    hold_next_render("ltx-video-tiny", step=3)
    render = client.submit(small_spec(steps=6))
    for event in client.watch(render.id, timeout=300):
        if event.stage == pb.STAGE_DENOISING and event.step == 3:
            break
    kill_engine_replica("ltx-video-tiny")

    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    assert final.attempt == 2
    assert {p.attempt for p in final.cost.phases} == {2}, "the lost attempt was charged"

    events = list(client.watch(render.id))
    assert any("requeued" in e.message for e in events)
    store = JobStore(config.store_url, migrate=False)
    charged = sum(c.nanodollars for c in store.get(None, render.id).charges)
    assert charged == round(final.cost.total_dollars * 1e9)
