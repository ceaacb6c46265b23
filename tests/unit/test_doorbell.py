"""SQLite doorbells: a commit wakes the process listening on its channel at once,
across processes, and a process that cannot listen knows it must poll."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from farm.jobs import doorbell
from farm.jobs.store import JobStore
from tests.unit.test_pools import submit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")

# Generous: a ring arrives in microseconds, and nothing else wakes these listeners.
HEARD_WITHIN_S = 10


@pytest.fixture
def database(tmp_path):
    return str(tmp_path / "farm.db")


@pytest.fixture
def sqlite_store(database):
    store = JobStore(f"sqlite:///{database}")
    yield store
    store.close()


def test_a_submit_through_another_store_wakes_the_queue_listener(sqlite_store, database):
    tenant, _ = sqlite_store.create_tenant("acme")
    woken = threading.Event()
    detector = sqlite_store.change_detector(on_change=woken.set)
    other = JobStore(f"sqlite:///{database}", migrate=False)
    try:
        assert detector.pushed
        detector.changed()
        assert not detector.changed()
        submit(other, tenant.id)
        assert woken.wait(HEARD_WITHIN_S), "the submit did not ring the queue's bell"
        assert detector.changed()
    finally:
        other.close()
        detector.close()


def test_every_commit_rings_the_commits_channel_but_only_queueing_rings_the_queue(sqlite_store):
    queued, committed = threading.Event(), threading.Event()
    queue_listener = sqlite_store.change_detector(on_change=queued.set)
    commits_listener = sqlite_store.change_detector(on_change=committed.set, channel=doorbell.COMMITS)
    try:
        tenant, _ = sqlite_store.create_tenant("acme")  # a write that queues nothing
        assert committed.wait(HEARD_WITHIN_S)
        assert not queued.wait(0.3)
        committed.clear()
        submit(sqlite_store, tenant.id)
        assert queued.wait(HEARD_WITHIN_S) and committed.wait(HEARD_WITHIN_S)
    finally:
        queue_listener.close()
        commits_listener.close()


def test_a_ring_from_another_process_is_heard(database):
    heard = threading.Event()
    listener = doorbell.DoorbellListener(database, doorbell.QUEUE, heard.set)
    try:
        assert listener.listening
        ring = f"from farm.jobs.doorbell import Doorbell, QUEUE; Doorbell({database!r}, QUEUE).ring()"
        subprocess.run([sys.executable, "-c", ring], check=True, timeout=60)
        assert heard.wait(HEARD_WITHIN_S)
    finally:
        listener.close()


def test_one_listener_per_channel_and_database_the_others_poll(database, tmp_path):
    first = doorbell.DoorbellListener(database, doorbell.QUEUE, lambda: None)
    second = doorbell.DoorbellListener(database, doorbell.QUEUE, lambda: None)
    elsewhere = doorbell.DoorbellListener(str(tmp_path / "other.db"), doorbell.QUEUE, lambda: None)
    try:
        assert first.listening and elsewhere.listening
        assert not second.listening
        first.close()
        again = doorbell.DoorbellListener(database, doorbell.QUEUE, lambda: None)
        assert again.listening, "closing a listener frees its channel"
        again.close()
    finally:
        for listener in (first, second, elsewhere):
            listener.close()


def test_a_burst_of_rings_is_answered_and_a_closed_listener_hears_nothing(database):
    calls = []
    heard = threading.Event()
    listener = doorbell.DoorbellListener(database, doorbell.COMMITS, lambda: (calls.append(1), heard.set()))
    bell = doorbell.Doorbell(database, doorbell.COMMITS)
    try:
        for _ in range(500):
            bell.ring()
        assert heard.wait(HEARD_WITHIN_S)
        assert 1 <= len(calls) <= 500
        listener.close()
        count = len(calls)
        bell.ring()  # nobody listens now: no error, no call
        assert len(calls) == count
    finally:
        bell.close()
        listener.close()


def test_no_bell_for_an_in_memory_database():
    assert doorbell.bell_address(":memory:", doorbell.QUEUE) is None
    assert not doorbell.DoorbellListener(":memory:", doorbell.QUEUE, lambda: None).listening


def test_a_watcher_hears_of_an_event_written_through_another_store_by_the_bell(sqlite_store, database):
    """The event hub sleeps until the commits bell rings: with its fallback interval set
    far beyond the test's patience, only the bell can wake it."""
    import asyncio

    from farm.api.watch import EventHub
    from farm.domain.states import Stage
    from farm.jobs.records import ProgressUpdate

    tenant, _ = sqlite_store.create_tenant("acme")
    render = submit(sqlite_store, tenant.id)
    scheduler_side = JobStore(f"sqlite:///{database}", migrate=False)
    [claimed] = scheduler_side.claim({"ltx": 1}, "owner", 30)
    seq = sqlite_store.event_positions([render.id])[render.id]

    async def watch() -> None:
        hub = EventHub(sqlite_store, interval_s=600)
        try:
            assert hub._commits.pushed
            waiting = asyncio.ensure_future(hub.wait_for_events_after(render.id, seq))
            await asyncio.sleep(0.2)  # the hub is asleep on the bell now
            assert not waiting.done()
            await asyncio.to_thread(scheduler_side.record_progress, "owner",
                                    [ProgressUpdate(render.id, claimed.attempt, Stage.DENOISING, 1, 4)])
            await asyncio.wait_for(waiting, HEARD_WITHIN_S)
        finally:
            await hub.close()

    try:
        asyncio.run(watch())
    finally:
        scheduler_side.close()


def test_a_hub_woken_by_the_bell_does_not_query_the_store_between_commits(sqlite_store):
    """With the gateway's default interval (40 ms), a hub that hears the bell queries
    only at a commit or at its once-a-second fallback, not every interval."""
    import asyncio

    from farm.api.watch import PUSHED_FALLBACK_S, EventHub
    from farm.config import GatewayConfig

    tenant, _ = sqlite_store.create_tenant("acme")
    render = submit(sqlite_store, tenant.id)
    seq = sqlite_store.event_positions([render.id])[render.id]
    queries = []
    looked_up = sqlite_store.event_positions

    def counted(render_ids):
        queries.append(render_ids)
        return looked_up(render_ids)

    sqlite_store.event_positions = counted

    async def watch() -> None:
        hub = EventHub(sqlite_store, interval_s=GatewayConfig().watch_poll_interval_s)
        try:
            assert hub._commits.pushed
            waiting = asyncio.ensure_future(hub.wait_for_events_after(render.id, seq))
            await asyncio.sleep(PUSHED_FALLBACK_S * 0.8)
            assert not waiting.done()
            waiting.cancel()
        finally:
            await hub.close()

    asyncio.run(watch())
    # The hub waits for a ring before it looks, and no commit rang.
    assert queries == [], f"{len(queries)} queries in {PUSHED_FALLBACK_S * 0.8:.1f} s without a commit"
