"""Signals from the scheduler to the engine replica that runs a render.

A Serve handle routes each call to some replica, so the scheduler cannot call the
replica that holds a given render. It raises a flag in Ray's internal key-value
store instead (one small GCS write); the engine looks for the flag at its step
boundaries (a GCS read of microseconds next to a denoising step) and answers on
the render's own stream. Only `farm.serve` touches Ray's KV, through here.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

NAMESPACE = "farm"


def _preempt_key(render_id: str, attempt: int) -> bytes:
    return f"preempt/{render_id}/{attempt}".encode()


def request_preemption(render_id: str, attempt: int) -> None:
    """Asks the engine running this attempt to checkpoint at its next step and stop."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_preempt_key(render_id, attempt), b"1", overwrite=True, namespace=NAMESPACE)


def preemption_requested(render_id: str, attempt: int) -> bool:
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_exists(_preempt_key(render_id, attempt), namespace=NAMESPACE))


class PreemptionWatch:
    """Looks for the preemption flag of one attempt every `interval_s`, in a thread of its
    own while the render runs, so the engine's check between layers costs a memory read
    and the render thread never waits on the GCS."""

    def __init__(self, render_id: str, attempt: int, interval_s: float):
        self.render_id, self.attempt, self.interval_s = render_id, attempt, interval_s
        self._raised = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"preempt-watch-{render_id}", daemon=True)

    def requested(self) -> bool:
        return self._raised.is_set()

    def stop(self) -> None:
        """Stops looking (the thread ends within one interval)."""
        self._stop.set()

    def _look(self) -> bool:
        try:
            if preemption_requested(self.render_id, self.attempt):
                self._raised.set()
        except Exception as error:  # noqa: BLE001 - an unreadable flag must not fail the render
            log.warning("render %s: cannot read the preemption flag: %s", self.render_id, error)
        return self._raised.is_set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s) and not self._look():
            pass

    def __enter__(self) -> PreemptionWatch:
        # One look before the render starts: the flag may have gone up while it waited.
        if not self._look():
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        if self._thread.is_alive():
            self._thread.join()


def clear_preemption(render_id: str, attempt: int) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_preempt_key(render_id, attempt), namespace=NAMESPACE)


# -- node quarantine (see farm.jobs.quarantine) -------------------------------------------
# One key per quarantined node, holding when its quarantine ends, so that it outlives a
# restarted scheduler and expires by itself. Nodes are named "<host>/<Ray node id
# prefix>" (`farm.serve.engine.node_name`); routers match replicas by the id prefix.
_FENCE_PREFIX = "fenced/"
# Fenced by this process (the scheduler's): its routers see them at once, not at their next read.
_fenced_here: dict[str, float] = {}


def node_id_prefix(node: str) -> str:
    return node.rsplit("/", 1)[-1]


def fence_node(node: str, until: float) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(f"{_FENCE_PREFIX}{node_id_prefix(node)}".encode(), repr(until).encode(),
                                 overwrite=True, namespace=NAMESPACE)
    _fenced_here[node_id_prefix(node)] = until


def fenced_here(now: float) -> dict[str, float]:
    """The nodes this process fenced that are still in quarantine at `now`."""
    return {node: until for node, until in _fenced_here.items() if until > now}


def fenced_nodes(now: float) -> dict[str, float]:
    """Ray node id prefixes in quarantine at `now`, with when each one's ends."""
    from ray.experimental import internal_kv

    fenced = {}
    for key in internal_kv._internal_kv_list(_FENCE_PREFIX, namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        until = float(raw) if raw else 0.0
        if until > now:
            fenced[key.decode()[len(_FENCE_PREFIX):]] = until
    return fenced


def on_fenced_node(node_id: str | None, fenced: dict[str, float]) -> bool:
    return bool(node_id) and any(node_id.startswith(prefix) for prefix in fenced)


class ServeNodeFence:
    """The scheduler's `NodeFence` in a Ray cluster."""

    def exclude(self, node: str, until: float) -> None:
        fence_node(node, until)
