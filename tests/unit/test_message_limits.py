"""How much the gateway takes in: requests larger than the largest legitimate spec are
refused by gRPC before they are parsed, a spec at every limit is taken, and only a few
large requests are handled at once. Real gRPC on loopback, the gateway in this process on
SQLite (no Ray)."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image

from farm.api.limits import OTHER_FIELDS_BYTES, largest_request_bytes, max_receive_bytes
from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.spec import (
    MAX_DEVICE_KIND_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_REFERENCE_ID_CHARS,
)
from farm.families import Family
from farm.v1 import render_pb2 as pb
from tests.gateway import bad_request_fields, serving

MiB = 1024 * 1024
# One character that takes the most bytes UTF-8 has: 4.
WIDE = "\N{CLAPPER BOARD}"
SUBMIT = "/farm.v1.RenderService/SubmitRender"
CALL_TIMEOUT_S = 60


def model(name: str = "ltx", **limits) -> ModelConfig:
    """An LTX-Video model on the CPU (its weights need not be readable here)."""
    config = ModelConfig(name=name, family=Family.LTX_VIDEO,
                         sources={Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"})
    if limits:
        config.limits = config.limits.model_copy(update=limits)
    return config


def farm_config(home, models=None, **gateway) -> FarmConfig:
    return FarmConfig(home=home, models=models or [model()], gateway={"port": 0, "metrics_port": 0, **gateway})


def png_of_size(size: int) -> bytes:
    """A valid 32x32 PNG of exactly `size` bytes: a private ancillary chunk (which
    decoders skip) before IEND pads it."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 40)).save(out, format="PNG")
    png = out.getvalue()
    body, iend = png[:-12], png[-12:]
    padding = size - len(png) - 12
    assert padding >= 0
    kind, data = b"fmPd", bytes(padding)
    chunk = struct.pack(">I", padding) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    image = body + chunk + iend
    assert len(image) == size
    return image


def max_spec(limits, image_bytes: int, **fields) -> pb.RenderSpec:
    """An image-to-video spec with every text field at its limit, in 4-byte characters."""
    labels = {f"k{i:02d}" + "x" * 60: WIDE * MAX_LABEL_VALUE_CHARS for i in range(MAX_LABELS)}
    assert all(len(k) == 63 for k in labels)
    values = dict(model="ltx", task=pb.TASK_IMAGE_TO_VIDEO, prompt=WIDE * limits.max_prompt_chars,
                  negative_prompt=WIDE * limits.max_prompt_chars, image=png_of_size(image_bytes), width=256,
                  height=256, num_frames=17, num_inference_steps=4, labels=labels,
                  idempotency_key=WIDE * MAX_IDEMPOTENCY_KEY_CHARS)
    values.update(fields)
    return pb.RenderSpec(**values)


def test_the_receive_limit_is_the_largest_legitimate_request(tmp_path):
    models = [model("a", max_image_bytes=5 * MiB, max_prompt_chars=100),
              model("b", max_image_bytes=3 * MiB, max_prompt_chars=400_000)]
    config = farm_config(tmp_path, models)
    # b's prompts (2 x 1,600,000 bytes) more than make up for its smaller image.
    expected = 3 * MiB + 2 * 4 * 400_000 + OTHER_FIELDS_BYTES
    assert largest_request_bytes(config) == expected
    assert max_receive_bytes(config) == expected
    config.gateway.max_message_bytes = 64 * MiB
    assert max_receive_bytes(config) == 64 * MiB
    config.gateway.max_message_bytes = 4 * MiB
    with pytest.raises(ValueError, match="below the largest legitimate request"):
        max_receive_bytes(config)


def test_a_spec_with_every_field_at_its_limit_fits(tmp_path):
    config = farm_config(tmp_path)
    limits = config.model("ltx").limits
    spec = max_spec(limits, limits.max_image_bytes, placement=pb.Placement(
        require_device_kind=WIDE * MAX_DEVICE_KIND_CHARS, prefer_device_kind=WIDE * MAX_DEVICE_KIND_CHARS),
        postprocess=pb.PostprocessSpec(
            interpolation_factor=8, target_fps=120, upscale_factor=4, candidates=8,
            color_reference=pb.ColorReference(render_id=WIDE * MAX_REFERENCE_ID_CHARS, strength=0.5),
            encoder=pb.EncoderSettings(codec="h264", crf=51, bitrate_kbps=100_000, preset="veryslow")),
        width=4_000_000_000, height=4_000_000_000, num_frames=4_000_000_000, fps=4_000_000_000,
        num_inference_steps=4_000_000_000, guidance_scale=30.0, seed=2**64 - 1, priority=-(2**31))
    size = pb.SubmitRenderRequest(spec=spec).ByteSize()
    other = size - limits.max_image_bytes - 2 * 4 * limits.max_prompt_chars
    assert other > 32 * 1024, "the spec is not at its limits: the labels alone take more"
    assert size <= largest_request_bytes(config), f"the other fields take {other} bytes"


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with serving(farm_config(tmp_path_factory.mktemp("farm"))) as local:
        yield local


