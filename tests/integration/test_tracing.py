"""A render is one trace across the farm's processes: the caller's W3C traceparent
reaches the gateway, the store carries it to the scheduler, the scheduler hands it to
the engine replica, and the engine to the post-processing replicas. Every process
exports its own spans over OTLP to the test's receiver (tests/otlp.py)."""

from __future__ import annotations

import json
import secrets

import grpc

from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc
from tests.integration.test_render_path import small_spec

# A prefix of each span name the trace must hold, by the process that sends it.
EXPECTED = {
    "gateway SubmitRender": "farm-gateway",
    "scheduler queued": "farm-scheduler",
    "scheduler attempt 1": "farm-scheduler",
    "engine attempt": "farm-engine",
    "engine denoising": "farm-engine",
    "engine decoding": "farm-engine",
    "engine postprocess": "farm-engine",
    "engine writing": "farm-engine",
    "postproc chunk": "farm-postproc",
}


def submit_traced(target: str, api_key: str, spec: pb.RenderSpec, traceparent: str) -> pb.Render:
    with grpc.insecure_channel(target) as channel:
        return render_pb2_grpc.RenderServiceStub(channel).SubmitRender(
            pb.SubmitRenderRequest(spec=spec),
            metadata=(("authorization", f"Bearer {api_key}"), ("traceparent", traceparent)), timeout=30)


def test_one_render_is_one_trace_from_the_caller_to_post_processing(gateway, api_key, client, trace_receiver):
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    render = submit_traced(gateway.target, api_key, small_spec(frames=17, seed=77), f"00-{trace_id}-{caller_span}-01")
    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error

    manifest = json.loads(client.fetch(render.id, pb.ARTIFACT_KIND_MANIFEST))
    chunk_count = len(manifest["postprocess"]["chunks"])
    spans = trace_receiver.wait_for(trace_id, dict.fromkeys(EXPECTED, 1) | {"postproc chunk": chunk_count})
    for prefix, service in EXPECTED.items():
        assert {s.service for s in spans if s.name.startswith(prefix)} == {service}, prefix
    by_name = {s.name: s for s in spans}
    gateway_span, attempt = by_name["gateway SubmitRender"], by_name["scheduler attempt 1"]
    engine = by_name["engine attempt"]
    # Each process's spans hang under the span that handed the render on.
    assert gateway_span.parent_span_id == caller_span
    assert gateway_span.attributes["farm.render_id"] == render.id
    assert by_name["scheduler queued"].parent_span_id == gateway_span.span_id
    assert attempt.parent_span_id == gateway_span.span_id
    assert attempt.attributes["farm.ending"] == "Finish"
    assert engine.parent_span_id == attempt.span_id
    for phase in ("engine denoising", "engine decoding", "engine postprocess", "engine writing"):
        assert by_name[phase].parent_span_id == engine.span_id, phase
        assert engine.start_ns <= by_name[phase].start_ns <= by_name[phase].end_ns <= engine.end_ns, phase
    # One span per post-processed chunk, each under the render's post-processing span.
    chunks = [s for s in spans if s.name.startswith("postproc chunk")]
    assert len(chunks) == chunk_count > 1
    assert {s.parent_span_id for s in chunks} == {by_name["engine postprocess"].span_id}
    assert not any(s.error for s in spans)


def test_a_caller_that_does_not_sample_its_trace_gets_no_spans(gateway, api_key, client, trace_receiver):
    trace_id = secrets.token_hex(16)
    render = submit_traced(gateway.target, api_key, small_spec(seed=78), f"00-{trace_id}-{secrets.token_hex(8)}-00")
    assert client.wait(render.id, timeout=300).state == pb.RENDER_STATE_SUCCEEDED
    # The render's own gateway span would name it: wait until a later traced render's
    # spans arrive, by which time this one's would have too.
    marker = secrets.token_hex(16)
    later = submit_traced(gateway.target, api_key, small_spec(seed=79), f"00-{marker}-{secrets.token_hex(8)}-01")
    assert client.wait(later.id, timeout=300).state == pb.RENDER_STATE_SUCCEEDED
    trace_receiver.wait_for(marker, {"engine writing"})
    assert trace_receiver.spans(trace_id) == []
    assert not [s for s in trace_receiver.spans() if s.attributes.get("farm.render_id") == render.id]
