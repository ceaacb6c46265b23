"""What a submit decides (farm.jobs.admission), used directly: no gRPC, no Ray; a SQLite
store and the artifact directory under tmp_path, the farm's default (tiny) models, whose
weights need not be on disk."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from farm.config import FarmConfig, PoolConfig, Task
from farm.domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from farm.domain.spec import ColorReference, PostprocessSpec, RenderSpec
from farm.domain.states import AttemptOutcome, RenderState
from farm.jobs.admission import Admission
from farm.jobs.estimates import CostEstimator
from farm.jobs.records import PoolStatus
from farm.jobs.store import JobStore
from farm.planning.estimate import TimingModel
from farm.storage.artifacts import ArtifactStore

OWNER = "scheduler-test"
REFERENCE = "spec.postprocess.color_reference.render_id"


@dataclasses.dataclass
class Farm:
    config: FarmConfig
    store: JobStore
    admission: Admission
    tenant_id: str
    model: str

    def submit(self, request: RenderSpec, tenant_id: str | None = None, run=asyncio.to_thread):
        return asyncio.run(self.admission.submit(tenant_id or self.tenant_id, request, run))

    def estimate(self, request: RenderSpec):
        return asyncio.run(self.admission.estimate(self.tenant_id, request))

    def succeed(self, render_id: str, manifest: dict, video: bytes = b"") -> None:
        """Runs the render to SUCCEEDED as the scheduler would, with these artifacts."""
        claimed = {c.id: c for c in self.store.claim({self.model: 10}, OWNER, 30)}
        video_uri, manifest_uri = ArtifactStore(self.config.artifacts_url).write(
            render_id, claimed[render_id].attempt, video, manifest)
        self.store.finish(OWNER, render_id, claimed[render_id].attempt, AttemptOutcome.SUCCEEDED,
                          artifact_uri=video_uri, manifest_uri=manifest_uri)


@pytest.fixture
def farm(tmp_path):
    config = FarmConfig(home=tmp_path)
    store = JobStore(config.store_url)
    tenant, _ = store.create_tenant("studio")
    model = config.served_models()[0]
    try:
        yield Farm(config, store, Admission(config, store), tenant.id, model.name)
    finally:
        store.close()


def request(farm: Farm, **changes) -> RenderSpec:
    values = dict(model=farm.model, task=Task.TEXT_TO_VIDEO, prompt="a kite over the dunes")
    values.update(changes)
    return RenderSpec(**values)


def by_reference(render_id: str) -> PostprocessSpec:
    return PostprocessSpec(color_reference=ColorReference(render_id=render_id, strength=0.5))


def test_a_valid_spec_is_queued_with_its_defaults_filled_in_and_its_estimate_reserved(farm):
    farm.store.set_budget("studio", 1.0, "day")
    record, created = farm.submit(request(farm))
    defaults = farm.config.model(farm.model).defaults
    assert created and record.state is RenderState.QUEUED and record.tenant_id == farm.tenant_id
    spec = record.spec
    assert (spec.width, spec.height, spec.num_frames, spec.num_inference_steps) == (
        defaults.width, defaults.height, defaults.num_frames, defaults.num_inference_steps)
    assert spec.memory_bytes and spec.memory_bytes > 0
    assert farm.store.get(farm.tenant_id, record.id).spec == spec
    reserved = farm.store.budget_status(farm.tenant_id).reserved_nanodollars
    assert reserved == farm.estimate(request(farm)).nanodollars > 0

    again, created = farm.submit(request(farm, idempotency_key="k1"))
    assert created
    assert farm.submit(request(farm, idempotency_key="k1")) == (again, False)


@pytest.mark.parametrize("changes, field, expected", [
    (dict(width=100_000), "spec.width", "100000 is outside"),
    (dict(num_inference_steps=10_000), "spec.num_inference_steps", "10000"),
    (dict(model="no-such-model"), "spec.model", "served models"),
    (dict(require_device_kind="TPU"), "spec.placement.require_device_kind", "its pools: CPU"),
])
def test_a_bad_field_is_refused_naming_the_field_and_its_limit_and_nothing_is_queued(farm, changes, field,
                                                                                      expected):
    for attempt in (farm.submit, farm.estimate):
        with pytest.raises(InvalidArgument) as refused:
            attempt(request(farm, **changes))
        described = {v.field: v.description for v in refused.value.violations}
        assert expected in described[field], described
    assert farm.store.list(farm.tenant_id)[0] == []


def test_a_render_its_pools_cannot_hold_is_refused_naming_the_field_to_change(farm):
    model = farm.config.model(farm.model).model_copy(
        update={"pools": [PoolConfig(device_kind="L40S", num_gpus=1, min_replicas=0, max_replicas=1)]})
    farm.admission = Admission(FarmConfig(home=farm.config.home, models=[model], devices={"memory_gib": {"L40S": 24}}),
                               farm.store)
    with pytest.raises(InvalidArgument) as refused:
        farm.submit(request(farm, width=1280, height=704, num_frames=257))
    [violation] = refused.value.violations
    assert violation.field == "spec.num_frames"
    assert "the largest GPU it may run on (L40S) has 24.0 GiB" in violation.description
    assert "frames fit" in violation.description
    assert farm.store.list(farm.tenant_id)[0] == []
    record, _ = farm.submit(request(farm))
    assert 0 < record.spec.memory_bytes <= 24 * 2**30


def test_a_color_reference_by_render_id_becomes_the_renders_statistics(farm):
    reference, _ = farm.submit(request(farm))
    statistics = {"mean": [52.0, 1.5, -2.5], "std": [18.0, 4.0, 5.0], "pixels": 100}
    # Recorded statistics are read, not measured: the video is never decoded.
    farm.succeed(reference.id, {"postprocess": {"color_statistics": statistics}}, video=b"not a video")
    record, _ = farm.submit(request(farm, postprocess=by_reference(reference.id)))
    color = record.spec.postprocess.color_reference
    assert (color.mean, color.std, color.strength) == ((52.0, 1.5, -2.5), (18.0, 4.0, 5.0), 0.5)


def test_a_color_reference_without_recorded_statistics_is_measured_from_its_video(farm):
    from farm.postproc.encode import encode_mp4

    reference, _ = farm.submit(request(farm))
    grey = np.full((4, 32, 32, 3), 128, dtype=np.uint8)
    farm.succeed(reference.id, {"postprocess": {}}, video=encode_mp4(grey, 8))
    color = farm.submit(request(farm, postprocess=by_reference(reference.id)))[0].spec.postprocess.color_reference
    assert color.mean[0] == pytest.approx(53.6, abs=2) and max(abs(color.mean[1]), abs(color.mean[2])) < 2


def test_a_color_reference_to_another_tenants_render_is_not_found(farm):
    other, _ = farm.store.create_tenant("elsewhere")
    theirs, _ = farm.submit(request(farm), tenant_id=other.id)
    farm.succeed(theirs.id, {"postprocess": {"color_statistics": {"mean": [50, 0, 0], "std": [1, 1, 1]}}})
    for render_id in (theirs.id, "nosuchrender"):
        with pytest.raises(NotFound) as refused:
            farm.submit(request(farm, postprocess=by_reference(render_id)))
        assert REFERENCE in refused.value.message and render_id in refused.value.message
    assert farm.store.list(farm.tenant_id)[0] == []


def test_a_color_reference_to_an_unfinished_render_is_a_failed_precondition(farm):
    queued, _ = farm.submit(request(farm))
    with pytest.raises(FailedPrecondition) as refused:
        farm.submit(request(farm, postprocess=by_reference(queued.id)))
    assert "is QUEUED; only a SUCCEEDED render" in refused.value.message


def test_a_render_over_budget_is_refused_but_still_estimated(farm):
    farm.store.set_budget("studio", 1e-9, "day")
    with pytest.raises(ResourceExhausted) as refused:
        farm.submit(request(farm))
    assert refused.value.violations[0].subject == "tenant:studio/budget:day"
    assert farm.store.list(farm.tenant_id)[0] == []
    assert farm.estimate(request(farm)).nanodollars > 0


def test_an_estimate_is_priced_on_the_kind_asked_for_else_the_dearest(farm):
    farm.store.publish_pools(OWNER, [PoolStatus(farm.model, "H100", 1, 0, 1), PoolStatus(farm.model, "A100", 1, 0, 1)])
    h100 = farm.estimate(request(farm, prefer_device_kind="H100"))
    a100 = farm.estimate(request(farm, require_device_kind="A100"))
    assert (h100.device_kind, a100.device_kind) == ("H100", "A100")
    assert h100.nanodollars > a100.nanodollars > 0 and h100.device_seconds > 0 and not h100.calibrated
    assert farm.estimate(request(farm)).device_kind == "H100"


def test_a_stored_timing_model_is_used_and_looked_up_again_only_after_a_while(farm):
    now = [0.0]
    costs = CostEstimator(farm.store, farm.config.prices, cache_s=30.0, clock=lambda: now[0])
    farm.admission = Admission(farm.config, farm.store, costs=costs, clock=lambda: now[0])
    uncalibrated = farm.estimate(request(farm))
    timing = TimingModel.fallback()
    slower = TimingModel({phase: {term: 10 * v for term, v in terms.items()} for phase, terms in timing.phases.items()},
                         {}, samples=12)
    farm.store.save_cost_model(farm.model, "CPU", slower.to_json(), slower.samples)
    assert farm.estimate(request(farm)) == uncalibrated
    now[0] = 31.0
    calibrated = farm.estimate(request(farm))
    assert calibrated.calibrated and calibrated.nanodollars > uncalibrated.nanodollars


def test_a_caller_who_gives_up_while_the_spec_is_planned_queues_nothing(farm):
    async def run_until_the_write(fn, *args):
        if fn == farm.store.submit:
            raise TimeoutError("the client's deadline passed")
        return await asyncio.to_thread(fn, *args)

    with pytest.raises(TimeoutError):
        farm.submit(request(farm), run=run_until_the_write)
    assert farm.store.list(farm.tenant_id)[0] == []

