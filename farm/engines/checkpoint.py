"""Preemption at a denoising step boundary: stop a pipeline call after step k with its
state in a `DenoiseCheckpoint`, and later run only steps k+1..N from that state,
giving the frames of a render that was never interrupted.

diffusers pipelines compute their timesteps and run their loop inside `__call__`. The
engine does not copy those loops; for one call, `ResumableDenoising` wraps two methods
of that call's scheduler instance (and removes the wrappers afterwards):

- ``set_timesteps`` runs unchanged - the pipeline passes the same arguments as in the
  first attempt (sigmas and any shift come from the spec alone), so it computes the
  same schedule, which is compared bitwise with the one kept in the checkpoint - and
  then, on resume, keeps only the last N - k timesteps and sets the scheduler's begin
  index to k. The pipeline's loop then runs exactly the remaining timesteps, and the
  scheduler reads the same sigmas at each of them as the uninterrupted run did.
- ``step``, at its first call on resume, puts back the random generator's state as it
  was after step k - the draws after the pipeline's set-up (a scheduler's per-step
  noise, a VAE's decode noise) continue where the interrupted run stopped - and gives
  the scheduler what the pipeline's loop carries for it between steps rather than the
  scheduler itself (a DPM scheduler's previous x0 prediction and previous timestep). On
  every call it keeps that carried state, for a checkpoint after any step.

The set-up before the first step is redone on resume and must draw the same values or
none: the pipelines take the given latents as they are (times the scheduler's
``init_noise_sigma``, which must be 1) and draw no noise for them; an image-to-video
pipeline that encodes its image with the generator does so fresh from the seed, its
first draw in the first attempt too. Which pipeline classes meet this is stated by each
family module (``resumable_pipelines()``, `farm.families`).

A multistep scheduler (UniPC, DPM-Solver++ multistep) keeps its earlier model outputs
in itself: the checkpoint keeps every attribute its steps change (`MULTISTEP_STATE`) and
the first resumed step puts them back. A scheduler whose ``init_noise_sigma`` is not 1
(an Euler scheduler with Karras sigmas) has the pipeline scale given latents by it; on resume the
checkpoint's latents are already where step k left them, so for the resumed call the
scheduler reports 1 and the pipeline takes them as they are.

Schedulers (`checkpoint_support`): those the family modules name in
``FACTS.checkpoint_schedulers``, with what each carries between steps (`StepCarry`),
and none with ``stochastic_sampling``, whose noise comes from torch's global
generator. Any other scheduler makes the engine not preemptible.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
from typing import Any

import torch

from farm.domain.engine import CheckpointError, DenoiseCheckpoint, EngineRequest
from farm.families import StepCarry, checkpoint_schedulers

# Scheduler class name -> what it carries between steps outside itself.
SCHEDULER_KINDS: dict[str, StepCarry] = checkpoint_schedulers()
# A multistep scheduler's attributes that its steps change: the history it steps from.
MULTISTEP_STATE = ("model_outputs", "timestep_list", "lower_order_nums", "last_sample", "this_order",
                   "_step_index", "sample")


def checkpoint_support(pipeline) -> str | None:
    """Why a pipeline's scheduler state cannot be checkpointed and restored exactly, or None when it can.

    Whether the pipeline's own loop allows a resume is the family module's word (``resumable_pipelines()``).
    """
    scheduler = pipeline.scheduler
    name = type(scheduler).__name__
    if name not in SCHEDULER_KINDS:
        return f"its scheduler {name} is not one whose state farm can checkpoint ({sorted(SCHEDULER_KINDS)})"
    if getattr(scheduler, "order", 1) != 1:
        return f"its scheduler {name} takes {scheduler.order} model calls a step"
    if scheduler.config.get("stochastic_sampling", False):
        return f"its scheduler {name} samples noise from torch's global generator (stochastic_sampling)"
    if SCHEDULER_KINDS[name] == StepCarry.STEP_INDEXED and not hasattr(scheduler, "set_begin_index"):
        return f"its scheduler {name} cannot start at a later step (no set_begin_index)"
    return None


def checkpoint_spec(request: EngineRequest, weights_sha256: str, dtype: str) -> dict[str, Any]:
    """What decides a render's video, so a checkpoint is resumed only by the render it came from.

    Not render_id or attempt (a requeued attempt resumes its predecessor's checkpoint),
    nor post-processing (it runs after the engine).
    """
    return {
        "task": request.task.value,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "image_sha256": hashlib.sha256(request.image).hexdigest() if request.image else None,
        "width": request.width,
        "height": request.height,
        "num_frames": request.num_frames,
        "fps": request.fps,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "motion_bucket_id": request.motion_bucket_id,
        "noise_aug_strength": request.noise_aug_strength,
        "decode_chunk_size": request.decode_chunk_size,
        "adapters": [list(adapter) for adapter in request.adapters],
        "weights_sha256": weights_sha256,
        "dtype": dtype,
    }


def spec_fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_resumable(checkpoint: DenoiseCheckpoint, spec: dict[str, Any], generator_device: str) -> None:
    """Raises CheckpointError unless the checkpoint was made for this spec, on a compatible generator."""
    if checkpoint.fingerprint != spec_fingerprint(spec) or checkpoint.spec != spec:
        differing = sorted(key for key in spec.keys() | checkpoint.spec.keys()
                           if spec.get(key) != checkpoint.spec.get(key))
        shown = ", ".join(
            f"{key}: checkpoint {_short(checkpoint.spec.get(key))} != request {_short(spec.get(key))}"
            for key in differing
        ) or "fingerprints differ"
        raise CheckpointError(f"the checkpoint ({checkpoint.describe()}) belongs to another render spec: {shown}")
    if checkpoint.total_steps != spec["num_inference_steps"]:
        raise CheckpointError(
            f"the checkpoint has {checkpoint.total_steps} steps, the request {spec['num_inference_steps']}"
        )
    if checkpoint.generator_device != generator_device:
        raise CheckpointError(
            f"the checkpoint's random state is of a {checkpoint.generator_device} generator; this engine's "
            f"generator is on {generator_device}, whose state it cannot continue"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ResumableDenoising:
    """Context for one pipeline call: keeps what a checkpoint needs, and on resume starts at step k+1.

    Enter it around the pipeline call (the call must get the checkpoint's latents as
    ``latents`` and a generator seeded as in the first attempt); call `checkpoint` from
    ``callback_on_step_end`` to capture the state after a step.
    """

    def __init__(
        self, pipeline, generator: torch.Generator, total_steps: int, resume: DenoiseCheckpoint | None = None
    ):
        reason = checkpoint_support(pipeline)
        if reason is not None:
            raise CheckpointError(f"{type(pipeline).__name__} cannot be checkpointed: {reason}")
        self.scheduler = pipeline.scheduler
        self.kind = SCHEDULER_KINDS[type(self.scheduler).__name__]
        self.generator = generator
        self.total_steps = total_steps
        self.resume = resume
        self.start_step = resume.step if resume is not None else 0
        self._full_timesteps: torch.Tensor | None = None  # on the scheduler's device
        self._full_sigmas: torch.Tensor | None = None
        self._steps_called = 0
        self._carried_x0: torch.Tensor | None = None
        self._installed = False

    # The wrappers live on the scheduler instance only for the call; functools.wraps keeps
    # the signatures the pipelines inspect (retrieve_timesteps, prepare_extra_step_kwargs).
    def __enter__(self) -> ResumableDenoising:
        original_set_timesteps = self.scheduler.set_timesteps
        original_step = self.scheduler.step
        step_signature = inspect.signature(original_step)

        @functools.wraps(original_set_timesteps)
        def set_timesteps(*args, **kwargs):
            original_set_timesteps(*args, **kwargs)
            self._after_set_timesteps()

        @functools.wraps(original_step)
        def step(*args, **kwargs):
            if self._steps_called == 0 and self.resume is not None:
                args, kwargs = self._restore_before_first_step(step_signature, args, kwargs)
            self._steps_called += 1
            output = original_step(*args, **kwargs)
            if self.kind == StepCarry.DPM_CARRY:
                self._carried_x0 = output[1]
            return output

        self.scheduler.set_timesteps = set_timesteps
        self.scheduler.step = step
        self._original_class = type(self.scheduler)
        if self.resume is not None and getattr(self.scheduler, "init_noise_sigma", 1.0) != 1.0:
            # For this call only: the pipeline multiplies given latents by init_noise_sigma.
            self.scheduler.__class__ = type(self._original_class.__name__, (self._original_class,),
                                            {"init_noise_sigma": 1.0, "__module__": self._original_class.__module__})
        self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            del self.scheduler.set_timesteps
            del self.scheduler.step
            self.scheduler.__class__ = self._original_class
            self._installed = False

    def _after_set_timesteps(self) -> None:
        timesteps = self.scheduler.timesteps
        if len(timesteps) != self.total_steps:
            raise CheckpointError(
                f"{type(self.scheduler).__name__} made {len(timesteps)} timesteps for {self.total_steps} steps"
            )
        self._full_timesteps = timesteps
        sigmas = getattr(self.scheduler, "sigmas", None)
        self._full_sigmas = sigmas if isinstance(sigmas, torch.Tensor) else None
        if self.resume is None:
            return
        saved = self.resume.scheduler_state
        if saved.get("class") != type(self.scheduler).__name__:
            raise CheckpointError(
                f"the checkpoint was made with {saved.get('class')}, this pipeline runs {type(self.scheduler).__name__}"
            )
        for name, now in (("timesteps", self._full_timesteps), ("sigmas", self._full_sigmas)):
            kept = saved.get(name)
            if (kept is None) != (now is None) or (now is not None and not torch.equal(now.cpu(), kept)):
                raise CheckpointError(
                    f"the scheduler's {name} for this request differ from the checkpoint's: "
                    "another scheduler configuration or library version made it"
                )
        k = self.start_step
        self.scheduler.timesteps = timesteps[k:]
        if self.kind == StepCarry.STEP_INDEXED:
            self.scheduler.set_begin_index(k)

    def _restore_before_first_step(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        if self._full_timesteps is None:
            raise CheckpointError("the pipeline stepped its scheduler before setting its timesteps")
        self.generator.set_state(self.resume.generator_state)
        if self.kind == StepCarry.STEP_INDEXED:
            # Again: a pipeline may reset it to 0 after setting the timesteps.
            self.scheduler.set_begin_index(self.start_step)
        if self.kind == StepCarry.MULTISTEP:
            self._restore_multistep_state(signature.bind(*args, **kwargs).arguments["sample"].device)
        if self.kind != StepCarry.DPM_CARRY:
            return args, kwargs
        bound = signature.bind(*args, **kwargs)
        sample = bound.arguments["sample"]
        carried = self.resume.scheduler_state.get("old_pred_original_sample")
        if carried is None:
            raise CheckpointError("the checkpoint lacks the DPM scheduler's previous x0 prediction")
        bound.arguments["old_pred_original_sample"] = carried.to(sample.device)
        bound.arguments["timestep_back"] = self._full_timesteps[self.start_step - 1]
        return bound.args, bound.kwargs

    def _restore_multistep_state(self, device: torch.device) -> None:
        saved = self.resume.scheduler_state.get("multistep")
        if saved is None:
            raise CheckpointError("the checkpoint lacks the multistep scheduler's history")
        for name, value in saved.items():
            setattr(self.scheduler, name, _to_device(value, device))
        # Its step index counts over the whole schedule and its order reads the schedule's
        # length: the whole schedule goes back (the pipeline's loop keeps the remaining part).
        self.scheduler.timesteps = self._full_timesteps

    def checkpoint(
        self, step: int, latents: torch.Tensor, *, spec: dict[str, Any], model: str, device_kind: str, backend: str,
        cpu_threads: int | None = None,
    ) -> DenoiseCheckpoint:
        """The state after `step` (counted over the whole render), from ``callback_on_step_end``."""
        stepped = self.start_step + self._steps_called
        if step != stepped:
            raise RuntimeError(f"checkpoint asked after step {step}, but the scheduler has stepped to {stepped}")
        state: dict[str, Any] = {
            "class": type(self.scheduler).__name__,
            "timesteps": _cpu_copy(self._full_timesteps),
            "sigmas": _cpu_copy(self._full_sigmas),
        }
        if self.kind == StepCarry.DPM_CARRY:
            state["old_pred_original_sample"] = _cpu_copy(self._carried_x0)
        if self.kind == StepCarry.MULTISTEP:
            state["multistep"] = {name: _to_device(getattr(self.scheduler, name), "cpu")
                                  for name in MULTISTEP_STATE if hasattr(self.scheduler, name)}
        return DenoiseCheckpoint(
            step=step,
            total_steps=self.total_steps,
            fingerprint=spec_fingerprint(spec),
            spec=dict(spec),
            latents=_cpu_copy(latents),
            scheduler_state=state,
            generator_state=self.generator.get_state(),
            generator_device=self.generator.device.type,
            model=model,
            device_kind=device_kind,
            backend=backend,
            created_at=time.time(),
            cpu_threads=cpu_threads,
        )


def _to_device(value: Any, device) -> Any:
    """A copy of a scheduler attribute (tensors, lists of them, plain values) with its tensors on device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _cpu_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)
