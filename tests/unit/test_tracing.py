"""Tracing: off, it loads nothing and hands nothing on; on, the gateway continues the
caller's trace and the store keeps the submit's span for the scheduler. (The whole
trace across processes: tests/integration/test_tracing.py.)"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import grpc
import pytest

from farm import tracing
from farm.config import FarmConfig, ModelConfig, Task
from farm.families import Family
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc
from tests.gateway import serving
from tests.otlp import TraceReceiver

OWNER = "scheduler-test"


def test_tracing_off_costs_no_sdk_and_hands_no_context_on():
    code = """
import sys
from farm import tracing
with tracing.span("x", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") as span:
    assert tracing.traceparent_of(span) is None and not span.is_recording()
    with tracing.current(span):
        assert tracing.current_traceparent() is None
phases = tracing.Phases(None, "engine")
phases.enter("DENOISING"); phases.close()
assert tracing.caller_trace((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)) == (None, None)
assert not [m for m in sys.modules if m.startswith("opentelemetry.sdk")], "SDK loaded"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_config_refuses_an_endpoint_that_is_not_one():
    with pytest.raises(ValueError, match="tracing.otlp_endpoint"):
        FarmConfig(tracing={"otlp_endpoint": "http://collector:4317/v1/traces and more"})
    with pytest.raises(ValueError, match="tracing.sample_ratio"):
        FarmConfig(tracing={"sample_ratio": 1.5})


@pytest.fixture
def traced_gateway(tmp_path):
    receiver = TraceReceiver().start()
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "no-such-dir"})
    config = FarmConfig(home=tmp_path, models=[model],
                        tracing={"otlp_endpoint": receiver.endpoint, "flush_interval_s": 0.05})
    config.gateway.port = config.gateway.metrics_port = 0
    try:
        with serving(config) as local:
            yield local, receiver
    finally:
        tracing.shutdown()  # this process goes on untraced
        receiver.stop()


def submit(local, metadata=()) -> pb.Render:
    key = (local.gateway.config.keys_dir / "default.key").read_text().strip()
    with grpc.insecure_channel(local.target) as channel:
        spec = pb.RenderSpec(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite", width=256, height=256,
                             num_frames=17, num_inference_steps=4)
        return render_pb2_grpc.RenderServiceStub(channel).SubmitRender(
            pb.SubmitRenderRequest(spec=spec), metadata=(("authorization", f"Bearer {key}"), *metadata), timeout=30)


def gateway_span(receiver: TraceReceiver, render_id: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [s for s in receiver.spans() if s.attributes.get("farm.render_id") == render_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"no span of render {render_id}")


def test_the_gateway_continues_the_callers_trace_and_the_store_keeps_it(traced_gateway):
    local, receiver = traced_gateway
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    render = submit(local, [("traceparent", f"00-{trace_id}-{caller}-01"), ("tracestate", "vendor=1")])
    span = gateway_span(receiver, render.id)
    assert (span.service, span.name, span.trace_id, span.parent_span_id) == (
        "farm-gateway", "gateway SubmitRender", trace_id, caller)
    assert span.attributes["farm.model"] == "ltx" and span.attributes["farm.created"] is True
    # What the scheduler reads when it claims the render: the submit's span.
    claimed = {c.id: c for c in local.store.claim({"ltx": 10}, OWNER, 30)}
    assert claimed[render.id].trace_parent == f"00-{trace_id}-{span.span_id}-01"


def test_a_malformed_traceparent_starts_a_new_trace_and_the_submit_goes_through(traced_gateway):
    local, receiver = traced_gateway
    render = submit(local, [("traceparent", "00-not-a-trace-01")])
    span = gateway_span(receiver, render.id)
    assert span.parent_span_id == "" and len(span.trace_id) == 32
    claimed = {c.id: c for c in local.store.claim({"ltx": 10}, OWNER, 30)}
    assert claimed[render.id].trace_parent.split("-")[1] == span.trace_id


def test_a_refused_submit_is_a_span_with_its_error(traced_gateway):
    local, receiver = traced_gateway
    trace_id = secrets.token_hex(16)
    key = (local.gateway.config.keys_dir / "default.key").read_text().strip()
    with grpc.insecure_channel(local.target) as channel, pytest.raises(grpc.RpcError) as refused:
        render_pb2_grpc.RenderServiceStub(channel).SubmitRender(
            pb.SubmitRenderRequest(spec=pb.RenderSpec(model="ltx", prompt="x", width=7)),
            metadata=(("authorization", f"Bearer {key}"), ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")),
            timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 30
    while not receiver.spans(trace_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    [span] = receiver.spans(trace_id)
    assert span.error and span.name == "gateway SubmitRender"
