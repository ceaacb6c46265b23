"""What the gateway answers when a call cannot be served: every answer has a code a
client can act on (never UNKNOWN), google.rpc details, and no Python class names, SQL
or whole long values. The gateway runs in this process on loopback with real gRPC
channels, on SQLite, and on PostgreSQL for the database cuts; no Ray: renders are
claimed and finished through the store, as the scheduler would."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as dt
import io
import logging
import re
import secrets
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from farm.api.interceptors import CURRENT_TENANT, ErrorInterceptor
from farm.api.metrics import GatewayMetrics
from farm.api.server import Gateway
from farm.api.servicer import RenderServicer
from farm.api.watch import EventHub
from farm.client import FarmClient
from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.states import AttemptOutcome
from farm.families import Family
from farm.jobs.store import JobStore
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from tests.conftest import POSTGRES_URL, postgres_role, terminate_connections
from tests.gateway import LocalGateway, bad_request_fields, serving

OWNER = "scheduler-test"
SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]
# Answers must not show how the gateway is built: exception classes, tracebacks, SQL.
LEAKS = re.compile(r"<class |Traceback|\b\w+(Error|Exception)\b|\[SQL|\bSELECT\b|\bINSERT\b|\bUPDATE\b|"
                   r"sqlalche\.me|psycopg|sqlite")
# Clients refuse trailers past 8 KiB (some of the time) and 16 KiB (always).
TRAILER_LIMIT_BYTES = 8192
LONG = 9000


def spec(**changes) -> pb.RenderSpec:
    values = dict(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite over the dunes", width=256, height=256,
                  num_frames=17, num_inference_steps=4)
    values.update(changes)
    return pb.RenderSpec(**values)


def farm_config(home, store_url: str | None = None) -> FarmConfig:
    """One LTX-Video model on the CPU (its weights need not be readable here)."""
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO,
                        sources={Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"})
    config = FarmConfig(home=home, models=[model], store={"url": store_url})
    config.gateway.port = config.gateway.metrics_port = 0
    return config


def finish(farm: LocalGateway, render_id: str, artifacts: tuple[str, str] | None = None) -> None:
    """Runs the render to SUCCEEDED as the scheduler would."""
    claimed = {c.id: c for c in farm.store.claim({"ltx": 10}, OWNER, 30)}
    video_uri, manifest_uri = artifacts or (None, None)
    farm.store.finish(OWNER, render_id, claimed[render_id].attempt, AttemptOutcome.SUCCEEDED,
                      artifact_uri=video_uri, manifest_uri=manifest_uri)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with serving(farm_config(tmp_path_factory.mktemp("farm"))) as local:
        yield local


def status_text(error: grpc.RpcError) -> str:
    """The message and every detail of an answer, as text."""
    status = rpc_status.from_call(error)
    parts = [error.details() or ""]
    for detail in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                parts.append(str(message))
    return "\n".join(parts)


def assert_clean(error: grpc.RpcError) -> None:
    assert error.code() != grpc.StatusCode.UNKNOWN, error.details()
    text = status_text(error)
    assert not LEAKS.search(text), f"the answer shows the gateway's insides: {text}"
    trailers = sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())
    assert trailers < TRAILER_LIMIT_BYTES / 2


def detail(error: grpc.RpcError, kind):
    status = rpc_status.from_call(error)
    for packed in status.details if status else ():
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    return None


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert_clean(caught.value)
    return caught.value


def raw_call(channel: grpc.Channel, method) -> callable:
    """Sends whatever bytes it is given as the body of `method`."""
    path = f"/{SERVICE.full_name}/{method.name}"
    if method.server_streaming:
        stream = channel.unary_stream(path)
        return lambda body, **kwargs: list(stream(body, **kwargs))
    return channel.unary_unary(path)


# Bodies ----------------------------------------------------------------------------------

CORRUPT_BODIES = {
    # Field 1 (length-delimited) claims 127 bytes; none follow.
    "truncated": b"\x0a\x7f",
    # A varint that never ends.
    "corrupt wire format": b"\x08" + b"\xff" * 11,
    # Field 1 is a string in every request that has one (render_id, spec's model is
    # nested): 0xff is not UTF-8.
    "invalid UTF-8": b"\x0a\x02\xff\xfe",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_BODIES))
def test_a_body_that_is_not_the_request_is_invalid_argument_on_every_method(farm, case):
    body = CORRUPT_BODIES[case]
    refused = []
    for method in SERVICE.methods:
        try:
            getattr(pb, method.input_type.name).FromString(body)
            continue  # valid for this request (e.g. unknown fields of ListModelsRequest)
        except DecodeError:
            pass
        call = raw_call(farm.client.channel, method)
        error = refusal(lambda: call(body, metadata=farm.client.metadata, timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error.details())
        assert method.input_type.full_name in bad_request_fields(error)["request"]
        refused.append(method.name)
    assert {"GetRender", "WatchRender", "SubmitRender", "FetchArtifact"} <= set(refused)


def test_each_corrupt_body_is_refused_naming_the_request(farm):
    get = raw_call(farm.client.channel, SERVICE.methods_by_name["GetRender"])
    watch = raw_call(farm.client.channel, SERVICE.methods_by_name["WatchRender"])
    for body in CORRUPT_BODIES.values():
        for call, name in ((get, "farm.v1.GetRenderRequest"), (watch, "farm.v1.WatchRenderRequest")):
            error = refusal(lambda: call(body, metadata=farm.client.metadata, timeout=30))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert name in bad_request_fields(error)["request"]
    # A valid request cut short is refused the same way.
    whole = pb.SubmitRenderRequest(spec=spec()).SerializeToString()
    submit = raw_call(farm.client.channel, SERVICE.methods_by_name["SubmitRender"])
    error = refusal(lambda: submit(whole[:len(whole) // 2], metadata=farm.client.metadata, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "farm.v1.SubmitRenderRequest" in bad_request_fields(error)["request"]
    # The health service is decoded the same way (load balancers send it bodies too).
    check = farm.client.channel.unary_unary("/grpc.health.v1.Health/Check")
    error = refusal(lambda: check(CORRUPT_BODIES["truncated"], timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# Values out of range ---------------------------------------------------------------------


@pytest.mark.parametrize("field,seconds,nanos", [
    ("since", -10**12, 0), ("until", 10**12, 0), ("since", 0, -5), ("until", 253402300800, 0)])
def test_usage_times_outside_what_a_timestamp_holds_are_invalid_argument(farm, field, seconds, nanos):
    times = {"since": Timestamp(seconds=0), "until": Timestamp(seconds=86400)}
    times[field] = Timestamp(seconds=seconds, nanos=nanos)
    error = refusal(lambda: farm.client.stub.GetUsage(pb.GetUsageRequest(**times), metadata=farm.client.metadata,
                                                       timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "9999-12-31" in bad_request_fields(error)[field]


def test_usage_over_every_time_a_timestamp_holds_is_answered(farm):
    request = pb.GetUsageRequest(since=Timestamp(seconds=-62135596800), until=Timestamp(seconds=253402300799))
    assert farm.client.stub.GetUsage(request, metadata=farm.client.metadata, timeout=30).total_nanodollars == 0


@pytest.mark.parametrize("after_sequence", [2**63, 2**64 - 1])
def test_an_after_sequence_past_the_store_integer_is_invalid_argument(farm, after_sequence):
    render = farm.client.submit(spec())
    error = refusal(lambda: list(farm.client.watch(render.id, after_sequence=after_sequence, timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(2**63 - 1) in bad_request_fields(error)["after_sequence"]


# Deadlines -------------------------------------------------------------------------------


class Aborted(Exception):
    """What grpc.aio's context.abort() raises (its AbortError)."""


