"""Signals from the scheduler to the engine replica that runs a render.

A Serve handle routes each call to some replica, so the scheduler cannot call the
replica that holds a given render. It raises a flag in Ray's internal key-value
store instead (one small GCS write); the engine looks for the flag at its step
boundaries (a GCS read of microseconds next to a denoising step) and answers on
the render's own stream. Only `farm.serve` touches Ray's KV, through here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

NAMESPACE = "farm"


class RayKV:
    """Ray's internal key-value store (the GCS), in farm's namespace."""

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key.encode(), value, overwrite=True, namespace=NAMESPACE)

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key.encode(), namespace=NAMESPACE)

    def exists(self, key: str) -> bool:
        from ray.experimental import internal_kv

        return bool(internal_kv._internal_kv_exists(key.encode(), namespace=NAMESPACE))

    def delete(self, key: str, by_prefix: bool = False) -> int:
        """How many keys it deleted (of several callers, one deletes a key)."""
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_del(key.encode(), del_by_prefix=by_prefix, namespace=NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        return [key.decode() for key in internal_kv._internal_kv_list(prefix.encode(), namespace=NAMESPACE)]


class MemoryKV:
    """The same in one process's memory: the engine's signals tested without Ray."""

    def __init__(self):
        self._values: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._values[key] = value

    def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    def exists(self, key: str) -> bool:
        return key in self._values

    def delete(self, key: str, by_prefix: bool = False) -> int:
        with self._lock:
            gone = [k for k in self._values if k.startswith(key)] if by_prefix else [key] * (key in self._values)
            for k in gone:
                del self._values[k]
            return len(gone)

    def keys(self, prefix: str) -> list[str]:
        return [key for key in list(self._values) if key.startswith(prefix)]


kv: RayKV | MemoryKV = RayKV()


def _preempt_key(render_id: str, attempt: int) -> str:
    return f"preempt/{render_id}/{attempt}"


def request_preemption(render_id: str, attempt: int) -> None:
    """Asks the engine running this attempt to checkpoint at its next step and stop."""
    kv.put(_preempt_key(render_id, attempt), b"1")


def preemption_requested(render_id: str, attempt: int) -> bool:
    return kv.exists(_preempt_key(render_id, attempt))


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

    def look(self) -> bool:
        """Looks for the flag now (the render thread may ask between the thread's looks)."""
        try:
            if preemption_requested(self.render_id, self.attempt):
                self._raised.set()
        except Exception as error:  # noqa: BLE001 - an unreadable flag must not fail the render
            log.warning("render %s: cannot read the preemption flag: %s", self.render_id, error)
        return self._raised.is_set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s) and not self.look():
            pass

    def __enter__(self) -> PreemptionWatch:
        # One look before the render starts: the flag may have gone up while it waited.
        if not self.look():
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        if self._thread.is_alive():
            self._thread.join()


def clear_preemption(render_id: str, attempt: int) -> None:
    kv.delete(_preempt_key(render_id, attempt))


# The preemption flag is a GCS read, made this often while a preemptible render denoises:
# an urgent render waits at most this (and a layer) longer for its engine.
PREEMPT_CHECK_INTERVAL_S = 0.1


class KVPreemption:
    """The scheduler's preemption flags as a render attempt reads them
    (`farm.render.signals.PreemptionSignal`)."""

    def __init__(self, interval_s: float = PREEMPT_CHECK_INTERVAL_S):
        self.interval_s = interval_s

    def watch(self, render_id: str, attempt: int) -> PreemptionWatch:
        return PreemptionWatch(render_id, attempt, self.interval_s)

    def clear(self, render_id: str, attempt: int) -> None:
        clear_preemption(render_id, attempt)


# -- node quarantine (see farm.jobs.scheduler.quarantine) ---------------------------------
# One key per quarantined node, holding when its quarantine ends, so that it outlives a
# restarted scheduler and expires by itself. Nodes are named "<host>/<Ray node id
# prefix>" (`farm.serve.render_replica.node_name`); routers match replicas by the id prefix.
_FENCE_PREFIX = "fenced/"
# Fenced by this process (the scheduler's): its routers see them at once, not at their next read.
_fenced_here: dict[str, float] = {}


def node_id_prefix(node: str) -> str:
    return node.rsplit("/", 1)[-1]


def fence_node(node: str, until: float) -> None:
    kv.put(f"{_FENCE_PREFIX}{node_id_prefix(node)}", repr(until).encode())
    _fenced_here[node_id_prefix(node)] = until


def fenced_here(now: float) -> dict[str, float]:
    """The nodes this process fenced that are still in quarantine at `now`."""
    return {node: until for node, until in _fenced_here.items() if until > now}


def fenced_nodes(now: float) -> dict[str, float]:
    """Ray node id prefixes in quarantine at `now`, with when each one's ends."""
    fenced = {}
    for key in kv.keys(_FENCE_PREFIX):
        raw = kv.get(key)
        until = float(raw) if raw else 0.0
        if until > now:
            fenced[key[len(_FENCE_PREFIX):]] = until
    return fenced


