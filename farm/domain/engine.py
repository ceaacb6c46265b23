"""What every engine offers the inference plane, and what it hands back.

The scheduler and the Serve deployment talk to an engine only through `Engine`:
`render` (with a progress sink, a stop check, and optionally a preemption check and
a checkpoint to resume from) and `check_health`.

Preemption: when `should_preempt` says so at a step boundary, an engine that
`supports_checkpoint` stops there and raises `RenderPreempted` with a
`DenoiseCheckpoint`; a later render of the same spec given that checkpoint runs only
the remaining steps and returns the frames the uninterrupted render would have.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from farm.domain.events import PhaseTiming
from farm.domain.spec import ResolvedPostprocess, Task

if TYPE_CHECKING:
    import torch

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
    estimated_memory_bytes: int | None = None
    """The GPU memory the gateway estimated for it (`farm.planning.memory`); the manifest
    puts it beside the measured peak, so each GPU render checks the estimate."""
    avoid_nodes: tuple[str, ...] = ()
    """Nodes on which an engine failed the render's earlier attempts: the engine router
    (`farm.serve.routing`) sends it to a replica elsewhere when the pool has one."""
    trace_parent: str | None = None
    """W3C traceparent of the attempt's span (tracing on): the engine's spans go under it."""
    motion_bucket_id: int | None = None
    """Image-to-video motion conditioning of the families that take it; None: the family's default."""
    noise_aug_strength: float | None = None
    """Noise added to the conditioning image (motion conditioning); None: the family's default."""
    decode_chunk_size: int | None = None
    """Frames the VAE decodes at once (motion conditioning); None: the family's default."""
    adapters: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (name from the config, weight) applied for this render."""


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
    cpu_threads: int | None = None
    """The CPU threads the render ran with (CPU devices); goes into the manifest."""
    audio: np.ndarray | None = None
    """float32 waveform (channels, samples) in [-1, 1] of the families that make sound, as
    long as the video (num_frames / fps); None for a silent render."""
    audio_sample_rate: int | None = None
    adapters: list[dict] = dataclasses.field(default_factory=list)
    """The LoRA adapters that ran (name, source, weight, sha256); goes into the manifest."""


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """One seed's rendered frames, handed from the render thread to the attempt."""

    seed: int
    output: RenderOutput


class RenderCancelled(Exception):
    """The stop check said stop; raised at a step boundary, before any VAE decode."""

    def __init__(self, timings: list[PhaseTiming], step: int):
        super().__init__(f"cancelled after step {step}")
        self.timings = timings
        self.step = step


# The "format" entry of every serialized checkpoint; bump it on any change of layout.
CHECKPOINT_FORMAT = "farm-denoise-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that this request or engine must not resume
    (another spec, seed, model or dtype): resuming it would not give the render's video."""


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseCheckpoint:
    """The denoising state of one render after `step` of its `total_steps` steps.

    Everything the remaining steps depend on that a fresh call of the pipeline would
    not compute identically on its own: the latents after step `step`, the scheduler's
    carried state, and the random generator's state. Prompt embeddings, image latents
    and the sigma schedule are recomputed on resume (they are deterministic); the full
    schedule is kept too, and a resume whose recomputed schedule differs is refused.

    `spec` holds the fields that decide the video (prompt, size, steps, seed, the image's
    sha256, the weights' sha256, the dtype) and `fingerprint` their sha256: a checkpoint
    is only ever resumed by a request with the same fingerprint.
    """

    step: int
    """Denoising steps already done (1 <= step < total_steps)."""
    total_steps: int
    fingerprint: str
    spec: dict[str, Any]
    latents: torch.Tensor
    """The latents after step `step`, as the pipeline holds them (packed, where the family's pipeline packs them), on the CPU."""
    scheduler_state: dict[str, Any]
    """The scheduler's class, its full timestep (and sigma) schedule, and any state it carries
    between steps (e.g. a DPM scheduler's previous x0 prediction); tensors on the CPU."""
    generator_state: torch.Tensor
    """`torch.Generator.get_state()` after step `step` (the noise of later steps and of the decode)."""
    generator_device: str
    """The device type of that generator ("cpu", "cuda"): their states do not transfer."""
    model: str
    device_kind: str
    """Where the checkpoint was made; a resume elsewhere is allowed but noted (not bitwise then)."""
    backend: str
    created_at: float
    cpu_threads: int | None = None
    """The CPU threads the steps ran with (CPU devices): the resume uses as many, since a
    thread count can change how a reduction splits its sums, and so the last bits."""

    def __post_init__(self) -> None:
        if not 0 < self.step < self.total_steps:
            raise CheckpointError(
                f"a checkpoint is taken between steps: step must be in 1..{self.total_steps - 1}, got {self.step}"
            )

    def to_bytes(self) -> bytes:
        """The checkpoint as one `torch.save` payload (plain types and tensors only)."""
        import torch

        payload = {"format": CHECKPOINT_FORMAT}
        payload.update({field.name: getattr(self, field.name) for field in dataclasses.fields(self)})
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DenoiseCheckpoint:
        """Reads `to_bytes` output (with torch's `weights_only` loader: no code runs); raises CheckpointError."""
        import torch

        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable payload is one kind of failure here
            raise CheckpointError(f"not a readable denoising checkpoint: {type(error).__name__}: {error}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"not a denoising checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
        names = [field.name for field in dataclasses.fields(cls) if field.name in payload]
        missing = [field.name for field in dataclasses.fields(cls)
                   if field.name not in payload and field.default is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"denoising checkpoint lacks {missing}")
        return cls(**{name: payload[name] for name in names})

    def describe(self) -> str:
        return f"step {self.step} of {self.total_steps} ({self.model} on {self.device_kind}, {self.backend})"


class RenderPreempted(Exception):
    """The preemption check said yield; raised at a step boundary (after `step` of N steps,
    step < N), before any VAE decode, with the state to resume from."""

    def __init__(self, timings: list[PhaseTiming], step: int, checkpoint: DenoiseCheckpoint):
        super().__init__(f"preempted after step {step} of {checkpoint.total_steps}")
        self.timings = timings
        self.step = step
        self.checkpoint = checkpoint


class Engine(Protocol):
    model_name: str
    device_kind: str
    backend: str
    weights_sha256: str
    supports_checkpoint: bool
    """Whether `should_preempt` is honoured; an engine that cannot checkpoint never consults it."""

    def render(
        self,
        request: EngineRequest,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        should_preempt: Callable[[], bool] | None = None,
        resume: DenoiseCheckpoint | None = None,
        cpu_threads: int | None = None,
    ) -> RenderOutput:
        """Renders the request; `resume` (a checkpoint of this request's spec) skips the steps it holds.
        `cpu_threads`: threads for this render on a CPU device (None: the model's)."""
        ...

    def check_health(self) -> None: ...

    def describe(self) -> dict:
        """Model source, weights hash, backend, dtype, device, library versions (for manifests)."""
        ...
