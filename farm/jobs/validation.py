"""Validation: the checks that turn what a client asks for into a spec an engine can
run, every default filled in and every field within its model's limits."""

from __future__ import annotations

import io
import math
import secrets

from farm.config import ModelConfig
from farm.domain.errors import FieldViolation, InvalidArgument, quoted
from farm.domain.spec import (
    CODECS,
    DEFAULT_ADAPTER_WEIGHT,
    DEFAULT_CRF,
    DEFAULT_PRESET,
    DEFAULT_PRIORITY,
    ENCODER_PRESETS,
    IMAGE_FORMATS,
    LAB_MEAN_RANGES,
    LABEL_KEY,
    MAX_ADAPTER_WEIGHT,
    MAX_BITRATE_KBPS,
    MAX_CRF,
    MAX_DEVICE_KIND_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_LAB_STD,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_PRIORITY,
    MAX_REFERENCE_ID_CHARS,
    MAX_SEED,
    MIN_BITRATE_KBPS,
    MIN_INTERPOLATION_FACTOR,
    MIN_PRIORITY,
    MIN_UPSCALE_FACTOR,
    OTHER_IMAGE_SIGNATURES,
    ColorReference,
    PostprocessSpec,
    RenderSpec,
    ResolvedPostprocess,
    ResolvedSpec,
    Task,
)
from farm.families import family_facts, family_module


def resolve_spec(spec: RenderSpec, models: dict[str, ModelConfig]) -> ResolvedSpec:
    """Checks every field against the model's limits; raises InvalidArgument naming
    each bad field and its limit. Returns the spec with defaults filled in."""
    problems: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        problems.append(FieldViolation(field, description))

    model = models.get(spec.model)
    if model is None:
        known = ", ".join(sorted(models)) or "none"
        bad("spec.model", f"unknown model {quoted(spec.model)}; served models: {known}")
        raise InvalidArgument(problems)
    limits, defaults = model.limits, model.defaults
    assert limits is not None and defaults is not None

    task = spec.task
    if task is None:
        bad("spec.task", "must be set (text-to-video or image-to-video)")
    elif task not in model.sources:
        served = ", ".join(t.value for t in model.tasks)
        bad("spec.task", f"model {model.name} does not do {task.value}; it does: {served}")

    facts = family_facts(model.family)
    if not facts.uses_prompt:
        if spec.prompt.strip() or spec.negative_prompt.strip():
            field = "spec.prompt" if spec.prompt.strip() else "spec.negative_prompt"
            bad(field, f"model {model.name} ({model.family.value}) takes no text, only the image; leave it empty")
    elif not spec.prompt.strip():
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
    if 1 <= steps < limits.min_steps:
        bad("spec.num_inference_steps", _too_few_steps(model, steps))
    elif not limits.min_steps <= steps <= limits.max_steps:
        bad("spec.num_inference_steps", f"{steps} is outside {limits.min_steps}..{limits.max_steps}")

    guidance = defaults.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
        bad("spec.guidance_scale", f"{guidance} is outside 0..{limits.max_guidance_scale}")

    seed = spec.seed
    if seed is not None and not 0 <= seed <= MAX_SEED:
        bad("spec.seed", f"must be within 0..{MAX_SEED}")

    priority = DEFAULT_PRIORITY if spec.priority is None else spec.priority
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        bad("spec.priority", f"{priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")

    _check_placement(spec, model, bad)
    _check_labels(spec.labels, bad)
    if len(spec.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        bad("spec.idempotency_key", f"is {len(spec.idempotency_key)} characters; the maximum is {MAX_IDEMPOTENCY_KEY_CHARS}")

    postprocess = _resolve_postprocess(spec.postprocess, model, width, height, num_frames, fps, bad)
    adapters = _resolve_adapters(spec.adapters, model, bad)
    _check_motion(spec, model, num_frames, bad)

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
        postprocess=postprocess,
        require_device_kind=spec.require_device_kind, prefer_device_kind=spec.prefer_device_kind,
        adapters=adapters, surcharge=_surcharge(model, adapters),
        motion_bucket_id=spec.motion_bucket_id, noise_aug_strength=spec.noise_aug_strength,
        decode_chunk_size=spec.decode_chunk_size,
    )


