"""Which queued renders get the free engine slots: priority class first; within a
class, the tenant using least of its weighted share of running renders; within a
tenant, the oldest. So one tenant's backlog of thousands cannot starve another's
single render, and urgent work still goes first."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt


@dataclasses.dataclass(frozen=True)
class Candidate:
    render_id: str
    tenant_id: str
    priority: int
    created_at: dt.datetime


def pick_fair(
    slots: int,
    queued: dict[str, list[Candidate]],
    running: dict[str, int],
    weights: dict[str, float],
    max_running: dict[str, int | None],
) -> list[Candidate]:
    """`queued[tenant]` is that tenant's queue, best first (priority, then age).
    Returns up to `slots` renders in the order they should start."""
    heads = {tenant: collections.deque(queue) for tenant, queue in queued.items() if queue}
    running = collections.Counter(running)
    picked: list[Candidate] = []
    while len(picked) < slots:
        eligible = [
            tenant for tenant, queue in heads.items()
            if queue and (max_running.get(tenant) is None or running[tenant] < max_running[tenant])
        ]
        if not eligible:
            break
        chosen = min(eligible, key=lambda tenant: (
            -heads[tenant][0].priority,
            running[tenant] / max(weights.get(tenant, 1.0), 1e-9),
            heads[tenant][0].created_at,
            heads[tenant][0].render_id,
        ))
        picked.append(heads[chosen].popleft())
        running[chosen] += 1
    return picked
