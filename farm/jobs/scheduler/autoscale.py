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
        options = _options(seconds_on, required, assigned)
        if options:
            _place_one(assigned, capacity, options, seconds_on)
    return assigned


def assign_grouped_backlog(
    groups: list[tuple[dict[str, float], str | None, int]],
    capacity: dict[str, int],
) -> dict[str, float]:
    """`assign_backlog` for renders that come in groups of alike ones: per group, the
    seconds of one of them on each pool that may run it, the pool they require (or
    None), and how many there are. Each render still goes where it would finish first,
    but in an order of their own rather than the queue's: renders with one pool to go
    to first, then the others largest first (the longest-first rule of list scheduling),
    so the result depends on what is queued, not on when it was. A group of any size
    costs a few steps per pool (`_spread`). Returns seconds of work per pool."""
    assigned = {key: 0.0 for key in capacity}
    flexible = []
    for seconds_on, required, count in groups:
        options = _options(seconds_on, required, assigned)
        if not options or count <= 0:
            continue
        if len(options) == 1:
            assigned[options[0]] += seconds_on[options[0]] * count
        else:
            flexible.append((options, seconds_on, count))
    # (A stable sort: alike sizes keep the order they came in.)
    flexible.sort(key=lambda group: -min(group[1][key] for key in group[0]))
    for options, seconds_on, count in flexible:
        _spread(assigned, capacity, options, seconds_on, count)
    return assigned


def _options(seconds_on: dict[str, float], required: str | None, assigned: dict[str, float]) -> list[str]:
    options = [required] if required else list(seconds_on)
    return [key for key in options if key in assigned and key in seconds_on]


def _place_one(assigned: dict[str, float], capacity: dict[str, int], options: list[str],
               seconds_on: dict[str, float]) -> str:
    best = min(options, key=lambda key: (assigned[key] + seconds_on[key]) / max(capacity[key], 1))
    assigned[best] += seconds_on[best]
    return best


def _spread(assigned: dict[str, float], capacity: dict[str, int], options: list[str],
            seconds_on: dict[str, float], count: int) -> None:
    """Places `count` alike renders as `_place_one` would, one after another, without
    the loop: one after another, each takes the smallest of the pools' next finishing
    times (work + j * seconds) / replicas, so the count of them is the count smallest
    such times. Below the water level (the time at which the count fit, were renders
    divisible) every pool's share is known; the last few, one per pool or two, are
    placed one by one."""
    seconds = {key: seconds_on[key] for key in options}
    if min(seconds.values()) <= 0:
        # Free on some pool: once that pool is the best, it stays the best for the rest.
        for _ in range(count):
            if seconds[_place_one(assigned, capacity, options, seconds_on)] <= 0:
                break
        return
    replicas = {key: max(capacity[key], 1) for key in options}
    # Pools join below the level in the order of their finishing time now.
    joined = sorted(options, key=lambda key: assigned[key] / replicas[key])
    rate = offset = 0.0
    for index, key in enumerate(joined):
        rate += replicas[key] / seconds[key]
        offset += assigned[key] / seconds[key]
        level = (count + offset) / rate
        if index + 1 == len(joined) or assigned[joined[index + 1]] / replicas[joined[index + 1]] >= level:
            break
    placed = 0
    for key in joined:
        # One fewer than the level allows: rounding can never place one too many.
        share = max(0, math.floor((level * replicas[key] - assigned[key]) / seconds[key]) - 1)
        share = min(share, count - placed)
        assigned[key] += seconds[key] * share
        placed += share
    for _ in range(count - placed):
        _place_one(assigned, capacity, options, seconds_on)
