"""Fair share: priority first, then the tenant furthest below its weighted share, then age."""

from __future__ import annotations

import datetime as dt

from farm.jobs.fairshare import Candidate, pick_fair

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def queue(tenant: str, count: int, priority: int = 50, start: int = 0) -> list[Candidate]:
    return [Candidate(f"{tenant}{i}", tenant, priority, T0 + dt.timedelta(seconds=start + i)) for i in range(count)]


def tenants(picked):
    return [c.tenant_id for c in picked]


def test_a_late_tenant_gets_the_next_slot_despite_a_big_backlog():
    queued = {"big": queue("big", 200), "late": queue("late", 1, start=1000)}
    assert tenants(pick_fair(1, queued, {"big": 4}, {}, {})) == ["late"]


def test_equal_weights_alternate():
    queued = {"a": queue("a", 10), "b": queue("b", 10, start=100)}
    assert tenants(pick_fair(6, queued, {}, {}, {})) == ["a", "b", "a", "b", "a", "b"]


def test_weights_divide_capacity():
    queued = {"a": queue("a", 30), "b": queue("b", 30)}
    picked = tenants(pick_fair(12, queued, {}, {"a": 3.0, "b": 1.0}, {}))
    assert picked.count("a") == 9 and picked.count("b") == 3


def test_priority_beats_fair_share():
    queued = {"a": queue("a", 3, priority=90), "b": queue("b", 3, priority=10)}
    assert tenants(pick_fair(4, queued, {"a": 100}, {}, {})) == ["a", "a", "a", "b"]


def test_max_running_holds_a_tenant_back():
    queued = {"a": queue("a", 5), "b": queue("b", 1)}
    picked = pick_fair(5, queued, {"a": 1}, {}, {"a": 2})
    assert tenants(picked) == ["b", "a"]  # a reaches its limit of 2 with one more


def test_within_a_tenant_oldest_first():
    queued = {"a": queue("a", 3)}
    assert [c.render_id for c in pick_fair(3, queued, {}, {}, {})] == ["a0", "a1", "a2"]
