"""The gateway's answers on the real farm (the gateway process, Ray Serve engines): a
client reconnecting after a render ended, artifact kinds it does not know, and bodies
that are not the request. tests/unit/test_api_answers.py covers every case without Ray."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from farm.v1 import render_pb2 as pb
from tests.gateway import bad_request_fields
from tests.integration.test_render_path import small_spec


@pytest.fixture(scope="module")
def finished(gateway, api_key):
    """A rendered clip and every event of its render."""
    from farm.client import FarmClient

    with FarmClient(gateway.target, api_key) as client:
        render = client.submit(small_spec(steps=2))
        events = list(client.watch(render.id, timeout=300))
    assert events[-1].state == pb.RENDER_STATE_SUCCEEDED
    return render, events


def test_a_client_reconnecting_after_the_final_event_gets_the_end_at_once(client, finished):
    render, events = finished
    last = events[-1].sequence
    for after in (last, last + 5):
        # A hang would end in DEADLINE_EXCEEDED here.
        assert list(client.watch(render.id, after_sequence=after, timeout=30)) == []
    resumed = list(client.watch(render.id, after_sequence=events[-3].sequence, timeout=30))
    assert [e.sequence for e in resumed] == [e.sequence for e in events[-2:]]


def test_an_unknown_artifact_kind_is_invalid_argument(client, finished):
    render, _ = finished
    assert client.fetch(render.id, kind=pb.ARTIFACT_KIND_VIDEO)[4:8] == b"ftyp"
    with pytest.raises(grpc.RpcError) as error:
        client.fetch(render.id, kind=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind" in bad_request_fields(error.value)


def test_a_gif_first_frame_is_invalid_argument(client):
    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (90, 140, 200)).save(buffer, format="GIF")
    with pytest.raises(grpc.RpcError) as error:
        client.submit(small_spec(task=pb.TASK_IMAGE_TO_VIDEO, image=buffer.getvalue()))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PNG or JPEG" in bad_request_fields(error.value)["spec.image"]


@pytest.mark.parametrize("method,body", [("GetRender", b"\x0a\x7f"), ("WatchRender", b"\x0a\x02\xff\xfe")])
def test_a_body_that_is_not_the_request_is_invalid_argument(client, method, body):
    path = f"/farm.v1.RenderService/{method}"
    if method == "WatchRender":
        stream = client.channel.unary_stream(path)
        call = lambda: list(stream(body, metadata=client.metadata, timeout=30))  # noqa: E731
    else:
        unary = client.channel.unary_unary(path)
        call = lambda: unary(body, metadata=client.metadata, timeout=30)  # noqa: E731
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"farm.v1.{method}Request" in bad_request_fields(error.value)["request"]
    assert "Error" not in error.value.details()
