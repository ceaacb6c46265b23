"""farm.v1.RenderService: each method checks its input, makes one store call (in a
thread, bounded by the client's deadline) and converts the answer."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from farm.api import convert
from farm.api.interceptors import DEADLINE_SLACK_S, current_tenant
from farm.api.metrics import GatewayMetrics
from farm.api.watch import EventHub
from farm.config import FarmConfig
from farm.domain.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    invalid,
    quoted,
)
from farm.domain.spec import MAX_REFERENCE_ID_CHARS, RenderSpec, ResolvedSpec
from farm.domain.states import RenderState
from farm.jobs.validation import resolve_spec
from farm.jobs.cost_models import measured_samples
from farm.jobs.schema import utcnow
from farm.jobs.store import JobStore
from farm.planning.estimate import (
    Estimate,
    TimingModel,
    estimate_cost,
    fit_timing_model,
)
from farm.planning.memory import MemoryPlanner
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc

T = TypeVar("T")
RENDER_ID_MAX = 32
# A model without a stored calibration is fitted from this many measured renders.
MIN_SAMPLES_TO_FIT = 4
TIMING_CACHE_S = 30.0
USAGE_GROUPS = {pb.USAGE_GROUPING_MODEL: "model", pb.USAGE_GROUPING_DEVICE: "device",
                pb.USAGE_GROUPING_DAY: "day", pb.USAGE_GROUPING_PHASE: "phase"}
# Event sequences are 64-bit signed integers in the store; a larger after_sequence names
# no event and cannot even be compared there.
MAX_SEQUENCE = 2**63 - 1
ARTIFACT_KINDS = {pb.ARTIFACT_KIND_VIDEO: "video/mp4", pb.ARTIFACT_KIND_MANIFEST: "application/json"}


def _check_render_id(render_id: str) -> str:
    if not render_id or len(render_id) > RENDER_ID_MAX:
        raise invalid("render_id", f"must be 1..{RENDER_ID_MAX} characters")
    return render_id


def _check_timestamp(request, field: str) -> dt.datetime:
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


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, config: FarmConfig, store: JobStore, hub: EventHub, metrics: GatewayMetrics):
        self.config = config
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.models = {m.name: m for m in config.served_models()}
        self.artifacts = ArtifactStore(config.artifacts_url)
        self.memory = MemoryPlanner(config)
        # (model, device kind) -> (when looked up, its timing model)
        self._timings: dict[tuple[str, str], tuple[float, TimingModel | None]] = {}
        self._pools: tuple[float, list] = (-TIMING_CACHE_S, [])

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs a blocking store call without holding the event loop, and gives up
        when the client's deadline passes."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the call ran")
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout=remaining)
        except TimeoutError:
            left = context.time_remaining()
            if left is not None and left <= DEADLINE_SLACK_S:
                raise DeadlineExceeded("the deadline passed before the job store answered") from None
            raise  # raised by `fn` itself: not the client's deadline

    async def _pool_kinds(self, context, model) -> list[str]:
        """Device kinds of the model's pools as the scheduler published them (cached:
        submits are the hot path), else as configured."""
        now = time.monotonic()
        if now - self._pools[0] > TIMING_CACHE_S:
            self._pools = (now, await self._call(context, self.store.pools))
        published = [p.device_kind for p in self._pools[1] if p.model == model.name]
        return published or model.device_kinds() or [model.device_kind or "CPU"]

    async def _timing(self, context, model, device_kind: str) -> TimingModel | None:
        now = time.monotonic()
        cached = self._timings.get((model.name, device_kind))
        if cached is None or now - cached[0] > TIMING_CACHE_S:
            stored = await self._call(context, self.store.cost_model, model.name, device_kind)
            timing = TimingModel.from_json(stored) if stored else None
            if timing is None:
                samples = await self._call(context, measured_samples, self.store, model, device_kind, 200)
                timing = fit_timing_model(samples, model) if len(samples) >= MIN_SAMPLES_TO_FIT else None
            self._timings[(model.name, device_kind)] = cached = (now, timing)
        return cached[1]

    async def _place(self, context, spec: ResolvedSpec) -> tuple[ResolvedSpec, list[str]]:
        """The spec with the GPU memory it needs, and the kinds of its model's pools that
        may run it: the one it requires, else every kind whose devices hold it. A spec
        that fits none is refused (INVALID_ARGUMENT, naming the field and the limit)."""
        model = self.models[spec.model]
        kinds = await self._pool_kinds(context, model)
        if spec.require_device_kind:
            if spec.require_device_kind not in kinds:
                raise invalid("spec.placement.require_device_kind",
                              f"{model.name} has no {quoted(spec.require_device_kind)} pool; its pools: "
                              f"{', '.join(kinds)}")
            kinds = [spec.require_device_kind]
        # The first call for a model reads its weights' headers: off the event loop.
        need, kinds = await self._call(context, self.memory.place, spec, model, kinds)
        return dataclasses.replace(spec, memory_bytes=need), kinds

    async def _estimate(self, context, spec: ResolvedSpec, kinds: list[str]) -> Estimate:
        """The spec's predicted cost: on the kind it prefers, else on the dearest of the
        kinds it may run on, so that a budget reservation never falls short."""
        model = self.models[spec.model]
        wanted = spec.prefer_device_kind if spec.prefer_device_kind in kinds else ""
        estimates = [estimate_cost(spec, model, await self._timing(context, model, kind), kind, self.config.prices)
                     for kind in ([wanted] if wanted else kinds)]
        return max(estimates, key=lambda e: e.nanodollars)

    async def _resolve_color_reference(self, context, tenant_id: str, spec: RenderSpec) -> RenderSpec:
        """A spec whose color reference names a render gets that render's Lab statistics
        (from its manifest, else measured from its MP4). The render must be the same
        tenant's (else NOT_FOUND) and SUCCEEDED (else FAILED_PRECONDITION)."""
        post = spec.postprocess
        color = post.color_reference if post else None
        if color is None or not color.render_id or color.mean is not None or color.std is not None:
            return spec
        if len(color.render_id) > MAX_REFERENCE_ID_CHARS:
            return spec  # resolve_spec names the field and its limit
        field = "spec.postprocess.color_reference.render_id"
        try:
            record = await self._call(context, self.store.get, tenant_id, color.render_id)
        except NotFound:
            raise NotFound(f"{field}: render {color.render_id!r} not found") from None
        if record.state is not RenderState.SUCCEEDED:
            raise FailedPrecondition(
                f"{field}: render {color.render_id} is {record.state.value}; only a SUCCEEDED render can be "
                f"a color reference")
        stats = await self._call(context, self._reference_statistics, record)
        resolved = dataclasses.replace(color, mean=tuple(stats.mean), std=tuple(stats.std))
        return dataclasses.replace(spec, postprocess=dataclasses.replace(post, color_reference=resolved))

    def _reference_statistics(self, record):
        from farm.postproc.color import ColorStats
        from farm.postproc.pipeline import statistics_of_mp4

        def read(uri: str) -> bytes:
            return b"".join(data for _, data in self.artifacts.read_chunks(uri, 1 << 22))

        if record.manifest_uri:
            stored = (json.loads(read(record.manifest_uri)).get("postprocess") or {}).get("color_statistics")
            if stored:
                return ColorStats.from_dict(stored)
        # A render written before post-processing recorded its statistics.
        return statistics_of_mp4(read(record.artifact_uri))

    async def SubmitRender(self, request: pb.SubmitRenderRequest, context) -> pb.Render:
        tenant = current_tenant()
        spec_request = convert.spec_from_pb(request.spec)
        # The stored spec stands alone: a color reference by render id becomes statistics
        # here, while the idempotency fingerprint stays that of the request as sent.
        spec = resolve_spec(await self._resolve_color_reference(context, tenant.id, spec_request), self.models)
        spec, kinds = await self._place(context, spec)
        estimate = await self._estimate(context, spec, kinds)
        record, created = await self._call(context, self.store.submit, tenant.id, spec_request, spec,
                                           estimate.nanodollars)
        if created:
            self.metrics.submitted.labels(spec.model, spec.task.value).inc()
        return convert.render_to_pb(record)

    async def GetRender(self, request: pb.GetRenderRequest, context) -> pb.Render:
        render_id = _check_render_id(request.render_id)
        return convert.render_to_pb(await self._call(context, self.store.get, current_tenant().id, render_id))

    async def CancelRender(self, request: pb.CancelRenderRequest, context) -> pb.Render:
        render_id = _check_render_id(request.render_id)
        record = await self._call(context, self.store.request_cancel, current_tenant().id, render_id)
        if record.state is RenderState.CANCELLED and record.checkpoint_uri:
            # Preempted, then cancelled while queued: no attempt will resume from its checkpoint.
            await asyncio.to_thread(self.artifacts.discard_checkpoints, render_id)
        return convert.render_to_pb(record)

    async def ListRenders(self, request: pb.ListRendersRequest, context) -> pb.ListRendersResponse:
        states = []
        for value in request.states:
            if value not in convert.STATE_FROM_PB:
                raise invalid("states", f"{value} is not a render state")
            states.append(convert.STATE_FROM_PB[value])
        records, token = await self._call(
            context, self.store.list, current_tenant().id, states, request.model, request.page_size,
            request.page_token)
        return pb.ListRendersResponse(renders=[convert.render_to_pb(r) for r in records], next_page_token=token)

    async def WatchRender(self, request: pb.WatchRenderRequest, context):
        render_id = _check_render_id(request.render_id)
        if request.after_sequence > MAX_SEQUENCE:
            raise invalid("after_sequence", f"{request.after_sequence} is past the largest sequence, {MAX_SEQUENCE}")
        # Ownership check first: another tenant's render is NOT_FOUND.
        record = await self._call(context, self.store.get, current_tenant().id, render_id)
        seq, newest, final = request.after_sequence, record.event_seq, record.state.is_final
        while True:
            events = await self._call(context, self.store.events_after, render_id, seq)
            for event in events:
                yield convert.event_to_pb(event)
                seq = newest = event.seq
                if event.state.is_final:
                    return
            if events:
                continue
            # Nothing after `seq` of a final render: a client reconnecting after the final
            # event (or naming a sequence past it) has seen the end.
            if final:
                return
            # A client may name a sequence the render has not reached: wake at its next
            # event all the same, and learn from the render whether it ended.
            await self.hub.wait_for_events_after(render_id, min(seq, newest))
            if seq > newest:
                record = await self._call(context, self.store.get, current_tenant().id, render_id)
                newest, final = record.event_seq, record.state.is_final

    async def FetchArtifact(self, request: pb.FetchArtifactRequest, context):
        render_id = _check_render_id(request.render_id)
        content_type = ARTIFACT_KINDS.get(request.kind)
        if content_type is None:
            raise invalid("kind", f"{request.kind} is not an artifact kind; kinds: "
                                  f"{', '.join(pb.ArtifactKind.Name(k) for k in ARTIFACT_KINDS)}")
        record = await self._call(context, self.store.get, current_tenant().id, render_id)
        if record.state is not RenderState.SUCCEEDED:
            raise FailedPrecondition(f"render {render_id} is {record.state.value}; only a SUCCEEDED render has artifacts")
        uri = record.manifest_uri if request.kind == pb.ARTIFACT_KIND_MANIFEST else record.artifact_uri
        total = await self._call(context, self.artifacts.size, uri)
        if request.offset > total:
            raise invalid("offset", f"{request.offset} is past the end of the {total}-byte artifact")
        chunks = self.artifacts.read_chunks(uri, self.config.gateway.fetch_chunk_bytes, request.offset)
        while True:
            item = await self._call(context, next, chunks, None)
            if item is None:
                return
            offset, data = item
            yield pb.ArtifactChunk(data=data, offset=offset, total_bytes=total, content_type=content_type)

    async def EstimateCost(self, request: pb.EstimateCostRequest, context) -> pb.CostEstimate:
        spec_request = convert.spec_from_pb(request.spec)
        spec = resolve_spec(await self._resolve_color_reference(context, current_tenant().id, spec_request),
                            self.models)
        spec, kinds = await self._place(context, spec)
        result = await self._estimate(context, spec, kinds)
        phases = [pb.PhaseCost(phase=phase, device_kind=result.device_kind, device_seconds=seconds)
                  for phase, seconds in sorted(result.phases.items())]
        return pb.CostEstimate(dollars=result.nanodollars / 1e9, device_seconds=result.device_seconds,
                               device_kind=result.device_kind, calibrated=result.calibrated, phases=phases)

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.UsageReport:
        tenant = current_tenant()
        since, until = _check_timestamp(request, "since"), _check_timestamp(request, "until")
        if request.group_by not in USAGE_GROUPS:
            raise invalid("group_by", f"{request.group_by} is not a usage grouping")
        rows = await self._call(context, self.store.usage, tenant.id, since, until, USAGE_GROUPS[request.group_by])
        budget = await self._call(context, self.store.budget_status, tenant.id)
        total = sum(row.nanodollars for row in rows)
        report = pb.UsageReport(
            rows=[pb.UsageRow(key=r.key, renders=r.renders, device_seconds=r.device_seconds,
                              dollars=r.nanodollars / 1e9, nanodollars=r.nanodollars) for r in rows],
            total_dollars=total / 1e9, total_nanodollars=total)
        if budget is not None:
            report.budget.CopyFrom(convert.budget_to_pb(budget))
        return report

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        pools = await self._call(context, self.store.pools)
        models = []
        now = utcnow()
        for model in self.models.values():
            up = [p.device_kind for p in pools
                  if p.model == model.name and p.is_up(self.config.gateway.pool_stale_after_s, now)]
            models.append(convert.model_to_pb(model, bool(up), up or model.device_kinds()))
        return pb.ListModelsResponse(models=models)