def _resolve_adapters(requested, model: ModelConfig, bad) -> tuple[tuple[str, float], ...]:
    """The adapters as (name, weight), each one the model offers, at most its limit."""
    limit = model.limits.max_adapters
    if len(requested) > limit:
        bad("spec.adapters", f"asks for {len(requested)} adapters; {model.name} applies at most {limit}")
        return ()
    offered = {adapter.name for adapter in model.adapters}
    resolved, seen = [], set()
    for index, adapter in enumerate(requested):
        field = f"spec.adapters[{index}]"
        if adapter.name not in offered:
            known = ", ".join(sorted(offered)) or "none"
            bad(f"{field}.name", f"{quoted(adapter.name)} is not an adapter of {model.name} (it offers: {known})")
            continue
        if adapter.name in seen:
            bad(f"{field}.name", f"{quoted(adapter.name)} is named twice")
            continue
        seen.add(adapter.name)
        weight = DEFAULT_ADAPTER_WEIGHT if adapter.weight is None else adapter.weight
        if not math.isfinite(weight) or not -MAX_ADAPTER_WEIGHT <= weight <= MAX_ADAPTER_WEIGHT:
            bad(f"{field}.weight", f"{weight} is outside -{MAX_ADAPTER_WEIGHT:g}..{MAX_ADAPTER_WEIGHT:g}")
            continue
        resolved.append((adapter.name, float(weight)))
    return tuple(resolved)


def _surcharge(model: ModelConfig, adapters: tuple[tuple[str, float], ...]) -> float:
    """What the asked adapters add to the price, fixed into the spec at submit."""
    asked = {name for name, _ in adapters}
    return sum(adapter.surcharge for adapter in model.adapters if adapter.name in asked)


def _check_motion(spec: RenderSpec, model: ModelConfig, num_frames: int, bad) -> None:
    """Motion conditioning: only for families whose module checks it (`check_motion_fields`)."""
    values = (spec.motion_bucket_id, spec.noise_aug_strength, spec.decode_chunk_size)
    if all(value is None for value in values):
        return
    check = getattr(family_module(model.family), "check_motion_fields", None)
    if check is None:
        bad("spec.motion", f"model {model.name} ({model.family.value}) takes no motion conditioning; leave it unset")
        return
    for field, reason in check(*values, num_frames):
        bad(f"spec.motion.{field.removeprefix('spec.motion.')}", reason)


def _too_few_steps(model: ModelConfig, steps: int) -> str:
    minimum = model.limits.min_steps
    # The family's reason holds for the family's minimum; a model's own limits give none.
    family = family_facts(model.family)
    reason = family.min_steps_reason if minimum == family.limits.min_steps else None
    because = f": {reason}" if reason else ""
    return f"{model.name} needs at least {minimum} denoising steps{because}; got {steps}"


def _check_placement(spec: RenderSpec, model: ModelConfig, bad) -> None:
    # A model whose only pool detects its kind at start accepts any kind here; the
    # gateway then checks it against the pools the scheduler published.
    kinds = model.device_kinds()
    for field, kind in (("spec.placement.require_device_kind", spec.require_device_kind),
                        ("spec.placement.prefer_device_kind", spec.prefer_device_kind)):
        if kind and kinds and kind not in kinds:
            bad(field, f"{model.name} has no {quoted(kind)} pool; its pools: {', '.join(kinds)}")
        elif len(kind) > MAX_DEVICE_KIND_CHARS:
            bad(field, f"is {len(kind)} characters; the maximum is {MAX_DEVICE_KIND_CHARS}")


