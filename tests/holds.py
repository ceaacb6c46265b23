"""Holding a render at a step, or a post-processing chunk, until the test lets it go:
what makes a render "long enough" to cancel, preempt, or kill a process under, whatever
the machine's speed.

Through a farm: `farm.serve.flags`' drills. The farm's replicas take holds because the
test farms start them with FARM_CHAOS_HOLDS=1; this process is a Ray driver of that
farm, so it reaches the same key-value store (`wait_held`).

Without Ray: a render attempt (`farm.render.attempt.AttemptRunner`) takes its holds and
its preemption signal as parameters; `LocalHolds` and `PreemptionFlags` are those of
this process, on threading events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from farm.serve import flags

# Start-up waits keep generous bounds: a hold is taken once a replica starts the render.
HOLD_TIMEOUT_S = 300.0
# How often a held render thread looks whether it was cancelled or preempted meanwhile.
INTERRUPT_POLL_S = 0.01


def wait_held(kind: str = "render", timeout: float = HOLD_TIMEOUT_S) -> tuple[str, dict]:
    """The holder (a render id, or `chunk/<pid>`) and its record, once one of `kind`
    ("render" or "chunk") is waiting at its hold."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for holder, record in flags.held().items():
            if record["waiting"] and holder.startswith("chunk/") == (kind == "chunk"):
                return holder, record
        time.sleep(0.05)
    raise TimeoutError(f"no {kind} took its hold within {timeout} s")


class LocalHold:
    """One hold after denoising step `step` (`farm.render.signals.Hold`), taken by the
    render `holder` once a render claims it."""

    def __init__(self, step: int):
        self.step = step
        self.holder: str | None = None
        self.waiting = threading.Event()
        """Set once the render waits at the hold (after its step)."""
        self._released = threading.Event()
        self.outcome: str | None = None

    def release(self) -> None:
        self._released.set()

    def wait(self, interrupted: Callable[[], bool]) -> str:
        self.waiting.set()
        self.outcome = "released"
        while not self._released.wait(INTERRUPT_POLL_S):
            if interrupted():
                self.outcome = "interrupted"
                break
        return self.outcome

    def wait_held(self, timeout: float = HOLD_TIMEOUT_S) -> str:
        """The holder, once it waits at the hold."""
        if not self.waiting.wait(timeout):
            raise TimeoutError(f"no render took the hold after step {self.step} within {timeout} s")
        return self.holder


class LocalHolds:
    """Drills' holds in this process (`farm.render.signals.Holds`): `hold_next(step)` holds
    the next render that starts."""

    def __init__(self):
        self._next: LocalHold | None = None
        self._lock = threading.Lock()

    def hold_next(self, step: int) -> LocalHold:
        hold = LocalHold(step)
        with self._lock:
            self._next = hold
        return hold

    def claim(self, render_id: str) -> LocalHold | None:
        with self._lock:
            hold, self._next = self._next, None
        if hold is not None:
            hold.holder = render_id
        return hold


class PreemptionFlags:
    """Preemptions raised in this process (`farm.render.signals.PreemptionSignal`)."""

    def __init__(self):
        self.raised: set[tuple[str, int]] = set()

    def request(self, render_id: str, attempt: int) -> None:
        self.raised.add((render_id, attempt))

    def watch(self, render_id: str, attempt: int) -> _Watch:
        return _Watch(self, (render_id, attempt))

    def clear(self, render_id: str, attempt: int) -> None:
        self.raised.discard((render_id, attempt))


class _Watch:
    def __init__(self, flags: PreemptionFlags, key: tuple[str, int]):
        self._flags, self._key = flags, key
        self._seen = False
        self._looking = True

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def look(self) -> bool:
        self._seen = self._seen or (self._looking and self._key in self._flags.raised)
        return self._seen

    def requested(self) -> bool:
        return self.look()

    def stop(self) -> None:
        self._looking = False
