"""Conversions between the farm.v1 messages and the job plane's records."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from farm.config import ModelConfig, Task
from farm.domain.spec import (
    AdapterRequest,
    ColorReference,
    EncoderSettings,
    PostprocessSpec,
    RenderSpec,
    ResolvedPostprocess,
    ResolvedSpec,
)
from farm.domain.errors import invalid
from farm.families import family_facts
from farm.domain.states import RenderState, Stage
from farm.jobs.records import BudgetStatus, EventRecord, RenderRecord, UsageRow
from farm.metering.cost import to_dollars
from farm.planning.estimate import Estimate
from farm.v1 import render_pb2 as pb

TASK_TO_PB = {Task.TEXT_TO_VIDEO: pb.TASK_TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO: pb.TASK_IMAGE_TO_VIDEO}
TASK_FROM_PB = {v: k for k, v in TASK_TO_PB.items()}
STATE_TO_PB = {s: pb.RenderState.Value(f"RENDER_STATE_{s.value}") for s in RenderState}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
STAGE_TO_PB = {s: (pb.Stage.Value(f"STAGE_{s.value}") if s.value else pb.STAGE_UNSPECIFIED)
               for s in Stage if s is not Stage.ENCODING}
STAGE_TO_PB[Stage.ENCODING] = pb.STAGE_WRITING  # a phase of the WRITING stage
USAGE_GROUP_FROM_PB = {pb.USAGE_GROUPING_MODEL: "model", pb.USAGE_GROUPING_DEVICE: "device",
                       pb.USAGE_GROUPING_DAY: "day", pb.USAGE_GROUPING_PHASE: "phase"}
ARTIFACT_CONTENT_TYPES = {pb.ARTIFACT_KIND_VIDEO: "video/mp4", pb.ARTIFACT_KIND_MANIFEST: "application/json"}


def spec_from_pb(message: pb.RenderSpec) -> RenderSpec:
    return RenderSpec(
        model=message.model,
        task=TASK_FROM_PB.get(message.task),
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        image=message.image,
        width=_optional(message, "width"),
        height=_optional(message, "height"),
        num_frames=_optional(message, "num_frames"),
        fps=_optional(message, "fps"),
        num_inference_steps=_optional(message, "num_inference_steps"),
        guidance_scale=_optional(message, "guidance_scale"),
        seed=_optional(message, "seed"),
        priority=_optional(message, "priority"),
        labels=dict(message.labels),
        idempotency_key=message.idempotency_key,
        postprocess=postprocess_from_pb(message.postprocess) if message.HasField("postprocess") else None,
        require_device_kind=message.placement.require_device_kind,
        prefer_device_kind=message.placement.prefer_device_kind,
        adapters=tuple(AdapterRequest(name=a.name, weight=a.weight if a.HasField("weight") else None)
                       for a in message.adapters),
        motion_bucket_id=_optional(message.motion, "motion_bucket_id"),
        noise_aug_strength=_optional(message.motion, "noise_aug_strength"),
        decode_chunk_size=_optional(message.motion, "decode_chunk_size"),
    )


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def postprocess_from_pb(message: pb.PostprocessSpec) -> PostprocessSpec:
    color = None
    if message.HasField("color_reference"):
        reference = message.color_reference
        source = reference.WhichOneof("source")
        strength = reference.strength if reference.HasField("strength") else None
        if source == "statistics":
            color = ColorReference(mean=tuple(reference.statistics.mean), std=tuple(reference.statistics.std),
                                   strength=strength)
        else:
            color = ColorReference(render_id=reference.render_id, strength=strength)
    encoder = message.encoder
    return PostprocessSpec(
        interpolation_factor=_optional(message, "interpolation_factor"),
        target_fps=_optional(message, "target_fps"),
        upscale_factor=_optional(message, "upscale_factor"),
        color_reference=color,
        encoder=EncoderSettings(codec=encoder.codec, crf=_optional(encoder, "crf"),
                                bitrate_kbps=_optional(encoder, "bitrate_kbps"), preset=encoder.preset),
        candidates=_optional(message, "candidates"),
    )


def postprocess_to_pb(post: ResolvedPostprocess) -> pb.PostprocessSpec:
    """The resolved post-processing (a target fps shows as its interpolation factor; a
    color reference by render id shows the statistics it was resolved into, and the id)."""
    message = pb.PostprocessSpec(
        encoder=pb.EncoderSettings(codec=post.codec, preset=post.preset), candidates=post.candidates)
    if post.interpolation_factor > 1:
        message.interpolation_factor = post.interpolation_factor
    if post.upscale_factor > 1:
        message.upscale_factor = post.upscale_factor
    if post.crf is not None:
        message.encoder.crf = post.crf
    if post.bitrate_kbps is not None:
        message.encoder.bitrate_kbps = post.bitrate_kbps
    color = post.color_reference
    if color is not None:
        message.color_reference.statistics.mean.extend(color.mean or ())
        message.color_reference.statistics.std.extend(color.std or ())
        if color.strength is not None:
            message.color_reference.strength = color.strength
    return message


def quality_to_pb(quality: dict | None) -> pb.QualityReport | None:
    if not quality:
        return None
    return pb.QualityReport(
        temporal_consistency=quality.get("temporal_consistency", 0.0), flicker=quality.get("flicker", 0.0),
        motion_smoothness=quality.get("motion_smoothness", 0.0), frozen=bool(quality.get("frozen", False)),
        issues=list(quality.get("issues", ())),
    )


def candidates_to_pb(candidates: list[dict] | None) -> list[pb.CandidateScore]:
    return [pb.CandidateScore(seed=c["seed"], quality=quality_to_pb(c.get("quality")), score=c.get("score", 0.0),
                              chosen=bool(c.get("chosen"))) for c in candidates or ()]


def spec_to_pb(spec: ResolvedSpec, with_image: bool = False) -> pb.RenderSpec:
    message = pb.RenderSpec(
        model=spec.model, task=TASK_TO_PB[spec.task], prompt=spec.prompt, negative_prompt=spec.negative_prompt,
        image=spec.image if with_image else b"", width=spec.width, height=spec.height,
        num_frames=spec.num_frames, fps=spec.fps, num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale, seed=spec.seed, priority=spec.priority, labels=spec.labels,
        idempotency_key=spec.idempotency_key,
        placement=pb.Placement(require_device_kind=spec.require_device_kind,
                               prefer_device_kind=spec.prefer_device_kind),
    )
    if spec.postprocess is not None:
        message.postprocess.CopyFrom(postprocess_to_pb(spec.postprocess))
    message.adapters.extend(pb.AdapterRequest(name=name, weight=weight) for name, weight in spec.adapters)
    for field in ("motion_bucket_id", "noise_aug_strength", "decode_chunk_size"):
        if getattr(spec, field) is not None:
            setattr(message.motion, field, getattr(spec, field))
    return message


def time_from_pb(request, field: str) -> dt.datetime:
    """A required Timestamp field as a UTC datetime; INVALID_ARGUMENT when it is unset
    or outside what a Timestamp may hold (years 1..9999, nanos 0..999,999,999)."""
    if not request.HasField(field):
        raise invalid(field, "is required")
    value = getattr(request, field)
    try:
        return value.ToDatetime(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError):
        raise invalid(field, f"seconds {value.seconds} and nanos {value.nanos} are not a time between "
                             f"0001-01-01 and 9999-12-31 UTC") from None


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


# Object stores a client may be given access to: their URLs are shown as stored.
SHARED_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https")


def client_uri(uri: str | None, render_id: str, kind: str) -> str:
    """An artifact's URI as a client sees it: an object store's URL as stored; a file on
    the farm's own disks (whose path means nothing to a client and tells too much) as
    `farm://renders/<id>/<kind>`, the render and kind that FetchArtifact reads."""
    if not uri:
        return ""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return uri if scheme in SHARED_STORE_SCHEMES else f"farm://renders/{render_id}/{kind}"


def render_to_pb(record: RenderRecord) -> pb.Render:
    cost = pb.CostBreakdown(
        total_dollars=to_dollars(record.cost_nanodollars),
        phases=[
            pb.PhaseCost(phase=c.phase, device_kind=c.device_kind, device_seconds=c.device_seconds,
                         dollars=to_dollars(c.nanodollars), attempt=c.attempt)
            for c in record.charges
        ],
    )
    return pb.Render(
        id=record.id, spec=spec_to_pb(record.spec), state=STATE_TO_PB[record.state],
        stage=STAGE_TO_PB[record.stage], step=record.step, total_steps=record.total_steps,
        attempt=record.attempt, created_at=timestamp(record.created_at), started_at=timestamp(record.started_at),
        finished_at=timestamp(record.finished_at), artifact_uri=client_uri(record.artifact_uri, record.id, "video"),
        manifest_uri=client_uri(record.manifest_uri, record.id, "manifest"), cost=cost, error=record.error or "", seed=record.spec.seed,
        cancel_requested=record.cancel_requested, preemptions=record.preemptions,
        device_kind=record.device_kind or "",
        quality=quality_to_pb(record.quality), candidates=candidates_to_pb(record.candidates),
    )


def event_to_pb(event: EventRecord) -> pb.RenderEvent:
    return pb.RenderEvent(
        render_id=event.render_id, sequence=event.seq, time=timestamp(event.time),
        state=STATE_TO_PB[event.state], stage=STAGE_TO_PB[event.stage], step=event.step,
        total_steps=event.total_steps, attempt=event.attempt, message=event.message,
    )


def model_to_pb(model: ModelConfig, ready: bool, device_kinds: list[str]) -> pb.ModelInfo:
    limits, defaults = model.limits, model.defaults
    facts = family_facts(model.family)
    return pb.ModelInfo(
        name=model.name, family=model.family.value, tasks=[TASK_TO_PB[t] for t in model.tasks],
        limits=pb.ModelLimits(
            size_multiple=limits.size_multiple, max_width=limits.max_width, max_height=limits.max_height,
            frame_step=limits.frame_step, min_frames=limits.min_frames, max_frames=limits.max_frames,
            max_steps=limits.max_steps, max_prompt_chars=limits.max_prompt_chars,
            max_image_bytes=limits.max_image_bytes, min_steps=limits.min_steps, min_size=limits.min_size,
            max_fps=limits.max_fps, max_guidance_scale=limits.max_guidance_scale,
            max_image_pixels=limits.max_image_pixels, max_adapters=limits.max_adapters,
        ),
        defaults=pb.RenderSpec(
            model=model.name, width=defaults.width, height=defaults.height, num_frames=defaults.num_frames,
            fps=defaults.fps, num_inference_steps=defaults.num_inference_steps,
            guidance_scale=defaults.guidance_scale,
        ),
        ready=ready, device_kind=device_kinds[0] if device_kinds else "", device_kinds=device_kinds,
        postprocess_limits=postprocess_limits_to_pb(limits.postprocess),
        adapters=[pb.AdapterInfo(name=a.name, surcharge=a.surcharge) for a in model.adapters],
        uses_prompt=facts.uses_prompt, audio=facts.audio,
    )


def postprocess_limits_to_pb(limits) -> pb.PostprocessLimits:
    return pb.PostprocessLimits(
        max_interpolation_factor=limits.max_interpolation_factor, max_output_fps=limits.max_output_fps,
        max_upscale_factor=limits.max_upscale_factor, max_output_pixels=limits.max_output_pixels,
        max_output_frames=limits.max_output_frames, max_candidates=limits.max_candidates,
    )


def budget_to_pb(status: BudgetStatus) -> pb.Budget:
    return pb.Budget(period=status.period, budget_dollars=to_dollars(status.budget_nanodollars),
                     spent_dollars=to_dollars(status.spent_nanodollars),
                     reserved_dollars=to_dollars(status.reserved_nanodollars),
                     left_dollars=to_dollars(status.left_nanodollars))


def usage_to_pb(rows: list[UsageRow], budget: BudgetStatus | None) -> pb.UsageReport:
    total = sum(row.nanodollars for row in rows)
    report = pb.UsageReport(
        rows=[pb.UsageRow(key=r.key, renders=r.renders, device_seconds=r.device_seconds,
                          dollars=r.nanodollars / 1e9, nanodollars=r.nanodollars) for r in rows],
        total_dollars=total / 1e9, total_nanodollars=total)
    if budget is not None:
        report.budget.CopyFrom(budget_to_pb(budget))
    return report


def estimate_to_pb(estimate: Estimate) -> pb.CostEstimate:
    phases = [pb.PhaseCost(phase=phase, device_kind=estimate.device_kind, device_seconds=seconds)
              for phase, seconds in sorted(estimate.phases.items())]
    return pb.CostEstimate(dollars=estimate.nanodollars / 1e9, device_seconds=estimate.device_seconds,
                           device_kind=estimate.device_kind, calibrated=estimate.calibrated, phases=phases)
