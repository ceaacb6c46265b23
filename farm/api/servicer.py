"""farm.v1.RenderService: each method converts the request into the job plane's terms,
makes one call (blocking work in a thread, bounded by the client's deadline) and
converts the answer. What a submit decides lives in farm.jobs.admission."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from farm import tracing
from farm.api import convert
from farm.api.interceptors import DEADLINE_SLACK_S, current_tenant
from farm.api.metrics import GatewayMetrics
from farm.api.watch import EventHub, watch_events
from farm.config import FarmConfig
from farm.domain.errors import DeadlineExceeded, FailedPrecondition, invalid
from farm.domain.states import RenderState
from farm.jobs.admission import Admission
from farm.jobs.schema import utcnow
from farm.jobs.store import JobStore
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc

T = TypeVar("T")
RENDER_ID_MAX = 32
# Event sequences are 64-bit signed integers in the store; a larger after_sequence names
# no event and cannot even be compared there.
MAX_SEQUENCE = 2**63 - 1


def _check_render_id(render_id: str) -> str:
    if not render_id or len(render_id) > RENDER_ID_MAX:
        raise invalid("render_id", f"must be 1..{RENDER_ID_MAX} characters")
    return render_id


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, config: FarmConfig, store: JobStore, hub: EventHub, metrics: GatewayMetrics,
                 admission: Admission | None = None):
        self.config = config
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.models = {m.name: m for m in config.served_models()}
        self.artifacts = ArtifactStore(config.artifacts_url)
        self.admission = admission or Admission(config, store, self.artifacts)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs a blocking call without holding the event loop, and gives up when the
        client's deadline passes."""
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

    async def SubmitRender(self, request: pb.SubmitRenderRequest, context) -> pb.Render:
        tenant = current_tenant()
        parent, state = tracing.caller_trace(context.invocation_metadata())
        with tracing.span("gateway SubmitRender", parent, parent_state=state, kind="server",
                          attributes={"farm.tenant": tenant.name, "farm.model": request.spec.model}) as span:
            record, created = await self.admission.submit(
                tenant.id, convert.spec_from_pb(request.spec), functools.partial(self._call, context),
                tracing.traceparent_of(span))
            span.set_attribute("farm.render_id", record.id)
            span.set_attribute("farm.created", created)
        if created:
            self.metrics.submitted.labels(record.spec.model, record.spec.task.value).inc()
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
        events = watch_events(self.store, self.hub, current_tenant().id, render_id, request.after_sequence,
                              functools.partial(self._call, context))
        async with contextlib.aclosing(events):
            async for event in events:
                yield convert.event_to_pb(event)

    async def FetchArtifact(self, request: pb.FetchArtifactRequest, context):
        render_id = _check_render_id(request.render_id)
        content_type = convert.ARTIFACT_CONTENT_TYPES.get(request.kind)
        if content_type is None:
            raise invalid("kind", f"{request.kind} is not an artifact kind; kinds: "
                                  f"{', '.join(pb.ArtifactKind.Name(k) for k in convert.ARTIFACT_CONTENT_TYPES)}")
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
        estimate = await self.admission.estimate(
            current_tenant().id, convert.spec_from_pb(request.spec), functools.partial(self._call, context))
        return convert.estimate_to_pb(estimate)

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.UsageReport:
        tenant = current_tenant()
        since, until = convert.time_from_pb(request, "since"), convert.time_from_pb(request, "until")
        if request.group_by not in convert.USAGE_GROUP_FROM_PB:
            raise invalid("group_by", f"{request.group_by} is not a usage grouping")
        rows = await self._call(context, self.store.usage, tenant.id, since, until,
                                convert.USAGE_GROUP_FROM_PB[request.group_by])
        budget = await self._call(context, self.store.budget_status, tenant.id)
        return convert.usage_to_pb(rows, budget)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        pools = await self._call(context, self.store.pools)
        models = []
        now = utcnow()
        for model in self.models.values():
            up = [p.device_kind for p in pools
                  if p.model == model.name and p.is_up(self.config.gateway.pool_stale_after_s, now)]
            models.append(convert.model_to_pb(model, bool(up), up or model.device_kinds()))
        return pb.ListModelsResponse(models=models)
