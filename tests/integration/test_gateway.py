"""The gateway's contract: bad input, auth, tenant isolation, deadlines, health,
reflection, and a gateway restart in the middle of a render."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from farm.client import FarmClient
from farm.cli.demo import first_frame_png
from farm.jobs.store import JobStore
from farm.serve.flags import hold_next_render, release
from farm.v1 import render_pb2 as pb
from tests.gateway import bad_request_fields
from tests.integration.test_render_path import I2V, small_spec


def _spec(**changes):
    spec = small_spec()
    for field, value in changes.items():
        setattr(spec, field, value)
    return spec


BAD_SPECS = {
    "unknown model": (_spec(model="sora-2"), "spec.model", "unknown model"),
    "no task": (_spec(task=pb.TASK_UNSPECIFIED), "spec.task", "must be set"),
    "width not a multiple": (_spec(width=100), "spec.width", "not a multiple of 32"),
    "height over the maximum": (_spec(height=2048), "spec.height", "outside 32..1280"),
    "frame count": (_spec(num_frames=20), "spec.num_frames", "8*k+1 frames from 9 to 257"),
    "zero steps": (_spec(num_inference_steps=0), "spec.num_inference_steps", "outside 2..200"),
    "huge steps": (_spec(num_inference_steps=100000), "spec.num_inference_steps", "outside 2..200"),
    # LTX-Video's scheduler cannot take one step: each attempt failed with an IndexError.
    "one step for ltx-video": (_spec(width=32, height=32, num_inference_steps=1), "spec.num_inference_steps",
                               "ltx-video-tiny needs at least 2 denoising steps: LTX-Video's scheduler stretches "
                               "its timesteps to a terminal value, which takes two; got 1"),
    "long prompt": (_spec(prompt="x" * 5000), "spec.prompt", "maximum is 4000"),
    "empty image": (_spec(task=I2V), "spec.image", "needs the first frame"),
    "undecodable image": (_spec(task=I2V, image=b"\x89PNG garbage"), "spec.image", "cannot be decoded"),
    "image for text-to-video": (_spec(image=first_frame_png(64, 64)), "spec.image", "only for image-to-video"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_are_refused_with_the_field_and_limit(client, farm_config, case):
    config, _ = farm_config
    spec, field, expected = BAD_SPECS[case]
    store = JobStore(config.store_url, migrate=False)
    before = (len(store.list(store.tenant_by_name("default").id, page_size=1000)[0]), store.ledger_total_nanodollars())
    with pytest.raises(grpc.RpcError) as error:
        client.submit(spec)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in bad_request_fields(error.value)[field]
    with pytest.raises(grpc.RpcError) as error:
        client.estimate(spec)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (len(store.list(store.tenant_by_name("default").id, page_size=1000)[0]), store.ledger_total_nanodollars())
    assert after == before, "a refused submit left a render or a charge behind"
    assert client.is_serving()


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer farm_000000000000_" + "x" * 43),),
                                      (("authorization", "Basic dXNlcjpwYXNz"),), (("authorization", "Bearer nope"),)])
def test_missing_or_wrong_key_is_unauthenticated(gateway, metadata):
    with FarmClient(gateway.target) as anonymous:
        anonymous.metadata = metadata
        for call in (lambda: anonymous.submit(small_spec()), lambda: anonymous.get("r1"),
                     lambda: list(anonymous.watch("r1")), anonymous.models):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.is_serving(), "health checks need no key"


def test_unknown_render_is_not_found(client):
    for call in (client.get, client.cancel, lambda rid: list(client.watch(rid)), client.fetch):
        with pytest.raises(grpc.RpcError) as error:
            call("r00000000000deadbeef")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_tenants_are_isolated(client, gateway, farm_config):
    config, _ = farm_config
    render = client.submit(small_spec(steps=2))
    _, other_key = JobStore(config.store_url, migrate=False).create_tenant("tenant-isolation")
    with FarmClient(gateway.target, other_key) as other:
        for call in (other.get, other.cancel, lambda rid: list(other.watch(rid)), other.fetch):
            with pytest.raises(grpc.RpcError) as error:
                call(render.id)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert render.id not in {r.id for r in other.list(page_size=1000).renders}
        own = other.submit(small_spec(steps=2))
        assert own.id not in {r.id for r in client.list(page_size=1000).renders}
        assert other.wait(own.id).state == pb.RENDER_STATE_SUCCEEDED
    assert client.wait(render.id).state == pb.RENDER_STATE_SUCCEEDED


def test_client_deadline_is_honoured(client, holds):
    hold_next_render("ltx-video-tiny", step=1)  # running until the cancel below
    render = client.submit(small_spec(steps=4))
    with pytest.raises(grpc.RpcError) as error:
        list(client.watch(render.id, timeout=0.5))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.cancel(render.id)
    assert client.wait(render.id).state == pb.RENDER_STATE_CANCELLED


def test_health_and_reflection(gateway):
    with FarmClient(gateway.target) as probe:
        for service in ("", "farm.v1.RenderService"):
            status = probe.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(probe.channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"farm.v1.RenderService", "grpc.health.v1.Health"} <= services


def test_gateway_restart_mid_render_loses_nothing(client, gateway, api_key, holds):
    hold_next_render("ltx-video-tiny", step=2)  # mid-render while the gateway restarts
    render = client.submit(small_spec(steps=6))
    seen = []
    for event in client.watch(render.id, timeout=300):
        seen.append(event)
        if event.stage == pb.STAGE_DENOISING and event.step == 2:
            break
    gateway.kill()
    gateway.start()
    release(render.id)
    with FarmClient(gateway.target, api_key) as again:
        seen += list(again.watch(render.id, after_sequence=seen[-1].sequence, timeout=300))
        final = again.get(render.id)
    assert final.state == pb.RENDER_STATE_SUCCEEDED
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1)), "an event was missed or repeated"
    assert [e.step for e in seen if e.stage == pb.STAGE_DENOISING and e.step] == list(range(1, 7))