def _resolve_postprocess(post: PostprocessSpec | None, model: ModelConfig, width: int, height: int,
                         num_frames: int, fps: int, bad) -> ResolvedPostprocess | None:
    """Checks `spec.postprocess` against the model's post-processing limits; returns it
    with defaults filled in, or None when nothing was asked."""
    if post is None:
        return None
    assert model.limits is not None
    limits = model.limits.postprocess
    prefix = "spec.postprocess"

    factor, factor_field = 1, f"{prefix}.interpolation_factor"
    if post.interpolation_factor is not None and post.target_fps is not None:
        bad(f"{prefix}.target_fps", "give interpolation_factor or target_fps, not both")
    elif post.interpolation_factor is not None:
        factor = post.interpolation_factor
        if not MIN_INTERPOLATION_FACTOR <= factor <= limits.max_interpolation_factor:
            bad(factor_field, f"{factor} is outside {MIN_INTERPOLATION_FACTOR}..{limits.max_interpolation_factor}")
            factor = 1
    elif post.target_fps is not None:
        factor_field = f"{prefix}.target_fps"
        target = post.target_fps
        if fps < 1:
            pass  # spec.fps is refused already, and a target is a multiple of it
        elif target <= fps:
            bad(factor_field, f"{target} must be above the spec's fps ({fps})")
        elif target % fps:
            bad(factor_field, f"{target} must be a whole multiple of the spec's fps ({fps}), e.g. {2 * fps}")
        elif target // fps > limits.max_interpolation_factor:
            bad(factor_field, f"{target} is {target // fps}x the spec's fps ({fps}); the most is "
                              f"{limits.max_interpolation_factor}x, {fps * limits.max_interpolation_factor} fps")
        else:
            factor = target // fps
    if factor > 1:
        if fps * factor > limits.max_output_fps:
            bad(factor_field, f"gives {fps * factor} fps; the maximum output is {limits.max_output_fps} fps")
        frames_out = (num_frames - 1) * factor + 1
        if frames_out > limits.max_output_frames:
            bad(factor_field, f"gives {frames_out} frames from {num_frames}; the maximum output is "
                              f"{limits.max_output_frames} frames")

    upscale = 1
    if post.upscale_factor is not None:
        upscale = post.upscale_factor
        field = f"{prefix}.upscale_factor"
        if not MIN_UPSCALE_FACTOR <= upscale <= limits.max_upscale_factor:
            bad(field, f"{upscale} is outside {MIN_UPSCALE_FACTOR}..{limits.max_upscale_factor}")
            upscale = 1
        elif width * upscale * height * upscale > limits.max_output_pixels:
            bad(field, f"gives {width * upscale}x{height * upscale} = {width * upscale * height * upscale} pixels "
                       f"a frame; the maximum output is {limits.max_output_pixels} pixels")

    color = _resolve_color(post.color_reference, f"{prefix}.color_reference", bad)

    encoder = post.encoder
    field = f"{prefix}.encoder"
    codec = encoder.codec or CODECS[0]
    if codec not in CODECS:
        bad(f"{field}.codec", f"{quoted(encoder.codec)} is not supported; codecs: {', '.join(CODECS)}")
    crf = encoder.crf
    if crf is not None and not 0 <= crf <= MAX_CRF:
        bad(f"{field}.crf", f"{crf} is outside 0..{MAX_CRF}")
    bitrate = encoder.bitrate_kbps
    if bitrate is not None:
        if crf is not None:
            bad(f"{field}.bitrate_kbps", "give crf or bitrate_kbps, not both")
        elif not MIN_BITRATE_KBPS <= bitrate <= MAX_BITRATE_KBPS:
            bad(f"{field}.bitrate_kbps", f"{bitrate} is outside {MIN_BITRATE_KBPS}..{MAX_BITRATE_KBPS} kbit/s")
    preset = encoder.preset or DEFAULT_PRESET
    if preset not in ENCODER_PRESETS:
        bad(f"{field}.preset", f"{quoted(encoder.preset)} is not an x264 preset; presets: {', '.join(ENCODER_PRESETS)}")

    candidates = 1 if post.candidates is None else post.candidates
    if not 1 <= candidates <= limits.max_candidates:
        bad(f"{prefix}.candidates", f"{candidates} is outside 1..{limits.max_candidates}")

    return ResolvedPostprocess(
        interpolation_factor=factor, upscale_factor=upscale, color_reference=color, codec=codec,
        crf=(DEFAULT_CRF if crf is None else crf) if bitrate is None else None, bitrate_kbps=bitrate,
        preset=preset, candidates=candidates, target_fps=post.target_fps,
    )