class DeadlineContext:
    """The parts of grpc.aio's ServicerContext that the gateway uses, with a deadline
    `seconds` away; it records the status the call is aborted with."""

    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds
        self.status: tuple | None = None

    def time_remaining(self) -> float:
        return max(self.deadline - time.time(), 0.0)

    def code(self):
        return self.status[0] if self.status else None

    async def abort(self, code, details="", trailing_metadata=()):
        self.status = (code, details, trailing_metadata)
        raise Aborted(details)


def test_a_deadline_passing_while_the_store_answers_is_deadline_exceeded(tmp_path, monkeypatch):
    """The store answers after the client's deadline: the answer is DEADLINE_EXCEEDED
    (it was UNKNOWN "TimeoutError" whenever it reached the client first)."""
    config = farm_config(tmp_path)
    store = JobStore(config.store_url)
    tenant, _ = store.create_tenant("studio")
    answered = threading.Event()
    slow_get = store.get

    def get_after_the_deadline(*args):
        answered.wait(30)
        return slow_get(*args)

    monkeypatch.setattr(store, "get", get_after_the_deadline)
    context = DeadlineContext(0.05)
    metrics = GatewayMetrics()

    async def call():
        servicer = RenderServicer(config, store, EventHub(store, 0.04), GatewayMetrics())
        CURRENT_TENANT.set(tenant)

        async def continuation(_):
            return grpc.unary_unary_rpc_method_handler(servicer.GetRender, pb.GetRenderRequest.FromString,
                                                       pb.Render.SerializeToString)

        details = SimpleNamespace(method=f"/{SERVICE.full_name}/GetRender", invocation_metadata=())
        wrapped = await ErrorInterceptor(metrics).intercept_service(continuation, details)
        raw = pb.GetRenderRequest(render_id="r00000000000deadbeef").SerializeToString()
        # As gRPC does: the handler's deserializer (if any) decodes the body first.
        request = wrapped.request_deserializer(raw) if wrapped.request_deserializer else raw
        try:
            with pytest.raises(Aborted):
                await wrapped.unary_unary(request, context)
        finally:
            answered.set()

    asyncio.run(call())
    code, message, _ = context.status
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in message
    assert not LEAKS.search(message)
    counted = {s.labels["code"] for m in metrics.registry.collect() for s in m.samples
               if s.name == "farm_gateway_requests_total" and s.value}
    assert counted == {"DEADLINE_EXCEEDED"}
    store.close()


