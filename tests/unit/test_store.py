"""The job store on SQLite and on PostgreSQL: idempotency, isolation, claim order,
leases, cancels, events and the ledger."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time

import pytest

from farm.config import PriceConfig, Task
from farm.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from farm.domain.spec import RenderSpec
from farm.domain.states import AttemptOutcome, RenderState, Stage
from farm.jobs import schema
from farm.jobs.validation import resolve_spec
from farm.jobs.records import ProgressUpdate
from farm.metering.cost import price_timings
from tests.conftest import sample_models

MODELS = sample_models()
OWNER = "scheduler-test"


def submit(store, tenant_id, model="ltx", priority=None, key="", prompt="a lighthouse"):
    request = RenderSpec(model=model, task=Task.TEXT_TO_VIDEO, prompt=prompt, priority=priority,
                         idempotency_key=key, width=256, height=256, num_frames=17, num_inference_steps=4)
    record, _ = store.submit(tenant_id, request, resolve_spec(request, MODELS))
    return record


@pytest.fixture
def clock(monkeypatch):
    """The store's clock, moved by the test: leases expire when the test says, not when
    the machine gets there."""
    now = [schema.utcnow()]
    monkeypatch.setattr(schema, "utcnow", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += dt.timedelta(seconds=seconds)

    return advance


@pytest.fixture
def tenant(store):
    record, _ = store.create_tenant("acme")
    return record


def test_api_keys_authenticate_their_tenant_only(store):
    acme, acme_key = store.create_tenant("acme")
    other, other_key = store.create_tenant("other")
    assert store.authenticate(acme_key).id == acme.id
    assert store.authenticate(other_key).id == other.id
    key_id = acme_key.split("_")[1]
    with pytest.raises(Unauthenticated):
        store.authenticate(f"farm_{key_id}_{'x' * 43}")
    with pytest.raises(Unauthenticated, match="malformed"):
        store.authenticate("hunter2")
    with pytest.raises(AlreadyExists):
        store.create_tenant("acme")


def test_idempotency_key_returns_the_first_render(store, tenant):
    first = submit(store, tenant.id, key="job-1")
    again = submit(store, tenant.id, key="job-1")
    assert again.id == first.id
    other_tenant, _ = store.create_tenant("other")
    assert submit(store, other_tenant.id, key="job-1").id != first.id
    with pytest.raises(AlreadyExists, match="different spec"):
        submit(store, tenant.id, key="job-1", prompt="something else")
    assert len(store.list(tenant.id)[0]) == 1


def test_concurrent_submits_with_one_key_create_one_render(store, tenant):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: submit(store, tenant.id, key="same").id, range(16)))
    assert len(ids) == 1


def test_a_tenant_never_sees_or_cancels_another_tenants_render(store, tenant):
    render = submit(store, tenant.id)
    other, _ = store.create_tenant("other")
    with pytest.raises(NotFound):
        store.get(other.id, render.id)
    with pytest.raises(NotFound):
        store.request_cancel(other.id, render.id)
    assert store.list(other.id)[0] == []
    assert store.get(tenant.id, render.id).state is RenderState.QUEUED


def test_claim_takes_priority_first_then_age(store, tenant):
    low = submit(store, tenant.id, priority=10)
    time.sleep(0.01)
    old_mid = submit(store, tenant.id, priority=50)
    time.sleep(0.01)
    new_mid = submit(store, tenant.id, priority=50)
    high = submit(store, tenant.id, priority=90)
    other_model = submit(store, tenant.id, model="cog", priority=100)
    order = [store.claim({"ltx": 1}, OWNER, 30)[0].id for _ in range(4)]
    assert order == [high.id, old_mid.id, new_mid.id, low.id]
    assert store.claim({"ltx": 1}, OWNER, 30) == []
    assert [c.id for c in store.claim({"cog": 5}, OWNER, 30)] == [other_model.id]


def test_concurrent_claims_never_hand_out_a_render_twice(store, tenant):
    ids = [submit(store, tenant.id).id for _ in range(12)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda i: store.claim({"ltx": 3}, f"s{i}", 30), range(4)))
    claimed = [c.id for batch in batches for c in batch]
    assert sorted(claimed) == sorted(ids)


def test_progress_events_have_gapless_sequence_numbers(store, tenant):
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, 30)
    store.record_progress(OWNER, [ProgressUpdate(render.id, 1, Stage.DENOISING, s, 4) for s in range(1, 5)])
    # Updates from someone who does not hold the lease are dropped.
    store.record_progress("intruder", [ProgressUpdate(render.id, 1, Stage.DECODING)])
    events = store.events_after(render.id, 0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.step for e in events if e.stage is Stage.DENOISING] == [1, 2, 3, 4]
    assert store.events_after(render.id, 3)[0].seq == 4
    assert store.event_positions([render.id]) == {render.id: len(events)}


def test_finish_writes_the_ledger_exactly_once(store, tenant):
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, 30)
    charges = price_timings(PriceConfig(), [("DENOISING", "CPU", 2.0), ("DECODING", "CPU", 0.5),
                                            ("DENOISING", "CPU", 1.0)])
    done = store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED, charges=charges, artifact_uri="file:///v.mp4")
    assert done.state is RenderState.SUCCEEDED and done.artifact_uri == "file:///v.mp4"
    assert {c.phase: c.device_seconds for c in done.charges} == {"DENOISING": 3.0, "DECODING": 0.5}
    assert done.cost_nanodollars == sum(c.nanodollars for c in charges) == store.ledger_total_nanodollars()
    # A replayed completion changes nothing.
    assert store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED, charges=charges) is None
    assert store.ledger_total_nanodollars(tenant.id) == done.cost_nanodollars
    with pytest.raises(FailedPrecondition, match="already SUCCEEDED"):
        store.request_cancel(tenant.id, render.id)



def test_finish_writes_the_last_progress_before_the_final_event(store, tenant):
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, 30)
    last = [ProgressUpdate(render.id, 1, Stage.POSTPROCESSING, 4, 4), ProgressUpdate(render.id, 1, Stage.WRITING, 4, 4)]
    done = store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED, progress=last)
    events = store.events_after(render.id, 0)
    assert [(e.state, e.stage) for e in events[-3:]] == [
        (RenderState.RUNNING, Stage.POSTPROCESSING), (RenderState.RUNNING, Stage.WRITING),
        (RenderState.SUCCEEDED, Stage.WRITING)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and done.state is RenderState.SUCCEEDED
    # A replay (the lease is gone) writes neither the progress nor a second final event.
    assert store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED, progress=last) is None
    assert len(store.events_after(render.id, 0)) == len(events)

def test_expired_lease_requeues_with_the_next_attempt_then_fails(store, tenant, clock):
    render = submit(store, tenant.id)
    for attempt in (1, 2):
        claimed = store.claim({"ltx": 1}, f"owner-{attempt}", lease_seconds=10)
        assert claimed[0].attempt == attempt
        clock(9)
        assert store.requeue_expired(max_attempts=3) == {}
        clock(2)
        assert store.requeue_expired(max_attempts=3) == {render.id: render.spec.model}
        again = store.get(tenant.id, render.id)
        assert (again.state, again.attempt) == (RenderState.QUEUED, attempt + 1)
    # The first owner's late result is not accepted.
    assert store.finish("owner-1", render.id, 1, AttemptOutcome.SUCCEEDED) is None
    store.claim({"ltx": 1}, "owner-3", lease_seconds=10)
    clock(11)
    store.requeue_expired(max_attempts=3)
    failed = store.get(tenant.id, render.id)
    assert failed.state is RenderState.FAILED and "lost 3 times" in failed.error
    assert store.ledger_total_nanodollars() == 0


def test_heartbeat_keeps_the_lease_and_reports_cancels(store, tenant, clock):
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, lease_seconds=10)
    for _ in range(3):
        clock(8)  # most of the lease, three times over: only the heartbeats keep it
        status = store.heartbeat(OWNER, {render.id: 1}, lease_seconds=10)
        assert not status.lost
    clock(9)
    assert store.requeue_expired(3) == {}
    store.request_cancel(tenant.id, render.id)
    assert store.heartbeat(OWNER, {render.id: 1}, 10).cancel_requested == {render.id}
    assert store.cancel_requested([render.id]) == [render.id]
    assert store.heartbeat("someone-else", {render.id: 1}, 10).lost == {render.id}


def test_cancel_of_a_queued_render_is_immediate(store, tenant):
    render = submit(store, tenant.id)
    cancelled = store.request_cancel(tenant.id, render.id)
    assert cancelled.state is RenderState.CANCELLED
    assert store.claim({"ltx": 5}, OWNER, 30) == []


def test_release_requeues_without_charging(store, tenant):
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, 30)
    assert store.release(OWNER, render.id, 1, "replica died", max_attempts=3)
    again = store.get(tenant.id, render.id)
    assert (again.state, again.attempt, again.cost_nanodollars) == (RenderState.QUEUED, 2, 0)


def test_list_pages_newest_first(store, tenant):
    ids = []
    for i in range(5):
        ids.append(submit(store, tenant.id).id)
        time.sleep(0.002)
    page, token = store.list(tenant.id, page_size=2)
    seen = [r.id for r in page]
    while token:
        page, token = store.list(tenant.id, page_size=2, page_token=token)
        seen += [r.id for r in page]
    assert seen == list(reversed(ids))
    with pytest.raises(InvalidArgument):
        store.list(tenant.id, page_token="garbage!")
    with pytest.raises(InvalidArgument):
        store.list(tenant.id, page_size=5000)
    store.request_cancel(tenant.id, ids[0])
    assert [r.id for r in store.list(tenant.id, states=[RenderState.CANCELLED])[0]] == [ids[0]]
