"""A render that fails on every attempt, on the one-node farm of these tests: it ends
FAILED after `failed_node_limit` attempts, and the renders of other tenants go on.

The render is one step of LTX-Video, which its scheduler cannot take (IndexError in
every attempt). The gateway refuses that spec now (tests/integration/test_gateway.py);
this one is put in the store as a render queued before the limit existed. It used to be
retried for ever, and its third failure quarantined the only node for 300 s: its fourth
attempt, and every other tenant's render, stayed RUNNING/LOADING behind it."""

from __future__ import annotations

import dataclasses
import secrets
import time

from farm.config import Task
from farm.domain.spec import RenderSpec
from farm.jobs.validation import resolve_spec
from farm.jobs.store import JobStore
from farm.v1 import render_pb2 as pb
from tests.integration.test_render_path import small_spec

# Generous bounds: the renders take seconds; the wedge lasted minutes. (Under pytest's
# 300 s, with the farm's start-up, so that the wedge fails with the render's state.)
TIMEOUT_S = 120


def until_final(store: JobStore, render_id: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        record = store.get(None, render_id)
        if record.state.is_final:
            return record
        assert time.monotonic() < deadline, (f"{render_id} is still {record.state.value} (attempt {record.attempt}, "
                                             f"stage {record.stage.value}) after {timeout_s} s")
        time.sleep(0.2)


def scheduler_status(config) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("scheduler", app_name=config.ray.app_name)
    return handle.status.remote().result(timeout_s=60)


def test_a_render_failing_on_every_attempt_fails_and_other_tenants_renders_go_on(client, farm_config):
    config, _ = farm_config
    store = JobStore(config.store_url, migrate=False)
    model = config.model("ltx-video-tiny")
    tenant, _ = store.create_tenant(f"failing-{secrets.token_hex(3)}")
    request = RenderSpec(model=model.name, task=Task.TEXT_TO_VIDEO, prompt="a paper boat", width=32, height=32,
                         num_frames=9, fps=8, num_inference_steps=2, seed=7)
    spec = dataclasses.replace(resolve_spec(request, {model.name: model}), num_inference_steps=1)
    failing, _ = store.submit(tenant.id, request, spec)
    # Another tenant's render (the client's), queued behind it, and one submitted after it failed.
    beside = client.submit(small_spec(steps=2))

    failed = until_final(store, failing.id)
    limit = config.scheduler.failed_node_limit
    assert failed.state.value == "FAILED" and failed.attempt == limit, failed
    assert f"failed {limit} times on 1 node" in failed.error and "IndexError" in failed.error, failed.error

    after = client.submit(small_spec(steps=2, seed=99))
    for render in (beside, after):
        final = client.wait(render.id, timeout=TIMEOUT_S)
        assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    # One render's failures did not close the farm's only node to everyone else.
    assert scheduler_status(config)["quarantined_nodes"] == {}