def served_codes(gateway: Gateway, method: str) -> collections.Counter:
    """How many calls of `method` the gateway answered with each code."""
    return collections.Counter({s.labels["code"]: s.value for m in gateway.metrics.registry.collect()
                                for s in m.samples
                                if s.name == "farm_gateway_requests_total" and s.labels["method"] == method})


def test_calls_with_deadlines_of_a_few_milliseconds_never_get_unknown(farm):
    render = farm.client.submit(spec())
    before = served_codes(farm.gateway, "GetRender")
    seen = collections.Counter()
    for attempt in range(150):
        try:
            farm.client.stub.GetRender(pb.GetRenderRequest(render_id=render.id), metadata=farm.client.metadata,
                                       timeout=(attempt % 3 + 1) / 1000)
            seen["OK"] += 1
        except grpc.RpcError as error:
            assert_clean(error)
            seen[error.code().name] += 1
    assert set(seen) <= {"OK", "DEADLINE_EXCEEDED"}, seen
    # What the gateway answered, also where the client had stopped listening.
    answered = served_codes(farm.gateway, "GetRender") - before
    assert set(answered) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, answered


def test_an_unexpected_error_is_internal_with_a_reference_that_the_log_has(farm, monkeypatch, caplog):
    def broken():
        raise ZeroDivisionError("SELECT secret FROM pools")

    monkeypatch.setattr(farm.gateway.store, "pools", broken)
    with caplog.at_level(logging.ERROR, logger="farm.api.interceptors"):
        error = refusal(lambda: farm.client.models())
    assert error.code() == grpc.StatusCode.INTERNAL
    reference = re.search(r"reference ([0-9a-f]{8})", error.details()).group(1)
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and logged[0].exc_info[0] is ZeroDivisionError


# Re-watching -----------------------------------------------------------------------------


def test_rewatching_a_finished_render_from_its_last_event_or_past_it_ends_at_once(farm):
    render = farm.client.submit(spec())
    finish(farm, render.id)
    events = list(farm.client.watch(render.id, timeout=30))
    assert events[-1].state == pb.RENDER_STATE_SUCCEEDED
    last = events[-1].sequence
    for after in (last, last + 1, last + 1000, 2**63 - 1):
        assert list(farm.client.watch(render.id, after_sequence=after, timeout=30)) == []
    # Resuming before the end still streams the rest.
    assert [e.sequence for e in farm.client.watch(render.id, after_sequence=last - 1, timeout=30)] == [last]


def test_a_watch_resumed_past_the_newest_event_ends_when_the_render_does(farm):
    render = farm.client.submit(spec())
    newest = farm.store.get(None, render.id).event_seq
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        watching = pool.submit(lambda: list(farm.client.watch(render.id, after_sequence=newest + 100, timeout=30)))
        deadline = time.monotonic() + 30
        while render.id not in farm.gateway.hub._waiters:  # the watch waits for the render's next event
            assert time.monotonic() < deadline and not watching.done(), "the watch never waited"
        finish(farm, render.id)
        assert watching.result(60) == []


