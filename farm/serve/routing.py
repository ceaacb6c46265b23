"""How an engine deployment's handle picks a replica for a render.

Ray Serve's default router probes two random replicas; a render farm has few replicas
and long requests, so this one takes the least loaded of all of them (their queue
lengths are cached by Serve's router and probed only when stale), which also keeps an
urgent render from landing behind a busy replica while another is idle. Replicas on a
quarantined node (`farm.jobs.quarantine`) get nothing; when every replica is on one,
the request waits (Serve retries with backoff) until the quarantine ends or the pool
has grown replicas elsewhere."""

from __future__ import annotations

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
