"""What every engine offers the inference plane, and what it hands back.

The scheduler and the Serve deployment talk to an engine only through `Engine`:
`render` (with a progress sink and a stop check) and `check_health`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from farm.config import Task
from farm.jobs.spec import ResolvedPostprocess

# Stage names; the same strings as the proto's Stage enum without the prefix.
LOADING = "LOADING"
ENCODING_PROMPT = "ENCODING_PROMPT"
DENOISING = "DENOISING"
DECODING = "DECODING"
POSTPROCESSING = "POSTPROCESSING"
WRITING = "WRITING"
# Metering phase for MP4 encoding (part of the WRITING stage).
ENCODING = "ENCODING"


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One attempt of one render, with every spec default already filled in."""

    render_id: str
    attempt: int
    task: Task
    prompt: str
    negative_prompt: str
    image: bytes | None
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    postprocess: ResolvedPostprocess | None = None
    """What happens to the frames after the engine (None: encoding with the defaults)."""
    resume_from: str | None = None
    """URI of a denoising checkpoint left by a preempted attempt: resume after its step."""


@dataclasses.dataclass(frozen=True)
class PhaseTiming:
    """Seconds one phase of one attempt ran on one kind of device."""

    phase: str
    device_kind: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Progress:
    """A stage change, or a finished denoising step (step counts from 1)."""

    stage: str
    step: int = 0
    total_steps: int = 0
    step_seconds: float = 0.0


@dataclasses.dataclass
class RenderOutput:
    frames: np.ndarray
    """uint8 array of shape (num_frames, height, width, 3)."""
    timings: list[PhaseTiming]
    peak_memory_bytes: int | None = None
    backend: str | None = None
    """The backend that actually ran this render's transformer (e.g. onnx-cpu-float32, or the
    eager fallback when its shape had no engine build); goes into the manifest."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Warnings for the manifest, e.g. that the render fell back to eager and why."""


class RenderCancelled(Exception):
    """The stop check said stop; raised at a step boundary, before any VAE decode."""

    def __init__(self, timings: list[PhaseTiming], step: int):
        super().__init__(f"cancelled after step {step}")
        self.timings = timings
        self.step = step


class Engine(Protocol):
    model_name: str
    device_kind: str
    backend: str
    weights_sha256: str

    def render(
        self,
        request: EngineRequest,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
    ) -> RenderOutput: ...

    def check_health(self) -> None: ...

    def describe(self) -> dict:
        """Model source, weights hash, backend, dtype, device, library versions (for manifests)."""
        ...
