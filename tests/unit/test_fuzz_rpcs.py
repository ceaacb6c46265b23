"""Property-based fuzzing of every RPC of farm.v1.RenderService (hypothesis): requests
generated from the messages' descriptors, so a field added to the contract is fuzzed
without a change here, and bodies that are not a valid protobuf at all. Every answer
must carry a code a client can act on (never UNKNOWN or INTERNAL); every
INVALID_ARGUMENT a google.rpc.BadRequest naming real fields of the request; and the
gateway must still serve afterwards. The gateway runs in this process on loopback, on
SQLite and on PostgreSQL (whose text and integers are narrower), with real gRPC channels
and no Ray; its rate limits are off, so that every request reaches the servicer. The
tests after the fuzzing replay the inputs it found wrong. The runs are derandomized, so
CI sees the same examples every time; FARM_FUZZ_EXAMPLES=N asks for N times as many and
FARM_FUZZ_SEED=S for other examples, for a longer hunt."""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import io
import itertools
import os
import re
import struct
import zlib
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.spec import CODECS, ENCODER_PRESETS
from farm.domain.states import AttemptOutcome
from farm.families import Family
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc
from tests.conftest import postgres_schema
from tests.gateway import bad_request_fields, serving
from tests.unit.test_api_answers import LEAKS, TRAILER_LIMIT_BYTES

SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]
METHODS = [method.name for method in SERVICE.methods]
OWNER = "fuzz-test"
OFF = {"rate": 0}
# What the gateway says of a body it cannot decode: there is no field to name.
UNDECODABLE_FIELD = "request"
# A unary answer later than this is a hang (the slowest, a submit decoding an image, takes milliseconds).
UNARY_TIMEOUT_S = 20
# Streams are cut off after a few messages or this long, whichever comes first; a watch of
# a render that is not over waits for its next event, so most watches end by the deadline.
STREAM_TIMEOUT_S = 0.25
STREAM_MESSAGES = 3
# The codes of a stream this test cut off itself.
CUT_OFF = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SCALE = int(os.environ.get("FARM_FUZZ_EXAMPLES", "1"))
SEED = os.environ.get("FARM_FUZZ_SEED")
FUZZ = settings(deadline=None, derandomize=SEED is None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
# Examples per method: the streams take up to STREAM_TIMEOUT_S each, the rest milliseconds.
EXAMPLES = {"WatchRender": 40, "FetchArtifact": 60, "SubmitRender": 150, "EstimateCost": 150}
DEFAULT_EXAMPLES = 60


def examples(method: str) -> int:
    return EXAMPLES.get(method, DEFAULT_EXAMPLES) * SCALE


def fuzzing(method: str, share: float = 1.0):
    """The settings of a fuzz test of `method` (`share` of its examples), seeded by
    FARM_FUZZ_SEED where that is set, else derandomized."""
    def decorate(test):
        test = settings(FUZZ, max_examples=max(1, int(examples(method) * share)))(test)
        return seed(int(SEED))(test) if SEED else test
    return decorate


def spec(**changes) -> pb.RenderSpec:
    values = dict(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite over the dunes", width=256, height=256,
                  num_frames=17, num_inference_steps=4)
    values.update(changes)
    return pb.RenderSpec(**values)


def farm_config(home, store_url: str | None = None) -> FarmConfig:
    """Two models of two families (their weights need not be readable here), one with a
    named device kind, so that placement checks have kinds to compare; no rate limits."""
    sources = {Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"}
    models = [ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources=sources),
              ModelConfig(name="cog", family=Family.COGVIDEOX, sources=sources, device_kind="A100")]
    limits = {"submits": OFF, "reads": OFF, "watches": 0, "peer_submits": OFF, "peer_reads": OFF, "peer_watches": 0}
    return FarmConfig(home=home, models=models, store={"url": store_url},
                      gateway={"port": 0, "metrics_port": 0, "rate_limits": limits})


# Images ----------------------------------------------------------------------------------


def picture(format_: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 80, 20)).save(buffer, format=format_)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (with a correct CRC) and whose pixels are one row."""
    png = picture("PNG", (1, 1))
    header = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


PNG, JPEG = picture("PNG"), picture("JPEG")
IMAGES = [PNG, JPEG, picture("GIF"), picture("BMP"), picture("TIFF"), picture("WEBP"), PNG[:len(PNG) // 2],
          JPEG[:40], png_claiming(2**31 - 1, 2**31 - 1), png_claiming(0, 0), png_claiming(5000, 5000),
          b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]


# Strategies built from descriptors -------------------------------------------------------

INTEGER_RANGES = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32),
                    (-2**31, 2**31 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64),
                    (-2**63, 2**63 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, 2**64 - 1)),
}
# Values at which limits and integer types break.
EDGES = (0, 1, -1, 2, 7, 8, 9, 31, 32, 33, 100, 101, 1000, 1001, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**53 + 1,
         2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63, 253402300799, 253402300800, -62135596800, -62135596801,
         999_999_999, 1_000_000_000)
# Lengths of long strings: around the limits of ids, keys, quoted values and prompts.
LONG_LENGTHS = (32, 33, 63, 64, 65, 129, 257, 4001, 9000)
MAX_DEPTH = 5


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in EDGES if low <= v <= high} | {low, high})
    return st.one_of(st.integers(max(low, -3), min(high, 300)), st.sampled_from(edges), st.integers(low, high))


def texts() -> st.SearchStrategy[str]:
    long = st.builds(lambda char, length: char * length, st.characters(codec="utf-8"), st.sampled_from(LONG_LENGTHS))
    return st.one_of(st.text(max_size=24), long, st.sampled_from([" \t\n", "\x00", "a\x00b"]))


def page_tokens(render_ids: list[str]) -> st.SearchStrategy[str]:
    """Tokens of ListRenders' format (base64 of `<created_at ISO time>|<render id>`) that it
    never returned: any time and offset a timestamp holds, any id."""
    offsets = st.builds(dt.timezone, st.timedeltas(min_value=-dt.timedelta(hours=23, minutes=59),
                                                   max_value=dt.timedelta(hours=23, minutes=59)))
    times = st.one_of(st.datetimes(timezones=offsets), st.datetimes(), st.dates()).map(lambda t: t.isoformat())
    ids = st.one_of(st.sampled_from(render_ids), st.text(st.characters(codec="utf-8"), max_size=40))
    return st.builds(lambda time, render_id: base64.urlsafe_b64encode(f"{time}|{render_id}".encode()).decode(),
                     times, ids)


def scalars(field: FieldDescriptor, hints: dict) -> st.SearchStrategy:
    """One value of a field that is not a message, with the field's hints (values known to
    mean something to the gateway, by field name: a list, or a strategy) among the candidates."""
    hinted = hints.get(field.name, [])
    if isinstance(hinted, st.SearchStrategy):
        hinted_values = hinted
    else:
        hinted_values = st.sampled_from(hinted) if hinted else st.nothing()
    kind = field.type
    if kind in INTEGER_RANGES:
        values = integers(*INTEGER_RANGES[kind])
    elif kind == FieldDescriptor.TYPE_ENUM:
        # Proto3 enums are open: a client may send any int32, named or not.
        values = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), integers(-2**31, 2**31 - 1))
    elif kind == FieldDescriptor.TYPE_FLOAT:
        values = st.floats(width=32)
    elif kind == FieldDescriptor.TYPE_DOUBLE:
        values = st.floats()
    elif kind == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif kind == FieldDescriptor.TYPE_STRING:
        values = texts()
    elif kind == FieldDescriptor.TYPE_BYTES:
        values = st.one_of(st.sampled_from(IMAGES), st.binary(max_size=64))
    else:
        raise AssertionError(f"no strategy for {field.full_name} of type {kind}")
    return st.one_of(hinted_values, values)


def is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(descriptor: Descriptor, hints: dict, base: Message | None = None,
             depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with any of its fields set to anything its type holds: every
    field, nested messages, maps and repeated fields, enums in and out of range. With a
    `base`, a few of its fields changed instead (so that the rest stays valid and the
    request gets past the first check)."""

    @st.composite
    def build(draw) -> Message:
        message = GetMessageClass(descriptor)()
        if base is not None:
            message.CopyFrom(base)
        # Shrinking leaves fields unset (or as the base has them).
        chosen = st.booleans() if base is None else st.sampled_from([False, False, False, True])
        for field in descriptor.fields:
            if draw(chosen):
                set_field(draw, message, field, hints, depth)
        return message

    return build()


