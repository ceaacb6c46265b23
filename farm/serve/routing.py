"""How the farm's handles pick replicas: an engine for a render (EngineRouter), a
post-processing replica for a chunk (ChunkRouter).

Ray Serve's default router probes two random replicas; a render farm has few replicas
and long requests, so EngineRouter takes the least loaded of all of them (their queue
lengths are cached by Serve's router and probed only when stale), which also keeps an
urgent render from landing behind a busy replica while another is idle. Replicas on a
quarantined node (`farm.jobs.quarantine`) get nothing; when every replica is on one,
the request waits (Serve retries with backoff) until the quarantine ends or the pool
has grown replicas elsewhere."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from farm.serve.signals import fenced_here, fenced_nodes, on_fenced_node

log = logging.getLogger(__name__)
# The quarantine list is a GCS read; routing looks at it at most this often.
FENCE_TTL_S = 1.0


class EngineRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._fenced: dict[str, float] = {}
        self._fenced_read_at = float("-inf")

    def _current_fence(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._fenced_read_at >= FENCE_TTL_S:
            self._fenced_read_at = now
            try:
                self._fenced = fenced_nodes(time.time())
            except Exception:  # the GCS briefly unreachable: route on what was known
                log.warning("could not read the node quarantine list", exc_info=True)
        return {**self._fenced, **fenced_here(time.time())}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        fenced = self._current_fence()
        usable = [r for r in candidate_replicas if not on_fenced_node(r.node_id, fenced)]
        # One rank: Serve's router takes the shortest queue among them.
        return [usable] if usable else []


def in_turn(replicas: list, turn: int) -> list[list]:
    """Ranks for one request: the replica whose turn it is, then the others. Replicas
    are ordered by id, so every call sees them in the same order."""
    ordered = sorted(replicas, key=lambda replica: replica.replica_id.unique_id)
    if len(ordered) < 2:
        return [ordered] if ordered else []
    first = turn % len(ordered)
    return [[ordered[first]], ordered[first + 1:] + ordered[:first]]


class ChunkRouter(FIFOMixin, RequestRouter):
    """Post-processing replicas take chunks in turn.

    A clip's chunks are sent at once. Serve's router picks the shortest queue it knows
    of, but it counts a request only once the request is sent, after the next one may
    already have been routed: both halves of a clip often landed on one replica while
    the other idled (in 3 to 5 of 10 idle renders of farm_overhead.py, doubling their
    post-processing). In turn, a clip's chunks go to different replicas; a replica whose
    queue is full is skipped for the least loaded of the others."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turns = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return in_turn(candidate_replicas, next(self._turns))
