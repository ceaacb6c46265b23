"""How the farm's handles pick replicas: an engine for a render (EngineRouter), a
post-processing replica for a chunk (ChunkRouter).

Ray Serve's default router probes two random replicas; a render farm has few replicas
and long requests, so both routers send each request to the replica with the fewest
requests outstanding from this router (`_AssignedRequests`), which also keeps an
urgent render from landing behind a busy replica while another is idle. EngineRouter
gives replicas on a quarantined node (`farm.jobs.scheduler.quarantine`) nothing; when
every one is, the request waits (Serve retries with backoff) until the quarantine ends
or the pool has grown replicas elsewhere. A render retried after an engine failed it
goes to a replica on another node when the pool has one, and where it failed when it
has not (it does not wait for one). That is a preference, not a promise: with several
requests waiting at once, FIFOMixin hands the replica found for one of them to the oldest."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from farm.serve.flags import fenced_here, fenced_nodes, node_id_prefix, on_fenced_node

log = logging.getLogger(__name__)
# The quarantine list is a GCS read; routing looks at it at most this often.
FENCE_TTL_S = 1.0


def least_assigned_in_turn(replicas: list, assigned: dict[str, int], turn: int) -> list[list]:
    """Ranks for one request: the replica with the fewest requests this router has sent
    it and not seen finish (ties taken in turn), then the others from least to most.
    Replicas are ordered by id first, so every call sees them in the same order."""
    ordered = sorted(replicas, key=lambda replica: replica.replica_id.unique_id)
    if len(ordered) < 2:
        return [ordered] if ordered else []
    first = turn % len(ordered)
    rotated = ordered[first:] + ordered[:first]
    ranked = sorted(rotated, key=lambda replica: assigned.get(replica.replica_id.unique_id, 0))
    return [ranked[:1], ranked[1:]]


class _AssignedRequests(FIFOMixin, RequestRouter):
    """Counts the requests this router sends to each replica until they finish.

    Serve's router picks the shortest queue it knows of, but it counts a request only
    once the request is sent, after the next one may already have been routed: requests
    sent at once (a clip's chunks, a burst of renders) often all landed on one replica
    while another idled. Here a request is counted when its replica is chosen: it goes
    to the replica with the fewest (in turn on ties); Serve skips that replica only when
    its queue is full, for the least loaded of the others.

    A request is counted on the replica chosen for it until Serve hands it a replica
    (the pending request's future), then on that one: first-in first-out (FIFOMixin)
    hands the replica found for one request to the oldest waiting, and a full replica
    sends a request to another. Requests are told apart by their pending request, not
    by Serve's internal id: the requests a replica makes while serving one (a clip's
    chunks) all carry that one's id."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turns = itertools.count()
        # id(pending request) -> (the replica chosen for it, the pending request)
        self._assigned: dict[int, tuple[str, PendingRequest]] = {}

    @staticmethod
    def _replica_of(chosen: str, pending: PendingRequest) -> str:
        """Where the request is: the replica Serve gave it, else the one chosen for it."""
        if pending.future.done() and not pending.future.cancelled():
            return pending.future.result().replica_id.unique_id
        return chosen

    def _rank(self, replicas: list[RunningReplica], pending_request: PendingRequest | None) -> list[list]:
        # A request cancelled before it was sent never completes on a replica: forget it.
        for key in [key for key, (_, pending) in self._assigned.items() if pending.future.cancelled()]:
            del self._assigned[key]
        if pending_request is not None:
            self._assigned.pop(id(pending_request), None)  # chosen again (a retry): counted where it goes now
        load = collections.Counter(self._replica_of(chosen, pending) for chosen, pending in self._assigned.values())
        ranks = least_assigned_in_turn(replicas, load, next(self._turns))
        if pending_request is not None and ranks:
            self._assigned[id(pending_request)] = (ranks[0][0].replica_id.unique_id, pending_request)
        return ranks

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        """Forgets one request with that id sent to that replica (several can share an id)."""
        sent = [key for key, (_, pending) in self._assigned.items()
                if pending.metadata.internal_request_id == internal_request_id and pending.future.done()
                and not pending.future.cancelled()]
        there = [key for key in sent if self._replica_of(*self._assigned[key]) == replica_id.unique_id]
        for key in (there or sent)[:1]:
            del self._assigned[key]


class EngineRouter(_AssignedRequests):
    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
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
        elsewhere, failed_there = split_by_failed_nodes(usable, avoided_nodes(pending_request))
        if not elsewhere:
            # No replica on another node: the render runs where it can rather than wait.
            return self._rank(failed_there, pending_request)
        # The rest come last, for when every replica elsewhere has a full queue.
        return [*self._rank(elsewhere, pending_request), *([failed_there] if failed_there else [])]


def avoided_nodes(pending_request: PendingRequest | None) -> tuple[str, ...]:
    """The nodes on which the render's earlier attempts failed (`EngineRequest.avoid_nodes`)."""
    if pending_request is None or not pending_request.args:
        return ()
    return tuple(getattr(pending_request.args[0], "avoid_nodes", ()) or ())


def split_by_failed_nodes(replicas: list, nodes: tuple[str, ...]) -> tuple[list, list]:
    """(replicas on other nodes, replicas on those nodes); nodes are named as the engine
    reports them (`host/<Ray node id prefix>`), replicas carry their full Ray node id."""
    if not nodes:
        return replicas, []
    failed = {node_id_prefix(node): 0.0 for node in nodes}
    there = [r for r in replicas if on_fenced_node(r.node_id, failed)]
    return [r for r in replicas if not any(r is t for t in there)], there


class ChunkRouter(_AssignedRequests):
    """Post-processing chunks: a clip's chunks go to different replicas (Serve's own
    choice often put a clip's two long chunks on one replica, doubling their
    post-processing; see benchmarks/RESULTS.md)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return self._rank(candidate_replicas, pending_request)