def _resolve_color(reference: ColorReference | None, field: str, bad) -> ColorReference | None:
    if reference is None:
        return None
    strength = 1.0 if reference.strength is None else float(reference.strength)
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        bad(f"{field}.strength", f"{reference.strength} is outside 0..1")
    if len(reference.render_id) > MAX_REFERENCE_ID_CHARS:
        bad(f"{field}.render_id", f"is {len(reference.render_id)} characters; the maximum is {MAX_REFERENCE_ID_CHARS}")
        return None
    if reference.mean is None and reference.std is None:
        if reference.render_id:
            # The gateway turns a render id into statistics before resolving the spec.
            bad(f"{field}.render_id", f"render {quoted(reference.render_id)} was not resolved into color statistics")
        else:
            bad(field, "give render_id or statistics")
        return None
    mean, std = tuple(reference.mean or ()), tuple(reference.std or ())
    problems = 0
    if len(mean) != 3 or len(std) != 3:
        bad(f"{field}.statistics", f"needs 3 means and 3 stds (L, a, b), got {len(mean)} and {len(std)}")
        return None
    for channel, value, (low, high) in zip("Lab", mean, LAB_MEAN_RANGES):
        if not (math.isfinite(value) and low <= value <= high):
            bad(f"{field}.statistics.mean", f"{channel} mean {value} is outside {low:g}..{high:g}")
            problems += 1
    for channel, value in zip("Lab", std):
        if not (math.isfinite(value) and 0.0 <= value <= MAX_LAB_STD):
            bad(f"{field}.statistics.std", f"{channel} std {value} is outside 0..{MAX_LAB_STD:g}")
            problems += 1
    if problems:
        return None
    return ColorReference(render_id=reference.render_id, mean=tuple(float(v) for v in mean),
                          std=tuple(float(v) for v in std), strength=strength)


def _check_labels(labels: dict[str, str], bad) -> None:
    if len(labels) > MAX_LABELS:
        bad("spec.labels", f"has {len(labels)} labels; the maximum is {MAX_LABELS}")
        return
    for key, value in labels.items():
        field = f"spec.labels[{quoted(key)}]"
        if not LABEL_KEY.match(key):
            bad(field, "keys are 1..63 of a-z 0-9 . _ / -, starting and ending alphanumeric")
        if len(value) > MAX_LABEL_VALUE_CHARS:
            bad(field, f"value is {len(value)} characters; the maximum is {MAX_LABEL_VALUE_CHARS}")


def _other_image_format(image: bytes) -> str | None:
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in OTHER_IMAGE_SIGNATURES.items() if image.startswith(magic)), None)


def _check_image(image: bytes, max_bytes: int, max_pixels: int, bad) -> None:
    if not image:
        bad("spec.image", "image-to-video needs the first frame as PNG or JPEG bytes")
        return
    if len(image) > max_bytes:
        bad("spec.image", f"is {len(image)} bytes; the maximum is {max_bytes}")
        return
    other = _other_image_format(image)
    if other:
        bad("spec.image", f"is a {other} image; image-to-video takes PNG or JPEG")
        return
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image), formats=IMAGE_FORMATS) as picture:
            width, height = picture.size
            if width * height > max_pixels:
                bad("spec.image", f"is {width}x{height}; the maximum is {max_pixels} pixels")
                return
            picture.load()  # decodes fully, so a truncated file fails here, not on the GPU
    except Exception:  # Pillow raises many kinds for bad bytes; their text names classes and objects
        bad("spec.image", "cannot be decoded as a PNG or JPEG image (another format, or truncated or corrupt bytes)")