def set_field(draw, message: Message, field: FieldDescriptor, hints: dict, depth: int) -> None:
    target = getattr(message, field.name)
    if is_map(field):
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        values = (messages(value_field.message_type, hints, depth=depth + 1)
                  if value_field.type == FieldDescriptor.TYPE_MESSAGE else scalars(value_field, hints))
        keys = scalars(key_field, hints)
        entries = draw(st.one_of(st.dictionaries(keys, values, max_size=4),
                                 st.dictionaries(keys, values, min_size=33, max_size=40)))
        target.clear()
        for key, value in entries.items():
            if isinstance(value, Message):
                target[key].CopyFrom(value)
            else:
                target[key] = value
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        nested = messages(field.message_type, hints, depth=depth + 1) if depth < MAX_DEPTH else st.none()
        if field.is_repeated:
            del target[:]
            target.extend(draw(st.lists(nested, max_size=3)))
        else:
            target.SetInParent()
            value = draw(nested)
            if value is not None:
                target.CopyFrom(value)
    elif field.is_repeated:
        values = scalars(field, hints)
        del target[:]
        target.extend(draw(st.one_of(st.lists(values, max_size=4), st.lists(values, min_size=30, max_size=40))))
    else:
        setattr(message, field.name, draw(scalars(field, hints)))


def field_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field of a message and, through singular message fields, of its messages."""
    for field in descriptor.fields:
        yield (field,)
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and depth < MAX_DEPTH:
            for rest in field_paths(field.message_type, depth + 1):
                yield (field, *rest)


def one_field_changed(base: Message, hints: dict) -> st.SearchStrategy[Message]:
    """`base` with one field, at any depth, set to anything its type holds: each field's
    edges are reached past every check before it."""

    @st.composite
    def build(draw) -> Message:
        message = type(base)()
        message.CopyFrom(base)
        *outer, field = draw(st.sampled_from(list(field_paths(base.DESCRIPTOR))))
        target = message
        for step in outer:
            target = getattr(target, step.name)
        set_field(draw, target, field, hints, len(outer))
        return message

    return build()


def requests(method: str, farm) -> st.SearchStrategy[Message]:
    """Requests of `method`: anything, or a valid request with one or a few fields changed."""
    descriptor = SERVICE.methods_by_name[method].input_type
    strategies = [messages(descriptor, farm.hints)]
    if method in farm.valid:
        base = farm.valid[method]
        strategies += [one_field_changed(base, farm.hints), messages(descriptor, farm.hints, base=base)]
    return st.one_of(*strategies)


@st.composite
def corrupt_bodies(draw, method: str, farm) -> bytes:
    """Bytes that are mostly not a `method` request: random bytes, or a request's bytes
    truncated, with a byte changed, with bytes inserted or with invalid UTF-8 spliced in."""
    whole = draw(requests(method, farm)).SerializeToString()
    how = draw(st.sampled_from(["random", "truncated", "changed", "inserted", "utf8"]))
    if how == "random" or not whole:
        return draw(st.binary(max_size=128))
    at = draw(st.integers(0, len(whole) - 1))
    if how == "truncated":
        return whole[:at]
    if how == "changed":
        return whole[:at] + bytes([draw(st.integers(0, 255))]) + whole[at + 1:]
    if how == "inserted":
        return whole[:at] + draw(st.binary(min_size=1, max_size=8)) + whole[at:]
    # A string field (1, in every request that has one) holding bytes that are not UTF-8.
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
    return b"\x0a" + bytes([len(bad)]) + bad + whole


# Checking answers ------------------------------------------------------------------------

SUBSCRIPT = re.compile(r"""\[(\d+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")(\.\.\. \(\d+ characters\))?\]""")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_field_path(path: str, descriptor: Descriptor) -> bool:
    """Whether `path` names a field of a `descriptor` message: `render_id`, `spec.width`,
    `spec.postprocess.encoder.codec`, `spec.labels['team']` (a subscript only after a map
    or a repeated field)."""
    at = 0
    while True:
        name = NAME.match(path, at)
        if descriptor is None or name is None or name.group() not in descriptor.fields_by_name:
            return False
        field = descriptor.fields_by_name[name.group()]
        at = name.end()
        descriptor = field.message_type
        if at < len(path) and path[at] == "[":
            subscript = SUBSCRIPT.match(path, at)
            if not field.is_repeated or subscript is None:
                return False
            at = subscript.end()
            if is_map(field):
                descriptor = field.message_type.fields_by_name["value"].message_type
        if at == len(path):
            return True
        if path[at] != ".":
            return False
        at += 1


def violations(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    found = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(bad.field_violations)
    return found


def check_answer(method: str, error: grpc.RpcError | None, undecodable: bool = False) -> None:
    """An answer a client can act on; an INVALID_ARGUMENT names real fields of the request
    (or, for a body that is not the request at all, the request)."""
    if error is None:
        return
    code = error.code()
    assert code not in NEVER, f"{method} answered {code.name}: {error.details()}"
    # The streams this test cut off are not here: a unary call past its deadline hung.
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} did not answer in {UNARY_TIMEOUT_S} s"
    text = error.details() or ""
    assert not LEAKS.search(text), f"{method}'s answer shows the gateway's insides: {text}"
    trailers = sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())
    assert trailers < TRAILER_LIMIT_BYTES / 2, f"{method}'s answer has {trailers} bytes of trailers"
    if undecodable:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method} answered an undecodable body with {code.name}"
        assert UNDECODABLE_FIELD in bad_request_fields(error), bad_request_fields(error)
        return
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return
    descriptor = SERVICE.methods_by_name[method].input_type
    named = violations(error)
    assert any(v.field for v in named), f"{method}: INVALID_ARGUMENT without a field: {error.details()}"
    for violation in named:
        if not violation.field:
            assert "more problems" in violation.description, violation
            continue
        assert is_field_path(violation.field, descriptor), (
            f"{method}: {violation.field!r} is not a field of {descriptor.full_name} ({violation.description})")


