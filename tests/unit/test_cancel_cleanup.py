"""A render preempted with a checkpoint, then cancelled while queued, leaves no
checkpoint behind: no attempt will resume from it. Through the gateway's servicer
and a real store (no Ray)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from farm.api.interceptors import CURRENT_TENANT
from farm.api.metrics import GatewayMetrics
from farm.api.servicer import RenderServicer
from farm.api.watch import EventHub
from farm.config import FarmConfig
from farm.domain.states import RenderState
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from tests.unit.test_pools import OWNER, submit


@pytest.fixture
def tenant(store):
    return store.create_tenant("studio")[0]


def test_cancelling_a_queued_preempted_render_deletes_its_checkpoint(store, tenant, tmp_path):
    config = FarmConfig(home=tmp_path, models=[])
    artifacts = ArtifactStore(config.artifacts_url)
    preempted, untouched = submit(store, tenant.id, priority=10), submit(store, tenant.id)
    claimed = {c.id: c for c in store.claim({"ltx": 2}, OWNER, 30)}
    checkpoints = {}
    for render in (preempted, untouched):
        checkpoints[render.id] = artifacts.write_checkpoint(render.id, claimed[render.id].attempt, b"latents")
        assert store.preempt(OWNER, render.id, claimed[render.id].attempt, checkpoint_uri=checkpoints[render.id],
                             step=2, charges=[])
    assert store.get(None, preempted.id).state is RenderState.QUEUED

    async def cancel() -> pb.Render:
        servicer = RenderServicer(config, store, EventHub(store, 0.04), GatewayMetrics())
        CURRENT_TENANT.set(tenant)
        context = SimpleNamespace(time_remaining=lambda: None)
        return await servicer.CancelRender(pb.CancelRenderRequest(render_id=preempted.id), context)

    cancelled = asyncio.run(cancel())
    assert cancelled.state == pb.RENDER_STATE_CANCELLED
    assert not artifacts.fs.exists(artifacts.checkpoint_prefix(preempted.id))
    # Another render's checkpoint stays: it will resume from it.
    assert artifacts.read_checkpoint(checkpoints[untouched.id]) == b"latents"
