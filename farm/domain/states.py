"""A render's states and stages, and which state changes are allowed."""

from __future__ import annotations

import enum


class RenderState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({RenderState.SUCCEEDED, RenderState.FAILED, RenderState.CANCELLED})

# RUNNING -> QUEUED is a lost lease (attempt + 1).
ALLOWED_TRANSITIONS: dict[RenderState, frozenset[RenderState]] = {
    RenderState.QUEUED: frozenset({RenderState.RUNNING, RenderState.CANCELLED, RenderState.FAILED}),
    RenderState.RUNNING: frozenset(
        {RenderState.QUEUED, RenderState.SUCCEEDED, RenderState.FAILED, RenderState.CANCELLED}
    ),
    RenderState.SUCCEEDED: frozenset(),
    RenderState.FAILED: frozenset(),
    RenderState.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    pass


def check_transition(current: RenderState, new: RenderState) -> None:
    if new not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(f"a render cannot go from {current.value} to {new.value}")


class Stage(enum.StrEnum):
    """Where a render is (the proto's Stage enum without its prefix), and the phases of
    an attempt that metering times and prices: every stage but NONE, and ENCODING."""

    NONE = ""
    LOADING = "LOADING"
    ENCODING_PROMPT = "ENCODING_PROMPT"
    DENOISING = "DENOISING"
    DECODING = "DECODING"
    POSTPROCESSING = "POSTPROCESSING"
    WRITING = "WRITING"
    ENCODING = "ENCODING"
    """The MP4 encode: a metering phase within the WRITING stage, never a render's stage."""


class AttemptOutcome(str, enum.Enum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    # The farm lost it (lease expired, replica died); it is requeued and not charged.
    LOST = "LOST"
    # A higher-priority render took its engine; it checkpointed and is requeued, charged
    # for the steps it did (the next attempt resumes from them, not from step 0).
    PREEMPTED = "PREEMPTED"
    # The engine failed it on one node; it is retried (on another node where it can be),
    # up to a limit of failed attempts.
    RETRIED = "RETRIED"
