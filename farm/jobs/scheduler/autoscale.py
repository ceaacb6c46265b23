"""How many replicas each engine pool wants, from the work waiting for it.

Ray-free arithmetic, so it is unit-tested on its own; `farm.serve.autoscaling`
hands the result to Ray Serve.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PoolLoad:
    """What the scheduler knows about one pool when it decides its size."""

    key: str
    replicas: int
    """Replicas running now."""
    busy_replicas: int
    """Replicas with a render on them: never scaled away (Serve drains, but the farm does not ask)."""
    min_replicas: int
    max_replicas: int
    backlog_seconds: float
    """Estimated device-seconds of queued work routed to this pool."""
    backlog_target_s: float
    """The queued work should be done within this long."""
    cold_start_s: float
    """Measured (or assumed) seconds from asking for a replica to its first render."""


def wanted_replicas(load: PoolLoad) -> int:
    """ceil(backlog / time left after a cold start) new replicas' worth of work, plus
    the busy ones, within the pool's bounds. With nothing queued and nothing running
    the pool falls to its minimum (zero where configured)."""
    if load.backlog_seconds <= 0:
        return max(load.min_replicas, min(load.busy_replicas, load.max_replicas))
    # A replica that must first start has less of the target left to work in.
    starting = load.cold_start_s if load.replicas <= load.busy_replicas else 0.0
    window = max(load.backlog_target_s - starting, 0.1 * load.backlog_target_s)
    wanted = load.busy_replicas + math.ceil(load.backlog_seconds / window)
    return max(load.min_replicas, min(wanted, load.max_replicas))


def assign_backlog(
    renders: list[tuple[dict[str, float], str | None]],
    capacity: dict[str, int],
) -> dict[str, float]:
    """Spreads queued renders over pools: `renders` holds, per render, its estimated
    seconds on each pool that may run it, and the pool it requires (or None). A render
    goes to the pool where it would finish first given the work already assigned
    there and the pool's maximum replicas, so faster pools take more of the backlog.
    Returns seconds of work per pool."""
    assigned = {key: 0.0 for key in capacity}
    for seconds_on, required in renders:
        options = [required] if required else list(seconds_on)
        options = [key for key in options if key in assigned and key in seconds_on]
        if not options:
            continue
        best = min(options, key=lambda key: (assigned[key] + seconds_on[key]) / max(capacity[key], 1))
        assigned[best] += seconds_on[best]
    return assigned
