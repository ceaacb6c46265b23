"""farm.v1.RenderService: each method checks its input, makes one store call (in a
thread, bounded by the client's deadline) and converts the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from farm.api import convert
from farm.api.interceptors import current_tenant
from farm.api.metrics import GatewayMetrics
from farm.api.watch import EventHub
from farm.config import FarmConfig
from farm.errors import FailedPrecondition, invalid
from farm.jobs.spec import resolve_spec
from farm.jobs.states import RenderState
from farm.jobs.store import JobStore
from farm.metering.estimate import estimate
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc

T = TypeVar("T")
RENDER_ID_MAX = 32


def _check_render_id(render_id: str) -> str:
    if not render_id or len(render_id) > RENDER_ID_MAX:
        raise invalid("render_id", f"must be 1..{RENDER_ID_MAX} characters")
    return render_id


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, config: FarmConfig, store: JobStore, hub: EventHub, metrics: GatewayMetrics):
        self.config = config
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.models = {m.name: m for m in config.served_models()}
        self.artifacts = ArtifactStore(config.artifacts_url)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs a blocking store call without holding the event loop, and gives up
        when the client's deadline passes."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call ran")
        return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout=remaining)

    async def SubmitRender(self, request: pb.SubmitRenderRequest, context) -> pb.Render:
        tenant = current_tenant()
        spec_request = convert.spec_from_pb(request.spec)
        spec = resolve_spec(spec_request, self.models)
        record, created = await self._call(context, self.store.submit, tenant.id, spec_request, spec)
        if created:
            self.metrics.submitted.labels(spec.model, spec.task.value).inc()
        return convert.render_to_pb(record)

    async def GetRender(self, request: pb.GetRenderRequest, context) -> pb.Render:
        render_id = _check_render_id(request.render_id)
        return convert.render_to_pb(await self._call(context, self.store.get, current_tenant().id, render_id))

    async def CancelRender(self, request: pb.CancelRenderRequest, context) -> pb.Render:
        render_id = _check_render_id(request.render_id)
        return convert.render_to_pb(
            await self._call(context, self.store.request_cancel, current_tenant().id, render_id))

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
        # Ownership check first: another tenant's render is NOT_FOUND.
        await self._call(context, self.store.get, current_tenant().id, render_id)
        seq = request.after_sequence
        while True:
            events = await self._call(context, self.store.events_after, render_id, seq)
            for event in events:
                yield convert.event_to_pb(event)
                seq = event.seq
                if event.state.is_final:
                    return
            if not events:
                await self.hub.wait_for_events_after(render_id, seq)

    async def FetchArtifact(self, request: pb.FetchArtifactRequest, context):
        render_id = _check_render_id(request.render_id)
        record = await self._call(context, self.store.get, current_tenant().id, render_id)
        if record.state is not RenderState.SUCCEEDED:
            raise FailedPrecondition(f"render {render_id} is {record.state.value}; only a SUCCEEDED render has artifacts")
        if request.kind == pb.ARTIFACT_KIND_MANIFEST:
            uri, content_type = record.manifest_uri, "application/json"
        else:
            uri, content_type = record.artifact_uri, "video/mp4"
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
        spec = resolve_spec(convert.spec_from_pb(request.spec), self.models)
        history = await self._call(context, self.store.recent_timings, spec.model)
        pools = {p.model: p for p in await self._call(context, self.store.pools)}
        model = self.models[spec.model]
        device_kind = pools[spec.model].device_kind if spec.model in pools else (model.device_kind or "CPU")
        result = estimate(spec, history, device_kind, self.config.prices)
        return pb.CostEstimate(dollars=result.nanodollars / 1e9, device_seconds=result.device_seconds,
                               device_kind=device_kind)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        pools = {p.model: p for p in await self._call(context, self.store.pools)}
        models = []
        for model in self.models.values():
            pool = pools.get(model.name)
            ready = pool is not None and pool.replicas > 0 and _fresh(pool.updated_at, self.config)
            models.append(convert.model_to_pb(model, ready, pool.device_kind if pool else (model.device_kind or "")))
        return pb.ListModelsResponse(models=models)


def _fresh(updated_at, config: FarmConfig) -> bool:
    from farm.jobs.schema import utcnow

    return (utcnow() - updated_at).total_seconds() < config.gateway.pool_stale_after_s