def invoke(farm, method: str, request: Message | bytes) -> grpc.RpcError | None:
    """Sends `request` (a message, or raw bytes as the body) as it is; reads at most a few
    messages of a stream. None when the call succeeded (or a stream was cut off here)."""
    streaming = SERVICE.methods_by_name[method].server_streaming
    if isinstance(request, bytes):
        path = f"/{SERVICE.full_name}/{method}"
        call = (farm.channel.unary_stream if streaming else farm.channel.unary_unary)(path)
    else:
        call = getattr(farm.stub, method)
    try:
        if not streaming:
            call(request, metadata=farm.metadata, timeout=UNARY_TIMEOUT_S)
            return None
        responses = call(request, metadata=farm.metadata, timeout=STREAM_TIMEOUT_S)
        try:
            list(itertools.islice(responses, STREAM_MESSAGES))
        finally:
            responses.cancel()
        return None
    except grpc.RpcError as error:
        if streaming and error.code() in CUT_OFF:
            return None
        return error


def served_codes(gateway) -> dict[tuple[str, str], float]:
    """(method, code) -> calls the gateway answered so."""
    return {(s.labels["method"], s.labels["code"]): s.value for m in gateway.metrics.registry.collect()
            for s in m.samples if s.name == "farm_gateway_requests_total" and s.value}


# The farm ---------------------------------------------------------------------------------


def finish(local, render_id: str, artifacts: tuple[str, str] | None = None) -> None:
    """Runs the render to SUCCEEDED as the scheduler would."""
    claimed = {c.id: c for c in local.store.claim({"ltx": 10}, OWNER, 30)}
    video_uri, manifest_uri = artifacts or (None, None)
    local.store.finish(OWNER, render_id, claimed[render_id].attempt, AttemptOutcome.SUCCEEDED,
                       artifact_uri=video_uri, manifest_uri=manifest_uri)


