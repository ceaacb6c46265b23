"""The typed stream of one render attempt, from the replica that runs it to the
scheduler that records it: `RenderProgress` items while it runs, then exactly one of
`Done` (the MP4 and manifest are written) or `Preempted` (a checkpoint is written and
the render goes back to the queue). A failure ends the stream with an exception
instead. Replicas send these in lists (one list per wake-up, not per step)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from farm.domain.states import Stage


class PhaseTiming(NamedTuple):
    """Seconds one phase of one attempt ran on one kind of device (a tuple, so that
    `for phase, kind, seconds in timings` reads it as the ledger does)."""

    phase: str
    device_kind: str
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class RenderProgress:
    """A stage change or a finished denoising step (step counts from 1 across every
    candidate of the render), with what just finished timing."""

    stage: Stage
    step: int = 0
    total_steps: int = 0
    step_seconds: float = 0.0
    """The denoising step's seconds (charged per step as DENOISING on the attempt's device)."""
    at: float | None = None
    """Wall-clock time (epoch seconds) the replica saw it."""
    node: str | None = None
    """Where the render runs, on stage changes: a failed render is retried elsewhere."""
    finished_phases: tuple[PhaseTiming, ...] = ()
    """Phases that ended with this stage change, to be charged."""


@dataclasses.dataclass(frozen=True, slots=True)
class Preempted:
    """The attempt stopped at a step boundary for a more urgent render; its checkpoint is written."""

    checkpoint_uri: str
    step: int
    total_steps: int
    timings: tuple[PhaseTiming, ...]
    """The work done before the preemption, to be charged (the checkpoint write is not in it)."""
    checkpoint_seconds: float
    device_kind: str
    node: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """The attempt succeeded: its MP4 and manifest are written."""

    artifact_uri: str
    manifest_uri: str
    timings: tuple[PhaseTiming, ...]
    """Every phase of every candidate, scoring, post-processing, encoding and writing."""
    device_kind: str
    node: str | None
    frames: int
    seed: int
    """The seed of the candidate delivered."""
    quality: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] | None = None


EngineEvent = RenderProgress | Preempted | Done