def test_a_watch_ends_unauthenticated_soon_after_its_key_is_revoked(farm):
    from farm.jobs.store.tenants import parse_api_key

    tenant, key = farm.store.create_tenant(f"revoked-{secrets.token_hex(3)}")
    with FarmClient(farm.target, key, retries=False) as client:
        render = client.submit(spec())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            watching = pool.submit(lambda: list(client.watch(render.id, timeout=60)))
            deadline = time.monotonic() + 30
            while render.id not in farm.gateway.hub._waiters:  # streaming, and waiting for the next event
                assert time.monotonic() < deadline and not watching.done(), "the watch never waited"
            farm.store.revoke_key(parse_api_key(key)[0])
            # Within the gateway's stream_reauth_interval_s (2 s), not at the render's end (never, here).
            with pytest.raises(grpc.RpcError) as ended:
                watching.result(30)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in ended.value.details()


# Long values -----------------------------------------------------------------------------

LONG_VALUES = {
    "model": (lambda value: spec(model=value), "spec.model"),
    "label key": (lambda value: spec(labels={value: "x"}), "spec.labels["),
    "codec": (lambda value: spec(postprocess=pb.PostprocessSpec(encoder=pb.EncoderSettings(codec=value))),
              "spec.postprocess.encoder.codec"),
    "preset": (lambda value: spec(postprocess=pb.PostprocessSpec(encoder=pb.EncoderSettings(preset=value))),
               "spec.postprocess.encoder.preset"),
    "device kind": (lambda value: spec(placement=pb.Placement(require_device_kind=value)),
                    "spec.placement.require_device_kind"),
}