@contextlib.contextmanager
def store_url(kind: str) -> Iterator[str | None]:
    """SQLite in the farm's home (None), or a PostgreSQL schema of its own, dropped afterwards."""
    if kind == "sqlite":
        yield None
        return
    with postgres_schema("farm_fuzz") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def farm(request, tmp_path_factory):
    """The gateway on each store, with renders in every state to aim at, and the hints
    that aim there."""
    with store_url(request.param) as url:
        yield from aimed_farm(farm_config(tmp_path_factory.mktemp("farm"), url), request.param)


def aimed_farm(config: FarmConfig, store: str) -> Iterator[SimpleNamespace]:
    with serving(config) as local, grpc.insecure_channel(local.target) as channel:
        # Raw generated stubs, not the client SDK: the fuzzed messages go out as they are.
        stub = render_pb2_grpc.RenderServiceStub(channel)
        metadata = (("authorization", f"Bearer {(config.keys_dir / 'default.key').read_text().strip()}"),)

        def submit(render_spec: pb.RenderSpec) -> str:
            return stub.SubmitRender(pb.SubmitRenderRequest(spec=render_spec), metadata=metadata, timeout=30).id

        succeeded = submit(spec(labels={"team": "fuzz"}))
        artifacts = ArtifactStore(local.gateway.config.artifacts_url)
        manifest = {"seed": 1, "postprocess": {"color_statistics": {"mean": [50, 0, 0], "std": [10, 5, 5]}}}
        finish(local, succeeded, artifacts.write(succeeded, 1, b"\x00\x00\x00\x18ftypmp42" + bytes(5000), manifest))
        running = submit(spec())
        local.store.claim({"ltx": 10}, OWNER, 300)
        cancelled = submit(spec())
        stub.CancelRender(pb.CancelRenderRequest(render_id=cancelled), metadata=metadata, timeout=30)
        queued = submit(spec(model="cog", width=480, height=480, num_frames=9))
        page = stub.ListRenders(pb.ListRendersRequest(page_size=1), metadata=metadata, timeout=30).next_page_token
        ids = [succeeded, running, cancelled, queued]
        hints = {
            "render_id": ids + [ids[0].upper(), ids[0][:-1], ids[0] + "0", "r" + "0" * 31, "../../etc/passwd"],
            "model": ["ltx", "cog", "LTX", "ltx "],
            "prompt": ["a kite over the dunes"],
            "codec": [*CODECS, "hevc"],
            "preset": [*ENCODER_PRESETS, "placebo"],
            "require_device_kind": ["A100", "H100", "CPU", "auto"],
            "prefer_device_kind": ["A100", "H100", "CPU"],
            "idempotency_key": ["fuzz-1", "fuzz-2"],
            "key": ["team", "a.b/c-d", "Team", "-x"],
            "page_token": st.one_of(st.sampled_from([page, base64.urlsafe_b64encode(b"not a date|r0").decode(),
                                                     base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|\xff").decode(),
                                                     base64.urlsafe_b64encode(b"2024-01-01T00:00:00+99:00|r").decode(),
                                                     "====", "\x00"]),
                                    page_tokens(ids)),
            "image": [PNG, JPEG],
        }
        valid = {
            "SubmitRender": pb.SubmitRenderRequest(spec=spec()),
            "EstimateCost": pb.EstimateCostRequest(spec=spec()),
            "GetUsage": pb.GetUsageRequest(since={"seconds": 0}, until={"seconds": 86400 * 365 * 60}),
            "FetchArtifact": pb.FetchArtifactRequest(render_id=succeeded),
            "WatchRender": pb.WatchRenderRequest(render_id=succeeded),
            "ListRenders": pb.ListRendersRequest(page_size=2, page_token=page),
        }
        renders = SimpleNamespace(succeeded=succeeded, running=running, cancelled=cancelled, queued=queued)
        # Method -> the codes its fuzz tests must have seen it answer.
        fuzzed = collections.defaultdict(set)
        yield SimpleNamespace(local=local, store=store, channel=channel, stub=stub, metadata=metadata, hints=hints,
                              valid=valid, renders=renders, fuzzed=fuzzed)


# The fuzzing ------------------------------------------------------------------------------


