"""Admission: what a submit decides before a render is queued. A spec as the client sent
it becomes one that stands alone (a colour reference given by render id becomes that
render's colour statistics), is checked against its model's limits with every default
filled in, is placed (the GPU memory it needs, the pool kinds whose devices hold it) and
priced; the store then queues it, reserving the estimate against the tenant's budget
(a render that would overspend is refused there, in the same transaction)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from farm.config import FarmConfig, ModelConfig
from farm.domain.errors import FailedPrecondition, NotFound, invalid, quoted
from farm.domain.spec import MAX_REFERENCE_ID_CHARS, RenderSpec, ResolvedSpec
from farm.domain.states import RenderState
from farm.jobs.estimates import TIMING_CACHE_S, CostEstimator
from farm.jobs.records import RenderRecord
from farm.jobs.store import JobStore
from farm.jobs.validation import resolve_spec
from farm.planning.estimate import Estimate
from farm.planning.memory import MemoryPlanner
from farm.storage.artifacts import ArtifactStore

Run = Callable[..., Awaitable[Any]]
"""How a blocking call runs off the event loop: `run(fn, *args)`. asyncio.to_thread, or
the gateway's own, which also gives up when the client's deadline passes."""
COLOR_REFERENCE_FIELD = "spec.postprocess.color_reference.render_id"
READ_CHUNK_BYTES = 1 << 22


@dataclasses.dataclass(frozen=True)
class Plan:
    """A spec admitted but not yet queued."""

    spec: ResolvedSpec
    """Every default filled in, with the GPU memory it needs."""
    estimate: Estimate


class Admission:
    """Decides submits and estimates for one farm. The planning steps only read (the store,
    the artifacts, the models' weight headers); `submit` writes once, at the end, so that
    a caller who gave up while the spec was planned queues nothing."""

    def __init__(self, config: FarmConfig, store: JobStore, artifacts: ArtifactStore | None = None,
                 memory: MemoryPlanner | None = None, costs: CostEstimator | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.models = {m.name: m for m in config.served_models()}
        self.artifacts = artifacts or ArtifactStore(config.artifacts_url)
        self.memory = memory or MemoryPlanner(config)
        self.costs = costs or CostEstimator(store, config.prices, clock=clock)
        self._clock = clock
        self._pools: tuple[float, list] = (-TIMING_CACHE_S, [])

    async def submit(self, tenant_id: str, request: RenderSpec, run: Run = asyncio.to_thread,
                     trace_parent: str | None = None) -> tuple[RenderRecord, bool]:
        """Queues the render; returns (render, created). An idempotency key the tenant used
        before answers with its first render (created=False). Raises InvalidArgument naming
        each bad field and its limit, NotFound or FailedPrecondition for a colour reference
        that cannot be used, ResourceExhausted for a spend over budget. trace_parent: the
        submit's span, which the render's attempts continue."""
        plan = await run(self.plan, tenant_id, request)
        # The idempotency fingerprint stays that of the request as sent.
        return await run(self.store.submit, tenant_id, request, plan.spec, plan.estimate.nanodollars, trace_parent)

    async def estimate(self, tenant_id: str, request: RenderSpec, run: Run = asyncio.to_thread) -> Estimate:
        """What the render would cost, refused as `submit` would refuse it (but the budget)."""
        return (await run(self.plan, tenant_id, request)).estimate

    def plan(self, tenant_id: str, request: RenderSpec) -> Plan:
        """The spec resolved, placed and priced. Blocking."""
        spec = resolve_spec(self._with_color_statistics(tenant_id, request), self.models)
        model = self.models[spec.model]
        spec, kinds = self._place(spec, model)
        return Plan(spec, self.costs.estimate(spec, model, kinds))

    def _pool_kinds(self, model: ModelConfig) -> list[str]:
        """Device kinds of the model's pools as the scheduler published them (looked up
        again after a while: submits are the hot path), else as configured."""
        now = self._clock()
        if now - self._pools[0] > TIMING_CACHE_S:
            self._pools = (now, self.store.pools())
        published = [p.device_kind for p in self._pools[1] if p.model == model.name]
        return published or model.device_kinds() or [model.device_kind or "CPU"]

    def _place(self, spec: ResolvedSpec, model: ModelConfig) -> tuple[ResolvedSpec, list[str]]:
        """The spec with the GPU memory it needs, and the kinds of its model's pools that
        may run it: the one it requires, else every kind whose devices hold it. A spec
        that fits none is refused (INVALID_ARGUMENT, naming the field and the limit)."""
        kinds = self._pool_kinds(model)
        if spec.require_device_kind:
            if spec.require_device_kind not in kinds:
                raise invalid("spec.placement.require_device_kind",
                              f"{model.name} has no {quoted(spec.require_device_kind)} pool; its pools: "
                              f"{', '.join(kinds)}")
            kinds = [spec.require_device_kind]
        need, kinds = self.memory.place(spec, model, kinds)
        return dataclasses.replace(spec, memory_bytes=need), kinds

    def _with_color_statistics(self, tenant_id: str, request: RenderSpec) -> RenderSpec:
        """The request with a colour reference by render id replaced by that render's Lab
        statistics, so that the stored spec stands alone. The render must be the same
        tenant's (else NOT_FOUND) and SUCCEEDED (else FAILED_PRECONDITION)."""
        post = request.postprocess
        color = post.color_reference if post else None
        if color is None or not color.render_id or color.mean is not None or color.std is not None:
            return request
        if len(color.render_id) > MAX_REFERENCE_ID_CHARS:
            return request  # resolve_spec names the field and its limit
        try:
            record = self.store.get(tenant_id, color.render_id)
        except NotFound:
            raise NotFound(f"{COLOR_REFERENCE_FIELD}: render {color.render_id!r} not found") from None
        if record.state is not RenderState.SUCCEEDED:
            raise FailedPrecondition(
                f"{COLOR_REFERENCE_FIELD}: render {color.render_id} is {record.state.value}; only a SUCCEEDED "
                f"render can be a color reference")
        stats = color_statistics(self.artifacts, record)
        resolved = dataclasses.replace(color, mean=tuple(stats.mean), std=tuple(stats.std))
        return dataclasses.replace(request, postprocess=dataclasses.replace(post, color_reference=resolved))


def color_statistics(artifacts: ArtifactStore, record: RenderRecord):
    """A succeeded render's Lab statistics (a farm.postproc.color.ColorStats): from its
    manifest, else measured from its MP4."""
    # Post-processing needs OpenCV and PyAV: loaded only when a reference is measured.
    from farm.postproc.color import ColorStats
    from farm.postproc.pipeline import statistics_of_mp4

    def read(uri: str) -> bytes:
        return b"".join(data for _, data in artifacts.read_chunks(uri, READ_CHUNK_BYTES))

    if record.manifest_uri:
        stored = (json.loads(read(record.manifest_uri)).get("postprocess") or {}).get("color_statistics")
        if stored:
            return ColorStats.from_dict(stored)
    # A render written before post-processing recorded its statistics.
    return statistics_of_mp4(read(record.artifact_uri))
