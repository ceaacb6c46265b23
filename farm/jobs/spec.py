"""Render specs: what a client asks for, and the checks that turn it into a spec an
engine can run (every default filled in, every field within its model's limits)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import secrets

from farm.config import ModelConfig, Task
from farm.errors import FieldViolation, InvalidArgument

MAX_SEED = 2**63 - 1
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 100, 50
MAX_LABELS = 32
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
MAX_LABEL_VALUE_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 128


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """A spec as the client sent it; None means "the model's default"."""

    model: str
    task: Task | None
    prompt: str = ""
    negative_prompt: str = ""
    image: bytes = b""
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    priority: int | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    idempotency_key: str = ""

    def fingerprint(self) -> str:
        """Identifies the request as sent, for idempotency: the same key with a
        different spec is refused rather than silently answered with another render."""
        data = dataclasses.asdict(self)
        data["image"] = hashlib.sha256(self.image).hexdigest()
        data["task"] = self.task.value if self.task else None
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    """A checked spec with every default filled in. `image` travels separately in the
    store, so `to_json` never carries it."""

    model: str
    task: Task
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    priority: int
    labels: dict[str, str]
    idempotency_key: str
    image: bytes = b""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("image")
        data["task"] = self.task.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, image: bytes | None = None) -> "ResolvedSpec":
        data = json.loads(text)
        data["task"] = Task(data["task"])
        return cls(**data, image=image or b"")



def resolve_spec(spec: RenderSpec, models: dict[str, ModelConfig]) -> ResolvedSpec:
    """Checks every field against the model's limits; raises InvalidArgument naming
    each bad field and its limit. Returns the spec with defaults filled in."""
    problems: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        problems.append(FieldViolation(field, description))

    model = models.get(spec.model)
    if model is None:
        known = ", ".join(sorted(models)) or "none"
        bad("spec.model", f"unknown model {spec.model!r}; served models: {known}")
        raise InvalidArgument(problems)
    limits, defaults = model.limits, model.defaults
    assert limits is not None and defaults is not None

    task = spec.task
    if task is None:
        bad("spec.task", "must be set (text-to-video or image-to-video)")
    elif task not in model.sources:
        served = ", ".join(t.value for t in model.tasks)
        bad("spec.task", f"model {model.name} does not do {task.value}; it does: {served}")

    if not spec.prompt.strip():
        bad("spec.prompt", "must not be empty")
    for field, text in (("spec.prompt", spec.prompt), ("spec.negative_prompt", spec.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            bad(field, f"is {len(text)} characters; the maximum is {limits.max_prompt_chars}")

    width = defaults.width if spec.width is None else spec.width
    height = defaults.height if spec.height is None else spec.height
    for field, value, maximum in (("spec.width", width, limits.max_width), ("spec.height", height, limits.max_height)):
        if value % limits.size_multiple:
            bad(field, f"{value} is not a multiple of {limits.size_multiple}, which {model.name} needs")
        elif not limits.min_size <= value <= maximum:
            bad(field, f"{value} is outside {limits.min_size}..{maximum}")

    num_frames = defaults.num_frames if spec.num_frames is None else spec.num_frames
    step = limits.frame_step
    if (num_frames - 1) % step or not limits.min_frames <= num_frames <= limits.max_frames:
        bad(
            "spec.num_frames",
            f"{model.name} takes {step}*k+1 frames from {limits.min_frames} to {limits.max_frames} "
            f"(e.g. {limits.min_frames}, {limits.min_frames + step}, ..., {limits.max_frames}); got {num_frames}",
        )

    fps = defaults.fps if spec.fps is None else spec.fps
    if not 1 <= fps <= limits.max_fps:
        bad("spec.fps", f"{fps} is outside 1..{limits.max_fps}")

    steps = defaults.num_inference_steps if spec.num_inference_steps is None else spec.num_inference_steps
    if not 1 <= steps <= limits.max_steps:
        bad("spec.num_inference_steps", f"{steps} is outside 1..{limits.max_steps}")

    guidance = defaults.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
        bad("spec.guidance_scale", f"{guidance} is outside 0..{limits.max_guidance_scale}")

    seed = spec.seed
    if seed is not None and not 0 <= seed <= MAX_SEED:
        bad("spec.seed", f"must be within 0..{MAX_SEED}")

    priority = DEFAULT_PRIORITY if spec.priority is None else spec.priority
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        bad("spec.priority", f"{priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")

    _check_labels(spec.labels, bad)
    if len(spec.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        bad("spec.idempotency_key", f"is {len(spec.idempotency_key)} characters; the maximum is {MAX_IDEMPOTENCY_KEY_CHARS}")

    if task is Task.IMAGE_TO_VIDEO:
        _check_image(spec.image, limits.max_image_bytes, limits.max_image_pixels, bad)
    elif spec.image:
        bad("spec.image", "is only for image-to-video; leave it empty for text-to-video")

    if problems:
        raise InvalidArgument(problems)
    assert task is not None
    return ResolvedSpec(
        model=model.name, task=task, prompt=spec.prompt, negative_prompt=spec.negative_prompt,
        width=width, height=height, num_frames=num_frames, fps=fps, num_inference_steps=steps,
        guidance_scale=float(guidance), seed=seed if seed is not None else secrets.randbelow(MAX_SEED + 1),
        priority=priority, labels=dict(spec.labels), idempotency_key=spec.idempotency_key, image=spec.image,
    )


def _check_labels(labels: dict[str, str], bad) -> None:
    if len(labels) > MAX_LABELS:
        bad("spec.labels", f"has {len(labels)} labels; the maximum is {MAX_LABELS}")
        return
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            bad(f"spec.labels[{key!r}]", "keys are 1..63 of a-z 0-9 . _ / -, starting and ending alphanumeric")
        if len(value) > MAX_LABEL_VALUE_CHARS:
            bad(f"spec.labels[{key!r}]", f"value is {len(value)} characters; the maximum is {MAX_LABEL_VALUE_CHARS}")


def _check_image(image: bytes, max_bytes: int, max_pixels: int, bad) -> None:
    if not image:
        bad("spec.image", "image-to-video needs the first frame as PNG or JPEG bytes")
        return
    if len(image) > max_bytes:
        bad("spec.image", f"is {len(image)} bytes; the maximum is {max_bytes}")
        return
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as picture:
            width, height = picture.size
            if width * height > max_pixels:
                bad("spec.image", f"is {width}x{height}; the maximum is {max_pixels} pixels")
                return
            picture.load()  # decodes fully, so a truncated file fails here, not on the GPU
    except Exception as error:  # Pillow raises many kinds for bad bytes
        bad("spec.image", f"cannot be decoded as an image ({type(error).__name__}: {error})")