def test_every_rpc_of_the_service_is_fuzzed():
    assert set(METHODS) == set(pb.DESCRIPTOR.services_by_name["RenderService"].methods_by_name)
    assert len(METHODS) >= 9


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_requests_get_an_actionable_answer(farm, method):
    @fuzzing(method)
    @given(st.data())
    def fuzz(data):
        request = data.draw(requests(method, farm), label="request")
        check_answer(method, invoke(farm, method, request))

    fuzz()
    farm.fuzzed[method].add("OK")


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_bodies_that_are_not_a_request_are_invalid_argument(farm, method):
    request_class = GetMessageClass(SERVICE.methods_by_name[method].input_type)

    @fuzzing(method, share=0.5)
    @given(st.data())
    def fuzz(data):
        body = data.draw(corrupt_bodies(method, farm), label="body")
        try:
            request_class.FromString(body)
            undecodable = False
        except DecodeError:
            undecodable = True
        check_answer(method, invoke(farm, method, body), undecodable)

    fuzz()
    farm.fuzzed[method].add("INVALID_ARGUMENT")


def test_the_field_path_check_knows_fields_from_the_rest():
    submit = pb.SubmitRenderRequest.DESCRIPTOR
    for path in ("spec", "spec.width", "spec.postprocess.encoder.codec", "spec.labels['team']",
                 "spec.labels['\\x1f\\x1f'... (63 characters)]", "spec.postprocess.color_reference.statistics.mean"):
        assert is_field_path(path, submit), path
    for path in ("", "request", "width", "spec.", "spec.nope", "spec.width.x", "spec.labels['team'", "spec.model[0]",
                 "spec.labels['team'].x", "spec.labels['\\x1f\\x1f... (11 more bytes)"):
        assert not is_field_path(path, submit), path
    assert is_field_path("render_id", pb.GetRenderRequest.DESCRIPTOR)
    assert is_field_path("since.seconds", pb.GetUsageRequest.DESCRIPTOR)


# Regressions: the exact inputs the fuzzing found ---------------------------------------------


def refused(farm, method: str, request: Message) -> grpc.RpcError:
    error = invoke(farm, method, request)
    assert error is not None, f"{method} accepted {request}"
    check_answer(method, error)
    return error


def test_a_label_key_that_quotes_long_is_still_named_by_its_whole_field_path(farm):
    """63 control characters quoted as 254 bytes, and the gateway cut the field path off at
    256 bytes before its closing bracket; a long model name of them pushed the list of
    served models out of the description."""
    key = "\x1f" * 63
    for method, message in (("SubmitRender", pb.SubmitRenderRequest), ("EstimateCost", pb.EstimateCostRequest)):
        error = refused(farm, method, message(spec=pb.RenderSpec(model="ltx", labels={key: " \t\n"})))
        [field] = [name for name in bad_request_fields(error) if name.startswith("spec.labels[")]
        assert field.endswith("... (63 characters)]")
        error = refused(farm, method, message(spec=spec(model="\U000e0001" * 9000)))
        assert bad_request_fields(error)["spec.model"].endswith("(9000 characters); served models: cog, ltx")