@pytest.mark.parametrize("case", sorted(LONG_VALUES))
@pytest.mark.parametrize("letter", ["k", "é"])
def test_a_long_bad_value_is_quoted_short_in_an_invalid_argument(farm, case, letter):
    make, field = LONG_VALUES[case]
    for call in (farm.client.submit, farm.client.estimate):
        error = refusal(lambda: call(make(letter * LONG)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        [(name, description)] = [(n, d) for n, d in bad_request_fields(error).items() if n.startswith(field)]
        assert len(name) + len(description) < 400 and f"{LONG} characters" in name + description
        assert letter * 65 not in name + description


def test_many_long_bad_labels_still_get_invalid_argument_with_details(farm):
    labels = {f"{i:02d}" + "K" * LONG: "v" * LONG for i in range(32)}
    error = refusal(lambda: farm.client.submit(spec(labels=labels)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(error)
    assert len(fields) >= 4 and all(name.startswith("spec.labels[") for name in fields if name)
    assert "more problems are not listed" in fields.get("", "")


# Unknown values --------------------------------------------------------------------------


def image(format_: str) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), secrets.token_bytes(64 * 64 * 3)).save(buffer, format=format_)
    return buffer.getvalue()


@pytest.mark.parametrize("format_", ["GIF", "BMP", "TIFF"])
def test_an_image_that_is_not_png_or_jpeg_is_invalid_argument(farm, format_):
    for call in (farm.client.submit, farm.client.estimate):
        error = refusal(lambda: call(spec(task=pb.TASK_IMAGE_TO_VIDEO, image=image(format_))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"is a {format_} image" in bad_request_fields(error)["spec.image"]


def test_png_and_jpeg_images_are_accepted_and_a_broken_one_is_refused_plainly(farm):
    for format_ in ("PNG", "JPEG"):
        assert farm.client.estimate(spec(task=pb.TASK_IMAGE_TO_VIDEO, image=image(format_))).dollars > 0
    png = image("PNG")
    error = refusal(lambda: farm.client.submit(spec(task=pb.TASK_IMAGE_TO_VIDEO, image=png[:len(png) // 2])))
    assert "cannot be decoded as a PNG or JPEG image" in bad_request_fields(error)["spec.image"]


def test_fetching_an_unknown_artifact_kind_is_invalid_argument(farm, tmp_path):
    render = farm.client.submit(spec())
    artifacts = ArtifactStore(farm.gateway.config.artifacts_url)
    finish(farm, render.id, artifacts.write(render.id, 1, b"\x00\x00\x00\x18ftypmp42 video", {"seed": 1}))
    assert farm.client.fetch(render.id) == b"\x00\x00\x00\x18ftypmp42 video"
    for kind in (2, 7, 2**31 - 1):
        error = refusal(lambda: farm.client.fetch(render.id, kind=kind))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ARTIFACT_KIND_MANIFEST" in bad_request_fields(error)["kind"]


# Budgets ---------------------------------------------------------------------------------


def next_period(period: str, now: dt.datetime) -> dt.datetime:
    if period == "day":
        return dt.datetime(now.year, now.month, now.day, tzinfo=dt.timezone.utc) + dt.timedelta(days=1)
    return dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("period,adjective", [("day", "daily"), ("month", "monthly")])
def test_a_budget_refusal_says_when_the_period_resets(farm, period, adjective):
    name = f"budget-{period}-{secrets.token_hex(3)}"
    _, key = farm.store.create_tenant(name)
    farm.store.set_budget(name, 0.0, period)
    with FarmClient(farm.target, key) as tenant:
        before = dt.datetime.now(dt.timezone.utc)
        error = refusal(lambda: tenant.submit(spec()))
        after = dt.datetime.now(dt.timezone.utc)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{adjective} budget" in error.details() and "dayly" not in error.details()
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == f"tenant:{name}/budget:{period}"
    delay = detail(error, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds()
    assert (next_period(period, after) - after).total_seconds() - 1 <= delay
    assert delay <= (next_period(period, before) - before).total_seconds() + 1


# The database cut off --------------------------------------------------------------------


@pytest.fixture
def postgres_farm(tmp_path):
    """A gateway whose store is PostgreSQL as a role of its own (its connections tagged
    with the role's name), so that a test can cut it and keep it out."""
    import sqlalchemy

    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with postgres_role() as (url, role), serving(farm_config(tmp_path, url)) as local:
            yield local, role, admin
    finally:
        admin.dispose()


def assert_unavailable(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    retry = detail(error, error_details_pb2.RetryInfo)
    assert retry is not None and retry.retry_delay.ToTimedelta().total_seconds() > 0


def outcome(call):
    try:
        return call()
    except grpc.RpcError as error:
        return error


@pytest.mark.postgres
def test_calls_cut_off_from_postgresql_mid_query_are_unavailable_with_retry_info(postgres_farm):
    farm, role, admin = postgres_farm
    render = farm.client.submit(spec())
    calls = {
        "ListRenders": lambda: farm.client.list(page_size=10),
        "WatchRender": lambda: list(farm.client.watch(render.id, timeout=60)),
        "SubmitRender": lambda: farm.client.submit(spec()),
    }
    import sqlalchemy

    locking = sqlalchemy.create_engine(POSTGRES_URL)
    with locking.connect() as locker, concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        # Every query on renders waits behind this lock until the connections are cut.
        transaction = locker.begin()
        locker.exec_driver_sql(f"LOCK TABLE {role}.renders IN ACCESS EXCLUSIVE MODE")
        answers = {name: pool.submit(outcome, call) for name, call in calls.items()}
        deadline = time.monotonic() + 60
        waiting = 0
        while waiting < len(calls) and time.monotonic() < deadline:
            with admin.connect() as probe:
                waiting = probe.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %(role)s "
                    "AND wait_event_type = 'Lock'", {"role": role}).scalar()
        assert waiting == len(calls), "the calls never reached the locked table"
        assert terminate_connections(role) >= len(calls)
        transaction.rollback()
        results = {name: answer.result(60) for name, answer in answers.items()}
    locking.dispose()
    for name, error in results.items():
        assert isinstance(error, grpc.RpcError), f"{name} answered {error}"
        assert_clean(error)
        assert_unavailable(error)
    # Each was a store error to the operator's metrics.
    assert farm.gateway.metrics.registry.get_sample_value("farm_gateway_store_errors_total") >= len(calls)
    # The next calls reconnect.
    assert render.id in {r.id for r in farm.client.list(page_size=10).renders}


@pytest.mark.postgres
def test_calls_while_postgresql_refuses_the_gateway_are_unavailable_with_retry_info(postgres_farm):
    farm, role, admin = postgres_farm
    render = farm.client.submit(spec())
    with admin.connect() as connection:
        connection.exec_driver_sql(f"ALTER ROLE {role} NOLOGIN")
    terminate_connections(role)
    for call in (lambda: farm.client.list(page_size=10), lambda: list(farm.client.watch(render.id, timeout=30)),
                 lambda: farm.client.submit(spec()), lambda: farm.client.get(render.id), farm.client.models):
        error = refusal(call)
        assert_unavailable(error)
    with admin.connect() as connection:
        connection.exec_driver_sql(f"ALTER ROLE {role} LOGIN")
    deadline = time.monotonic() + 30
    while not isinstance(outcome(lambda: farm.client.list(page_size=10)), pb.ListRendersResponse):
        assert time.monotonic() < deadline, "the gateway did not come back with the database"
    assert farm.client.get(render.id).id == render.id
