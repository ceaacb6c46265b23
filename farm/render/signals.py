"""What a render attempt is told from outside while it runs: that a more urgent render
wants its engine (a preemption), and, in drills and tests, to wait after a denoising
step (a hold). The attempt takes both as parameters; the Serve replica gives it the ones
that read Ray's key-value store (`farm.serve.flags`), tests give it ones in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from farm.domain.engine import Progress
from farm.domain.states import Stage

log = logging.getLogger(__name__)


class PreemptionWatch(Protocol):
    """Looks for one attempt's preemption while it denoises (a context manager: it
    looks from `__enter__` to `__exit__`)."""

    def __enter__(self) -> PreemptionWatch: ...

    def __exit__(self, *exc_info) -> None: ...

    def requested(self) -> bool:
        """Whether a preemption was seen; cheap, since the engine asks between layers."""
        ...

    def look(self) -> bool:
        """Looks for the preemption now; says whether there is one."""
        ...

    def stop(self) -> None:
        """Stops looking: the render is past its last preemption point."""
        ...


class PreemptionSignal(Protocol):
    """Where an attempt learns that it is to give its engine up."""

    def watch(self, render_id: str, attempt: int) -> PreemptionWatch: ...

    def clear(self, render_id: str, attempt: int) -> None:
        """Lowers the attempt's preemption once its checkpoint is written."""
        ...


class Hold(Protocol):
    """A drill's hold one render took: it waits after denoising step `step`."""

    holder: str
    step: int

    def wait(self, interrupted: Callable[[], bool]) -> str:
        """Blocks the render thread until released or `interrupted()` (a cancel or a
        preemption); says which."""
        ...


class Holds(Protocol):
    """Drills' holds on renders: a render claims the pending one, if any, as it starts."""

    def claim(self, render_id: str) -> Hold | None: ...


def held(on_progress: Callable[[Progress], None], hold: Hold | None, interrupted: Callable[[], bool]):
    """on_progress, waiting after the hold's denoising step (when there is a hold)."""
    if hold is None:
        return on_progress

    def progress(event: Progress) -> None:
        on_progress(event)
        if event.stage == Stage.DENOISING and event.step == hold.step:
            log.info("render %s: held after step %d by a drill", hold.holder, hold.step)
            outcome = hold.wait(interrupted)
            log.info("render %s: hold after step %d ended (%s)", hold.holder, hold.step, outcome)

    return progress