def test_a_message_just_over_the_limit_is_refused_before_it_is_parsed(farm):
    limit = max_receive_bytes(farm.gateway.config)
    # A valid request of exactly the limit is parsed, and refused by spec validation.
    spec = pb.RenderSpec(model="ltx", task=pb.TASK_IMAGE_TO_VIDEO, prompt="a lighthouse")
    spec.image = bytes(limit - pb.SubmitRenderRequest(spec=spec).ByteSize() - 8)
    while (size := pb.SubmitRenderRequest(spec=spec).ByteSize()) != limit:
        spec.image = bytes(len(spec.image) + limit - size)
    with pytest.raises(grpc.RpcError) as at_limit:
        farm.client.stub.SubmitRender(pb.SubmitRenderRequest(spec=spec), metadata=farm.client.metadata,
                                      timeout=CALL_TIMEOUT_S)
    assert at_limit.value.code() == grpc.StatusCode.INVALID_ARGUMENT, at_limit.value.details()
    assert "spec.image" in bad_request_fields(at_limit.value)

    send = farm.client.channel.unary_unary(SUBMIT)
    with pytest.raises(grpc.RpcError) as over:
        send(b"\x0a" + b"\x00" * limit, metadata=farm.client.metadata, timeout=CALL_TIMEOUT_S)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, over.value.details()
    assert str(limit) in over.value.details(), over.value.details()

    # The gateway carries on.
    assert [m.name for m in farm.client.models().models] == ["ltx"]
    health = farm.client.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert farm.gateway.large_requests.in_flight == 0


def test_a_spec_with_the_largest_image_and_every_field_at_its_limit_is_taken(farm):
    limits = farm.gateway.config.model("ltx").limits
    spec = max_spec(limits, limits.max_image_bytes)
    assert len(spec.image) == limits.max_image_bytes == 20 * MiB
    render = farm.client.submit(spec, timeout=CALL_TIMEOUT_S)
    assert render.state == pb.RENDER_STATE_QUEUED
    assert farm.store.get(farm.store.tenant_by_name("default").id, render.id).spec.image == spec.image
    # One byte more is spec validation's to refuse, not the transport's.
    spec.image = png_of_size(limits.max_image_bytes + 1)
    with pytest.raises(grpc.RpcError) as refused:
        farm.client.submit(spec, timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the maximum is {limits.max_image_bytes}" in bad_request_fields(refused.value)["spec.image"]


class BlockedSubmits:
    """Holds every store.submit until released, counting those that arrived."""

    def __init__(self, store):
        self.submit = store.submit
        self.arrived = 0
        self.condition = threading.Condition()
        self.release = threading.Event()
        store.submit = self

    def __call__(self, *args, **kwargs):
        with self.condition:
            self.arrived += 1
            self.condition.notify_all()
        assert self.release.wait(CALL_TIMEOUT_S), "the test never released the submit"
        return self.submit(*args, **kwargs)

    def wait_for(self, count: int) -> bool:
        with self.condition:
            return self.condition.wait_for(lambda: self.arrived >= count, timeout=CALL_TIMEOUT_S)


def test_large_requests_beyond_the_bound_are_refused_while_others_are_in_flight(tmp_path):
    config = farm_config(tmp_path, large_request_bytes=64 * 1024, max_concurrent_large_requests=2)
    with serving(config) as farm:
        blocked = BlockedSubmits(farm.gateway.store)
        client = farm.client
        large = pb.RenderSpec(model="ltx", task=pb.TASK_IMAGE_TO_VIDEO, prompt="a lantern", width=256, height=256,
                              num_frames=17, num_inference_steps=4, image=png_of_size(100 * 1024))
        assert pb.SubmitRenderRequest(spec=large).ByteSize() > 64 * 1024

        def submit(spec: pb.RenderSpec):
            return client.stub.SubmitRender.future(pb.SubmitRenderRequest(spec=spec), metadata=client.metadata,
                                                   timeout=CALL_TIMEOUT_S)

        in_flight = [submit(large), submit(large)]
        assert blocked.wait_for(2), "the two large submits never reached the store"
        assert farm.gateway.large_requests.in_flight == 2

        with pytest.raises(grpc.RpcError) as third:
            client.submit(large)
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, third.value.details()
        retry = next(error_details_pb2.RetryInfo.FromString(d.value)
                     for d in rpc_status.from_call(third.value).details
                     if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
        # Refused before parsing: a large body that is no message at all gets the same answer.
        garbage = b"\x0a\xff\xff\xff\x0f" + bytes(100 * 1024)
        send = client.channel.unary_unary(SUBMIT)
        with pytest.raises(grpc.RpcError) as unparsed:
            send(garbage, metadata=client.metadata, timeout=CALL_TIMEOUT_S)
        assert unparsed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, unparsed.value.details()
        # Small requests still go through, and nothing more reached the store.
        assert [m.name for m in client.models().models] == ["ltx"]
        assert blocked.arrived == 2

        blocked.release.set()
        assert [f.result(CALL_TIMEOUT_S).state for f in in_flight] == [pb.RENDER_STATE_QUEUED] * 2
        assert farm.gateway.large_requests.in_flight == 0
        # With room again, a large request is admitted (and the garbage one parsed, and refused for what it is).
        assert client.submit(large).state == pb.RENDER_STATE_QUEUED
        with pytest.raises(grpc.RpcError) as parsed:
            send(garbage, metadata=client.metadata, timeout=CALL_TIMEOUT_S)
        assert parsed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, parsed.value.details()
        assert blocked.arrived == 3