def test_a_target_fps_beside_an_fps_of_zero_is_invalid_argument(farm):
    """It was INTERNAL: the target was divided by the fps before the fps was known to be good."""
    for method, message in (("SubmitRender", pb.SubmitRenderRequest), ("EstimateCost", pb.EstimateCostRequest)):
        request = message(spec=pb.RenderSpec(model="ltx", fps=0, postprocess=pb.PostprocessSpec(target_fps=1)))
        error = refused(farm, method, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside 1..60" in bad_request_fields(error)["spec.fps"]


NUL_REQUESTS = {
    "GetRender": (pb.GetRenderRequest(render_id="r\x00"), "render_id"),
    "CancelRender": (pb.CancelRenderRequest(render_id="r\x00"), "render_id"),
    "WatchRender": (pb.WatchRenderRequest(render_id="r\x00"), "render_id"),
    "FetchArtifact": (pb.FetchArtifactRequest(render_id="r\x00"), "render_id"),
    "ListRenders": (pb.ListRendersRequest(model="\x00"), "model"),
    "SubmitRender": (pb.SubmitRenderRequest(spec=spec(idempotency_key="k\x00")), "spec.idempotency_key"),
    "EstimateCost": (pb.EstimateCostRequest(spec=spec(placement=pb.Placement(prefer_device_kind="\x00"))),
                     "spec.placement.prefer_device_kind"),
}


def test_a_nul_character_in_a_string_is_invalid_argument_naming_the_field(farm):
    """On PostgreSQL each was INTERNAL (its text cannot hold U+0000, and the query failed);
    on SQLite most were NOT_FOUND or accepted."""
    cases = {**NUL_REQUESTS, "color reference": (
        pb.SubmitRenderRequest(spec=spec(postprocess=pb.PostprocessSpec(
            color_reference=pb.ColorReference(render_id=farm.renders.succeeded + "\x00")))),
        "spec.postprocess.color_reference.render_id"), "label": (
        pb.SubmitRenderRequest(spec=spec(labels={"team": "a\x00b", "x\x00": "y"})), "spec.labels['team']")}
    for case, (request, field) in cases.items():
        method = case if case in METHODS else "SubmitRender"
        error = refused(farm, method, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.details())
        assert "NUL character (U+0000)" in bad_request_fields(error)[field], case
    labels = bad_request_fields(refused(farm, "SubmitRender", cases["label"][0]))
    assert {"spec.labels['team']", "spec.labels['x\\x00']"} <= set(labels)


def test_an_after_sequence_past_a_32_bit_integer_is_past_every_event(farm):
    """On PostgreSQL (where event sequences are 32-bit) it was INTERNAL, "integer out of range"."""
    queued = farm.stub.SubmitRender(pb.SubmitRenderRequest(spec=spec()), metadata=farm.metadata, timeout=30).id
    for after in (2**31, 2**63 - 1):
        request = pb.WatchRenderRequest(render_id=farm.renders.succeeded, after_sequence=after)
        assert list(farm.stub.WatchRender(request, metadata=farm.metadata, timeout=30)) == []
        request = pb.WatchRenderRequest(render_id=queued, after_sequence=after)
        with pytest.raises(grpc.RpcError) as cut:
            list(farm.stub.WatchRender(request, metadata=farm.metadata, timeout=0.5))
        assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # waiting for its next event


def test_the_gateway_still_serves_after_the_fuzzing(farm):
    """Runs after the fuzzing above (pytest keeps a module's order): health checks and a
    plain submit are answered, and the gateway itself counted no UNKNOWN or INTERNAL answer
    (streams cut off by the client included)."""
    health = health_pb2_grpc.HealthStub(farm.channel)
    for service in ("", SERVICE.full_name):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        # NOT_SERVING: no engine pool is up in this farm, but the gateway answers.
        assert answer.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    render = farm.stub.SubmitRender(pb.SubmitRenderRequest(spec=spec(prompt="after the fuzzing")),
                                    metadata=farm.metadata, timeout=30)
    assert render.state == pb.RENDER_STATE_QUEUED
    assert farm.stub.GetRender(pb.GetRenderRequest(render_id=render.id), metadata=farm.metadata, timeout=30).id == render.id
    served = served_codes(farm.local.gateway)
    bad = {key: count for key, count in served.items() if key[1] in ("UNKNOWN", "INTERNAL")}
    assert not bad, bad
    # The fuzzing reached both sides of each method: requests served and requests refused.
    for method, codes in farm.fuzzed.items():
        assert codes <= {code for (name, code) in served if name == method}, method


FORGED_TOKENS = {
    # A time without an offset: the store refuses naive datetimes (it was INTERNAL).
    "naive time": b"2024-01-01T00:00:00|r",
    "date only": b"2024-01-01|r",
    # PostgreSQL's text cannot hold U+0000 (it was INTERNAL there).
    "NUL in the id": b"2024-01-01T00:00:00+00:00|r\x00",
}


@pytest.mark.parametrize("case", sorted(FORGED_TOKENS))
def test_a_forged_page_token_is_invalid_argument(farm, case):
    """Tokens the fuzzer found answered INTERNAL (farm/jobs/store/renders.py, _decode_page_token)."""
    token = FORGED_TOKENS[case]
    error = invoke(farm, "ListRenders", pb.ListRendersRequest(page_token=base64.urlsafe_b64encode(token).decode()))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error and error.details()
    assert "page_token" in bad_request_fields(error)
