"""Keeping a node that keeps failing renders out of its pools for a while.

A render that fails mid-way for a reason that is not its own (anything but a refused
spec), or whose replica dies under it, counts against the node it ran on. `failures`
different renders within `window_s` put the node in quarantine for `duration_s` (one
render failing there again counts once: a render that fails wherever it runs, retried on
the only node a farm has, must not close that node to everyone else): its engine
replicas get no renders (`farm.serve.routing`), their pools count them as unavailable
and ask for replacements, and renders go on elsewhere. The quarantine ends by itself;
a node that fails again goes back in. Times are wall-clock seconds, so the routers of
other processes can compare them."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class NodeQuarantine:
    def __init__(self, failures: int, window_s: float, duration_s: float, clock: Callable[[], float] = time.time):
        """failures: how many within `window_s` quarantine a node; 0 never does."""
        self.failures, self.window_s, self.duration_s = failures, window_s, duration_s
        self._clock = clock
        # node -> (when, which render) of its failures within the window, one per render
        self._failed_at: dict[str, collections.deque[tuple[float, str | None]]] = {}
        self._until: dict[str, float] = {}

    def record_failure(self, node: str, render_id: str | None = None) -> float | None:
        """Counts a failure of `render_id` on `node` (a render already counted there
        within the window is not counted again; None: always counted); returns when the
        node's quarantine ends if this one starts it (None while it is under the count,
        or already in quarantine)."""
        if not self.failures:
            return None
        now = self._clock()
        if self._until.get(node, 0.0) > now:
            return None
        recent = self._failed_at.setdefault(node, collections.deque())
        while recent and recent[0][0] <= now - self.window_s:
            recent.popleft()
        if render_id is not None and any(render == render_id for _, render in recent):
            return None
        recent.append((now, render_id))
        if len(recent) < self.failures:
            return None
        # The next quarantine needs a fresh run of failures, not the ones that caused this.
        recent.clear()
        self._until[node] = now + self.duration_s
        return self._until[node]

    def active(self) -> dict[str, float]:
        """Nodes in quarantine now, with when each one's ends."""
        now = self._clock()
        for node in [n for n, until in self._until.items() if until <= now]:
            del self._until[node]
        return dict(self._until)
