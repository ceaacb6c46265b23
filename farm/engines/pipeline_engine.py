"""`DiffusersEngine`: one model's diffusers pipelines behind the `Engine` protocol.

A render runs in three phases, each timed on the device that ran it:

- Stage.ENCODING_PROMPT: the family's `encode_prompt` (the pipeline's own text encoding);
- Stage.DENOISING: the pipeline call with those embeddings and ``output_type="latent"``
  (this includes the pipeline's set-up, e.g. encoding the conditioning image);
- Stage.DECODING: the family's `decode_latents` (what the pipeline does after its loop)
  and the conversion to uint8 frames (`video_to_uint8_frames`: the bits the pipeline's
  video processor would give, without its clip-sized float copies).

The transformer runs on the model's configured backend (`farm.engines.backends`):
at load the engine prepares it (FP8 layers, First-Block Cache), enables VAE tiling if
configured, and loads and warms up the ahead-of-time builds it finds in the engine
cache (`farm.engines.build`). A render whose shape has no build runs eager with a note
in its output (and so in its manifest), or is refused, as the config says. Every
render reports the backend that actually ran it.

Cancellation is cooperative: after every denoising step the stop check runs; when
it says stop, the pipeline's ``_interrupt`` flag ends the loop (the diffusers
pattern) and, because the pipeline was asked for latents, nothing is decoded:
`RenderCancelled` is raised instead.

Preemption works the same way, with a checkpoint: when the optional `should_preempt`
check says so after step k of N (k < N; after the last step the render just finishes),
the loop ends, the latents, the scheduler's carried state and the generator's state
after step k go into a `DenoiseCheckpoint`, and `RenderPreempted` is raised, again
before any decode. With an eager transformer the check also runs before each of its
blocks' layers once a step of the call has finished: when it says so in the middle of
step k+1, the unfinished step is dropped (and not charged) and the checkpoint is the
state after step k - the scheduler and the generator do not move before the step's
transformer pass ends - so a preemption waits for one layer rather than a whole step.
A render given that checkpoint (`resume=`) encodes the prompt again,
starts from the checkpoint's latents and runs steps k+1..N on the same sigmas
(`farm.engines.checkpoint.ResumableDenoising`); its progress counts on from k+1 and its
frames equal the uninterrupted render's bitwise on the same device and backend (a resume
on another device kind or backend is within that backend's tolerance, and noted in the
output). With First-Block Cache the resumed first step always runs the whole transformer
(the cache's residuals are not checkpointed), so such a render is within the step cache's
tolerance, not bitwise. An engine whose pipelines cannot be resumed exactly (a scheduler
farm does not know, or one that keeps other state) has ``supports_checkpoint = False``
and ``describe()["preemptible"] = False``, never consults `should_preempt`, and refuses
a checkpoint: the scheduler must not preempt it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from farm.config import ModelConfig
from farm.domain.engine import (
    CheckpointError,
    DenoiseCheckpoint,
    EngineRequest,
    PhaseTiming,
    Progress,
    RenderCancelled,
    RenderOutput,
    RenderPreempted,
)
from farm.domain.spec import Task
from farm.domain.states import Stage
from farm.engines.adapters import AdapterCache, AdapterSource
from farm.engines.backends import ShapeBucket, create_backend
from farm.engines.backends.backend import (
    Runner,
    TransformerRouter,
    first_output,
    relative_error,
)
from farm.engines.backends.first_block_cache import (
    apply_first_block_cache,
    reset_first_block_cache,
)
from farm.engines.build import (
    BuildRecord,
    EngineBuildMissing,
    engine_key_fields,
    find_builds,
)
from farm.engines.checkpoint import (
    ResumableDenoising,
    checkpoint_spec,
    checkpoint_support,
    verify_resumable,
)
from farm.engines.hf_progress import no_progress_bars
from farm.engines.loading import (
    detect_device_kind,
    enable_vae_tiling,
    load_pipelines,
    local_model_dir,
    resolve_device,
    resolve_dtype,
    weights_sha256,
)
from farm.families import DecodedClip, family_module

log = logging.getLogger(__name__)


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounding as diffusers does when it makes PIL images."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def video_to_uint8_frames(video: torch.Tensor, denormalize: bool = True) -> np.ndarray:
    """A decoded video (1, C, F, H, W) in [-1, 1] -> uint8 frames (F, H, W, C), the same
    bits as the pipeline's ``postprocess_video(output_type="np")`` then `frames_to_uint8`.

    One frame at a time, on the video's device: those take the whole clip through three
    float copies as large as the clip (tens of MiB each, fresh from the allocator every
    render), where a frame's temporaries stay in cache; on a GPU only uint8 crosses to
    the host (a quarter of the bytes)."""
    clip = video[0]
    channels, count, height, width = clip.shape
    frames = torch.empty((count, height, width, channels), dtype=torch.uint8, device=clip.device)
    for index in range(count):
        frame = clip[:, index]
        if denormalize:
            frame = (frame * 0.5 + 0.5).clamp(0, 1)  # the processor's `denormalize`, in the video's dtype
        # float32 before scaling, as the processor's numpy conversion; round half to even, as numpy.
        frame = frame.float().clamp(0, 1).mul(255).round_()
        frames[index] = frame.permute(1, 2, 0)
    return frames.cpu().numpy()


class DiffusersEngine:
    """Serves one model (every task in its `sources`) on one device."""

    def __init__(self, model: ModelConfig):
        self.model = model
        self.model_name = model.name
        self.family = family_module(model.family)
        self.device = resolve_device(model.device)
        self.dtype = resolve_dtype(model.dtype, self.device)
        self.cpu_threads = model.cpu_threads or os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        self.device_kind = model.device_kind or detect_device_kind(self.device)
        # Checked before the weights load: a backend this device cannot run fails at once.
        self._backend = create_backend(model.backend, self.device, self.dtype)
        self._backend.check_available()
        with no_progress_bars():
            self.pipelines = load_pipelines(model, self.device, self.dtype)
        self.weights_sha256 = weights_sha256(
            [local_model_dir(source, model.revision) for source in sorted(set(model.sources.values()))]
        )
        self.adapters = self._adapter_cache()
        self._apply_backend()
        self.backend = self._with_step_cache(self._backend.label)
        self.fallback_backend = self._with_step_cache(self._backend.fallback_label)
        self._builds: dict[tuple[Task, ShapeBucket], Runner] = {}
        self.rejected_builds: list[str] = []
        if self._backend.builds_per_shape:
            self._load_builds()
        self.checkpoint_unsupported = self._checkpoint_unsupported()
        self.supports_checkpoint = self.checkpoint_unsupported is None
        # Pipelines keep per-call state (_interrupt, scheduler timesteps): one render at a time.
        self._render_lock = threading.Lock()

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        """The pipeline's denoising model (its transformer, or a UNet family's unet)."""
        return getattr(pipe, self.family.FACTS.denoiser)

    def _apply_backend(self) -> None:
        """Prepares each distinct denoiser once (a family's tasks may share one) and routes its calls."""
        config = self.model.backend
        transformers = {id(self.denoiser(pipe)): self.denoiser(pipe) for pipe in self.pipelines.values()}
        if config.first_block_cache_threshold is not None and self.family.FACTS.denoiser != "transformer":
            raise ValueError(f"model {self.model_name}: backend.first_block_cache_threshold applies to transformer "
                             f"families; {self.model.family.value} denoises with a {self.family.FACTS.denoiser}")
        if config.vae_tiling:
            for vae in {id(pipe.vae): pipe.vae for pipe in self.pipelines.values()}.values():
                enable_vae_tiling(vae)
        self._routers: dict[int, TransformerRouter] = {}
        for key, transformer in transformers.items():
            self._backend.prepare(transformer)
            if config.first_block_cache_threshold is not None:
                apply_first_block_cache(transformer, config.first_block_cache_threshold)
            self._routers[key] = TransformerRouter(transformer)

    def _adapter_cache(self) -> AdapterCache:
        """The model's LoRA adapters, loaded on first use. A compiled transformer takes them
        through hot-swap slots made before it compiles, so a switch never recompiles."""
        known = {a.name: AdapterSource(a.name, a.source, a.revision, a.weight_name) for a in self.model.adapters}
        hotswap = self.model.backend.name == "compile" and bool(known)
        cache = AdapterCache(self.pipelines, self.family.FACTS.denoiser, known,
                             max_bytes=self.model.adapter_cache_mib * 1024 * 1024, hotswap=hotswap)
        if hotswap:
            for pipe in {id(self.denoiser(p)): p for p in self.pipelines.values()}.values():
                cache.prepare_hotswap(pipe)
        return cache

    def _checkpoint_unsupported(self) -> str | None:
        """Why this engine cannot checkpoint and resume a render exactly, or None when it can."""
        resumable = self.family.resumable_pipelines()
        for task, pipe in self.pipelines.items():
            if type(pipe) not in resumable:
                return f"{type(pipe).__name__} ({task.value}) is not a pipeline whose loop farm can resume"
            reason = checkpoint_support(pipe)
            if reason is not None:
                return f"{type(pipe).__name__} ({task.value}): {reason}"
        return None

    def _with_step_cache(self, label: str) -> str:
        threshold = self.model.backend.first_block_cache_threshold
        return label if threshold is None else f"{label}+fbc{threshold:g}"

    def _load_builds(self) -> None:
        """Loads every matching build in the engine cache and warms it up on its own sample call."""
        cache_dir = self.model.backend.resolved_cache_dir
        threshold = self.model.backend.first_block_cache_threshold
        base_fields = engine_key_fields(self.weights_sha256, self._backend, threshold)
        for record in find_builds(cache_dir, base_fields):
            if record.task not in self.pipelines:
                continue
            try:
                runner = self._backend.load(self.denoiser(self.pipelines[record.task]), record.call_signature(),
                                            record.directory)
                error = self._warm_up(record, runner)
            except Exception as failure:  # noqa: BLE001 - a broken cached build must not stop the replica
                self._reject(record, f"it failed to load: {type(failure).__name__}: {failure}")
                continue
            tolerance = self._backend.tolerance
            if not error <= tolerance:
                self._reject(record, f"its warm-up differs from eager by {error:.3e} (tolerance {tolerance:.1e})")
                continue
            self._builds[(record.task, record.shape)] = runner
            log.info("%s: loaded %s build for %s %s", self.model_name, self.backend, record.task.value,
                     record.shape.describe())

    def _warm_up(self, record: BuildRecord, runner: Runner) -> float:
        """Runs the build on the call it was verified on; returns its error against that eager output."""
        transformer = self.denoiser(self.pipelines[record.task])
        arguments = record.sample_call(self.device)
        with torch.inference_mode(), transformer.cache_context("farm-warm-up"):
            for _ in range(self._backend.warmup_calls):
                output = first_output(runner(**arguments, return_dict=False))
            error = relative_error(output, record.reference_output())
        reset_first_block_cache(transformer)
        return error

    def _reject(self, record: BuildRecord, reason: str) -> None:
        message = (
            f"{record.backend} build for {record.task.value} {record.shape.describe()} at {record.directory} "
            f"is not used: {reason}"
        )
        log.error("%s: %s", self.model_name, message)
        self.rejected_builds.append(message)

    def built_shapes(self, task: Task) -> list[ShapeBucket]:
        """The shape buckets with a loaded build for a task."""
        return sorted(shape for built_task, shape in self._builds if built_task == Task(task))

    def _route(self, task: Task, shape: ShapeBucket) -> tuple[Runner | None, str, list[str]]:
        """The runner for a render (None: eager forward), the backend it amounts to, and notes."""
        if not self._backend.builds_per_shape:
            return None, self.backend, []
        runner = self._builds.get((Task(task), shape))
        if runner is not None:
            return runner, self.backend, []
        built = ", ".join(s.describe() for s in self.built_shapes(task)) or "none"
        missing = (
            f"no {self._backend.label} engine is built for {Task(task).value} at {shape.describe()} "
            f"(built for this task: {built})"
        )
        if self.model.backend.missing_build == "refuse":
            guidance = "" if shape.guided else " (batch 1: guidance off)"
            raise EngineBuildMissing(
                f"model {self.model_name}: {missing}; build it with `farm engines build --model {self.model_name} "
                f"--backend {self._backend.name} --shape {shape.spec}`{guidance}"
            )
        note = f"{missing}; it ran on {self.fallback_backend} instead"
        log.warning("%s: %s", self.model_name, note)
        return None, self.fallback_backend, [note]

    def pipeline(self, task: Task) -> DiffusionPipeline:
        """The loaded pipeline that serves a task."""
        try:
            return self.pipelines[Task(task)]
        except (KeyError, ValueError):
            raise ValueError(
                f"model {self.model_name} does not serve task {task!r} (it serves {[t.value for t in self.pipelines]})"
            ) from None

    def render(
        self,
        request: EngineRequest,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        should_preempt: Callable[[], bool] | None = None,
        resume: DenoiseCheckpoint | None = None,
        cpu_threads: int | None = None,
    ) -> RenderOutput:
        """Renders a request; see the module's docstring for cancellation, preemption and `resume`.
        `cpu_threads`: the threads for this render on a CPU device (None: the model's
        `cpu_threads`); a resume keeps the count its checkpoint was made with.

        Raises RenderCancelled, RenderPreempted (with the checkpoint), or CheckpointError
        for a checkpoint of another spec, seed, model or dtype (before any work).
        """
        pipe = self.pipeline(request.task)
        # Built first so that a request the pipeline cannot serve fails before any work.
        call_kwargs = self.family.call_kwargs(request, _conditioning_image(request))
        shape = ShapeBucket.for_render(request.width, request.height, request.num_frames, request.guidance_scale)
        runner, backend_used, notes = self._route(request.task, shape)
        denoiser = self.denoiser(pipe)
        router = self._routers[id(denoiser)]
        if not self.supports_checkpoint:
            if resume is not None:
                raise CheckpointError(
                    f"model {self.model_name} cannot resume a checkpoint: {self.checkpoint_unsupported}"
                )
            should_preempt = None
        spec = None
        if resume is not None or should_preempt is not None:
            spec = checkpoint_spec(request, self.weights_sha256, _dtype_name(self.dtype))
        threads = None
        if self.device.type == "cpu":
            threads = (resume.cpu_threads if resume is not None and resume.cpu_threads else None) \
                or cpu_threads or self.cpu_threads
        if resume is not None:
            verify_resumable(resume, spec, self.device.type)
            call_kwargs["latents"] = resume.latents.to(self.device)
            notes = notes + [self._resume_note(resume, backend_used)]
        with self._render_lock, self.adapters.applied(pipe, request.adapters) as adapters_used, \
                torch.inference_mode():
            if threads is not None:
                torch.set_num_threads(threads)
            # A render never reuses step-cache residuals of the one before (e.g. a cancelled one).
            reset_first_block_cache(denoiser)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            timings: list[PhaseTiming] = []
            if should_stop():
                raise RenderCancelled(timings, 0)

            on_progress(Progress(Stage.ENCODING_PROMPT))
            with self._timed(Stage.ENCODING_PROMPT, timings):
                prompt_kwargs = self.family.encode_prompt(pipe, request, self.device)
            if should_stop():
                raise RenderCancelled(timings, 0)

            total_steps = request.num_inference_steps
            on_progress(Progress(Stage.DENOISING, 0, total_steps))
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
            # Installed only when a checkpoint may be taken or is resumed; it wraps the scheduler for this call.
            denoising = ResumableDenoising(pipe, generator, total_steps, resume) if spec is not None else None
            first_step = resume.step if resume is not None else 0
            stopped_after_step: int | None = None
            checkpoint: DenoiseCheckpoint | None = None
            # The first step's time also holds the pipeline's set-up (noise, image latents).
            denoising_started = last_step_end = self._clock()
            # Where a preemption in the middle of a step goes back to: the last step boundary
            # of this call (its latents; the scheduler and generator have not moved since).
            boundary: dict[str, Any] = {}

            def on_step_end(pipeline: DiffusionPipeline, index: int, timestep, callback_kwargs: dict) -> dict:
                nonlocal stopped_after_step, checkpoint, last_step_end
                step = first_step + index + 1
                now = self._clock()
                on_progress(Progress(Stage.DENOISING, step, total_steps, now - last_step_end))
                last_step_end = now
                if stopped_after_step is not None or checkpoint is not None:
                    return {}
                if should_stop():
                    stopped_after_step = step
                    leave_loop(pipeline)
                elif should_preempt is not None and step < total_steps and should_preempt():
                    checkpoint = denoising.checkpoint(
                        step, callback_kwargs["latents"], spec=spec, model=self.model_name,
                        device_kind=self.device_kind, backend=backend_used, cpu_threads=threads,
                    )
                    leave_loop(pipeline)
                elif should_preempt is not None and step < total_steps:
                    boundary.update(step=step, latents=callback_kwargs["latents"], at=now)
                return {}

            def preempt_mid_step() -> bool:
                return bool(boundary) and should_preempt()

            # Eager transformers are also checked between their blocks' layers, so a
            # preemption waits for a layer, not a whole step (a compiled or exported
            # transformer runs as one piece, so it waits for the step's end).
            mid_step_checks = (preemptible_layers(self._preemption_points(denoiser), preempt_mid_step)
                               if should_preempt is not None and runner is None else contextlib.nullcontext())
            try:
                with (
                    self._timed(Stage.DENOISING, timings),
                    router.routed_to(runner),
                    denoising if denoising is not None else contextlib.nullcontext(),
                    mid_step_checks,
                ):
                    output = pipe(
                        **call_kwargs,
                        **prompt_kwargs,
                        generator=generator,
                        output_type="latent",
                        return_dict=False,
                        callback_on_step_end=on_step_end,
                        callback_on_step_end_tensor_inputs=["latents"],
                    )
            except LeftAtStepBoundary:
                timings.append(PhaseTiming(Stage.DENOISING, self.device_kind, last_step_end - denoising_started))
            except PreemptedMidStep:
                # The unfinished step is dropped, not charged: denoising counts to the boundary.
                timings.append(PhaseTiming(Stage.DENOISING, self.device_kind, boundary["at"] - denoising_started))
                checkpoint = denoising.checkpoint(
                    boundary["step"], boundary["latents"], spec=spec, model=self.model_name,
                    device_kind=self.device_kind, backend=backend_used, cpu_threads=threads,
                )
            if stopped_after_step is not None:
                raise RenderCancelled(timings, stopped_after_step)
            if checkpoint is not None:
                raise RenderPreempted(timings, checkpoint.step, checkpoint)

            on_progress(Progress(Stage.DECODING))
            with self._timed(Stage.DECODING, timings):
                clip = self._decode(pipe, output, request, generator)
                frames = video_to_uint8_frames(clip.video, pipe.video_processor.config.do_normalize)
                audio = None if clip.audio is None else clip.audio.float().cpu().numpy()
            peak_memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        expected_shape = (request.num_frames, request.height, request.width, 3)
        if frames.shape != expected_shape:
            raise RuntimeError(
                f"{self.model_name} decoded frames of shape {frames.shape}, not the requested {expected_shape}"
            )
        return RenderOutput(
            frames=frames,
            timings=timings,
            peak_memory_bytes=peak_memory,
            backend=backend_used,
            notes=notes,
            cpu_threads=threads,
            audio=audio,
            audio_sample_rate=clip.audio_sample_rate if audio is not None else None,
            adapters=adapters_used,
        )

    def _decode(self, pipe: DiffusionPipeline, output: tuple, request: EngineRequest,
                generator: torch.Generator) -> DecodedClip:
        """The family's decode of the pipeline's latent output: the whole output tuple to
        ``decode_output`` where the family has one, else its latents to ``decode_latents``."""
        decode_output = getattr(self.family, "decode_output", None)
        if decode_output is not None:
            decoded = decode_output(pipe, output, request, generator)
        else:
            decoded = self.family.decode_latents(pipe, output[0], request, generator)
        return decoded if isinstance(decoded, DecodedClip) else DecodedClip(video=decoded)

    def _preemption_points(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The layers before which a preemption may end a step early: a transformer's blocks
        and their direct layers, or a UNet's layers."""
        blocks = getattr(denoiser, "transformer_blocks", None) or getattr(denoiser, "blocks", None)
        if blocks is not None:
            return [module for block in blocks for module in (block, *block.children())]
        # A UNet: every resnet, attention, motion module and resampler of its stages (none of
        # them moves the scheduler or draws from the generator).
        stages = [*getattr(denoiser, "down_blocks", ()), *filter(None, [getattr(denoiser, "mid_block", None)]),
                  *getattr(denoiser, "up_blocks", ())]
        return [layer for stage in stages
                for name in ("resnets", "attentions", "motion_modules", "temporal_transformer_blocks",
                             "downsamplers", "upsamplers")
                for layer in (getattr(stage, name, None) or ())]

    def _resume_note(self, resume: DenoiseCheckpoint, backend: str) -> str:
        note = f"resumed after {resume.describe()}"
        if (resume.device_kind, resume.backend) != (self.device_kind, backend):
            note += f"; continued on {self.device_kind} with {backend}, so equal to an uninterrupted render only " \
                    "within the backends' tolerance, not bitwise"
        return note

    def check_health(self) -> None:
        """Runs a tiny computation on the device; raises if the device is unusable."""
        with torch.inference_mode():
            values = torch.arange(16, dtype=torch.float32, device=self.device)
            total = float((values * 2).sum().cpu())
        if total != 240.0:
            raise RuntimeError(f"device {self.device} computed {total} for a sum that is 240")

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "family": self.model.family.value,
            "sources": {task.value: source for task, source in self.model.sources.items()},
            "revision": self.model.revision,
            "weights_sha256": self.weights_sha256,
            "backend": self.backend,
            "backend_config": self.model.backend.model_dump(),
            "backend_details": self._backend.describe(),
            "built_shapes": {
                task.value: [shape.describe() for shape in self.built_shapes(task)] for task in self.pipelines
            },
            "rejected_builds": list(self.rejected_builds),
            "adapters": self.adapters.describe(),
            # Whether the scheduler may preempt this engine's renders (they resume from a checkpoint).
            "preemptible": self.supports_checkpoint,
            "checkpoint": {
                "supported": self.supports_checkpoint,
                "unsupported_reason": self.checkpoint_unsupported,
                "resume": (
                    None if not self.supports_checkpoint
                    else "bitwise" if self.model.backend.first_block_cache_threshold is None
                    else "within the step cache's tolerance"
                ),
            },
            "dtype": _dtype_name(self.dtype),
            "device": str(self.device),
            "device_kind": self.device_kind,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }

    def _clock(self) -> float:
        # CUDA work is asynchronous: wait for it, or the clock reads launch time, not run time.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def _timed(self, phase: str, timings: list[PhaseTiming]) -> Iterator[None]:
        start = self._clock()
        yield
        timings.append(PhaseTiming(phase=phase, device_kind=self.device_kind, seconds=self._clock() - start))


class LeftAtStepBoundary(Exception):
    """Raised from the step callback to leave a pipeline whose loop has no ``interrupt`` flag."""


def leave_loop(pipeline: DiffusionPipeline) -> None:
    """Ends the pipeline's denoising loop after the step just finished: through its
    ``_interrupt`` flag (the diffusers pattern: the remaining steps are skipped), or, for a
    pipeline whose loop never reads it, by leaving the call."""
    if hasattr(type(pipeline), "interrupt"):
        pipeline._interrupt = True
    else:
        raise LeftAtStepBoundary()


class PreemptedMidStep(Exception):
    """Raised between a transformer's layers to leave the pipeline call for a preemption."""


@contextlib.contextmanager
def preemptible_layers(layers: list[torch.nn.Module], should_stop: Callable[[], bool]) -> Iterator[None]:
    """While inside, each of the layers (a transformer's blocks and their attention and
    feed-forward layers, see `DiffusersEngine._preemption_points`) first asks `should_stop`
    and raises PreemptedMidStep when it says so. Nothing runs between the check and the
    raise, so the scheduler and the generator are as they were at the last step boundary."""

    def check(module, args):
        if should_stop():
            raise PreemptedMidStep()

    handles = []
    for module in layers:
        handles.append(module.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _conditioning_image(request: EngineRequest) -> Image.Image | None:
    if request.task != Task.IMAGE_TO_VIDEO:
        return None
    if not request.image:
        raise ValueError("an image-to-video render needs an image")
    try:
        with Image.open(io.BytesIO(request.image)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"the conditioning image cannot be read: {error}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