def on_fenced_node(node_id: str | None, fenced: dict[str, float]) -> bool:
    return bool(node_id) and any(node_id.startswith(prefix) for prefix in fenced)


class ServeNodeFence:
    """The scheduler's `NodeFence` in a Ray cluster."""

    def exclude(self, node: str, until: float) -> None:
        fence_node(node, until)


# -- drills: holding a render at a step, or a chunk ----------------------------------------
# A test or a chaos drill makes a render "long enough" by holding it at a step until it is
# released, cancelled or preempted, instead of choosing a step count for the machine's
# speed; a post-processing chunk likewise, until released or its replica is killed.
# Replicas take holds only where this is set to 1 in their environment.
HOLDS_ENV = "FARM_CHAOS_HOLDS"
_HOLD_NEXT_PREFIX = "hold-next/"
_HELD_PREFIX = "held/"
CHUNKS = "chunks"
# A hold gives up after this long, so a drill that never releases cannot wedge a farm.
HOLD_TIMEOUT_S = 600.0
HOLD_POLL_S = 0.02


def hold_next_render(model: str, step: int, device_kind: str | None = None) -> None:
    """The next render of `model` that any replica (of the `device_kind` pool, if given)
    starts waits after denoising step `step` until `release`, a cancel or a preemption."""
    _arm(f"render/{model}/{device_kind}" if device_kind else f"render/{model}", step)


def hold_next_chunk() -> None:
    """The next chunk any post-processing replica takes waits before its work until
    `release`, or until its replica dies."""
    _arm(CHUNKS, 0)


def _arm(target: str, step: int) -> None:
    kv.put(f"{_HOLD_NEXT_PREFIX}{target}", str(step).encode())


def held() -> dict[str, dict]:
    """Holder (a render id, or a chunk's `chunk/<pid>`) -> {step, node, pid, waiting} of
    every hold taken and not yet over."""
    holds = {}
    for key in kv.keys(_HELD_PREFIX):
        raw = kv.get(key)
        if raw:
            holds[key[len(_HELD_PREFIX):]] = json.loads(raw)
    return holds


def clear_holds() -> None:
    """Takes back every hold not yet taken and releases every one taken (a drill's end)."""
    for prefix in (_HOLD_NEXT_PREFIX, _HELD_PREFIX):
        kv.delete(prefix, by_prefix=True)


def release(holder: str) -> None:
    kv.delete(f"{_HELD_PREFIX}{holder}")


class Hold:
    """A hold one render (after denoising step `step`) or one chunk took."""

    def __init__(self, holder: str, step: int, node: str):
        self.holder, self.step, self.node = holder, step, node
        self._key = f"{_HELD_PREFIX}{holder}"

    @classmethod
    def claim_render(cls, model: str, device_kind: str | None, render_id: str, node: str) -> Hold | None:
        pool_hold = cls._claim(f"render/{model}/{device_kind}", render_id, node) if device_kind else None
        return pool_hold or cls._claim(f"render/{model}", render_id, node)

    @classmethod
    def claim_chunk(cls, node: str) -> Hold | None:
        return cls._claim(CHUNKS, f"chunk/{os.getpid()}", node)

    @classmethod
    def _claim(cls, target: str, holder: str, node: str) -> Hold | None:
        """Takes the target's pending hold, if there is one; of replicas that race for
        it, exactly one deletes the key and wins."""
        key = f"{_HOLD_NEXT_PREFIX}{target}"
        raw = kv.get(key)
        if not raw or kv.delete(key) != 1:
            return None
        hold = cls(holder, int(raw), node)
        hold._record(waiting=False)
        return hold

    def _record(self, waiting: bool) -> None:
        value = {"step": self.step, "node": self.node, "pid": os.getpid(), "waiting": waiting}
        kv.put(self._key, json.dumps(value).encode())

    def _released(self) -> bool:
        return not kv.exists(self._key)

    def wait(self, interrupted: Callable[[], bool] = lambda: False) -> str:
        """Blocks this thread until released or `interrupted()` (a cancel or a
        preemption); says which."""
        self._record(waiting=True)
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._released():
                    return "released"
                if interrupted():
                    return "interrupted"
                time.sleep(HOLD_POLL_S)
            log.warning("%s: held for %.0f s without release; going on", self.holder, HOLD_TIMEOUT_S)
            return "timed out"
        finally:
            release(self.holder)


class RenderHolds:
    """The drills' holds on the renders of one pool's replica on `node`, as a render
    attempt claims them (`farm.render.signals.Holds`)."""

    def __init__(self, model: str, device_kind: str | None, node: str):
        self.model, self.device_kind, self.node = model, device_kind, node

    def claim(self, render_id: str) -> Hold | None:
        return Hold.claim_render(self.model, self.device_kind, render_id, self.node)
