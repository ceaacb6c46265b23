"""The client SDK (farm/client) against a real gateway on loopback (tests/gateway.py: in
this process, on SQLite, no Ray): typed errors carrying the answers' google.rpc details,
the asyncio client, downloads that stream to disk and resume, gRPC's retries where a call
is idempotent and only there, the trace context a submit carries, and what the CLI prints.

Where a test needs the network to misbehave, a real gRPC server stands between the client
and the gateway (`Relay`): it forwards every call as bytes, counts and records it, and
answers UNAVAILABLE, loses an answer or breaks a stream when a test tells it to, the n-th
call and no other, so that nothing depends on timing."""

from __future__ import annotations

import ast
import asyncio
import collections
import concurrent.futures
import datetime as dt
import io
import pickle
import secrets
import subprocess
import sys
import threading

import grpc
import pytest
from google.rpc import code_pb2
from grpc_status import rpc_status

from farm.cli.commands import main
from farm.client import AsyncFarmClient, FarmClient, errors, find_api_key
from farm.client.channel import RETRY_ATTEMPTS
from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.states import AttemptOutcome
from farm.families import Family
from farm.storage.artifacts import ArtifactStore
from farm.v1 import render_pb2 as pb
from tests.gateway import LocalGateway, bad_request_fields, serving

OWNER = "client-test-scheduler"
SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]
CHUNK_BYTES = 4096  # the gateway's FetchArtifact chunks here, so that a small artifact has many
MISSING = "r00000000000deadbeef"
WRONG_KEY = "farm_000000000000_" + "x" * 43
FORWARDED = ("authorization", "traceparent", "tracestate")


def spec(**changes) -> pb.RenderSpec:
    values = dict(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite over the dunes", width=256, height=256,
                  num_frames=17, num_inference_steps=4)
    values.update(changes)
    return pb.RenderSpec(**values)


def farm_config(home) -> FarmConfig:
    """One LTX-Video model (its weights need not be readable here)."""
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO,
                        sources={Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"})
    config = FarmConfig(home=home, models=[model])
    config.gateway.port = config.gateway.metrics_port = 0
    config.gateway.fetch_chunk_bytes = CHUNK_BYTES
    return config


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with serving(farm_config(tmp_path_factory.mktemp("farm"))) as local:
        yield local


@pytest.fixture
def tenant(farm) -> tuple[str, str]:
    """A tenant of its own for a test that counts its renders: (name, key)."""
    name = f"client-{secrets.token_hex(4)}"
    _, key = farm.store.create_tenant(name)
    return name, key


def renders_of(farm: LocalGateway, name: str) -> list[str]:
    return [r.id for r in farm.store.list(farm.store.tenant_by_name(name).id, page_size=1000)[0]]


def succeeded(farm: LocalGateway, client: FarmClient, data: bytes) -> str:
    """A render of `client`'s tenant, SUCCEEDED with `data` as its video, as the scheduler
    would leave it."""
    render = client.submit(spec())
    uris = ArtifactStore(farm.gateway.config.artifacts_url).write(render.id, 1, data, {"seed": 1})
    claimed = {c.id: c for c in farm.store.claim({"ltx": 1000}, OWNER, 30)}
    farm.store.finish(OWNER, render.id, claimed[render.id].attempt, AttemptOutcome.SUCCEEDED,
                      artifact_uri=uris[0], manifest_uri=uris[1])
    return render.id


class Relay(grpc.GenericRpcHandler):
    """A gRPC server that forwards every RenderService call to the gateway as bytes, with
    the caller's key and trace context. It counts the calls of each method, keeps their
    requests and metadata, and, where a test asked, answers the next calls of a method
    with a code of its own instead of forwarding them (`refuse`), forwards a call and then
    answers UNAVAILABLE as if the connection had broken on the way back (`lose`), or
    breaks the next stream of a method after so many messages (`break_after`)."""

    def __init__(self, upstream: str):
        self.upstream = grpc.insecure_channel(upstream)
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(8), handlers=[self])
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.requests: dict[str, list] = collections.defaultdict(list)
        self.metadata: dict[str, list[dict]] = collections.defaultdict(list)
        self.refuse: dict[str, list[grpc.StatusCode]] = collections.defaultdict(list)
        self.lose: collections.Counter[str] = collections.Counter()
        self.break_after: dict[str, int] = {}

    def service(self, details):
        prefix, _, name = details.method.rpartition("/")
        method = SERVICE.methods_by_name.get(name) if prefix == f"/{SERVICE.full_name}" else None
        if method is None:
            return None
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(
                lambda raw, context: self._stream(method, details.method, raw, context))
        return grpc.unary_unary_rpc_method_handler(
            lambda raw, context: self._unary(method, details.method, raw, context))

    def _arrived(self, method, raw: bytes, context) -> list[tuple[str, str]]:
        """Records the call; aborts it where the test asked for a refusal. Returns the metadata to forward."""
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.calls[method.name] += 1
            self.requests[method.name].append(getattr(pb, method.input_type.name).FromString(raw))
            self.metadata[method.name].append(metadata)
            refusal = self.refuse[method.name].pop(0) if self.refuse[method.name] else None
        if refusal is not None:
            context.abort(refusal, f"the relay answers {refusal.name}")
        return [(key, value) for key, value in metadata.items() if key in FORWARDED]

    @staticmethod
    def _pass_on(error: grpc.RpcError, context) -> None:
        context.set_trailing_metadata(error.trailing_metadata() or ())
        context.abort(error.code(), error.details())

    def _unary(self, method, path: str, raw: bytes, context) -> bytes:
        metadata = self._arrived(method, raw, context)
        try:
            answer = self.upstream.unary_unary(path)(raw, metadata=metadata, timeout=context.time_remaining())
        except grpc.RpcError as error:
            self._pass_on(error, context)
        with self.lock:
            lost = self.lose[method.name] > 0
            self.lose[method.name] -= lost
        if lost:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the relay lost the answer")
        return answer

    def _stream(self, method, path: str, raw: bytes, context):
        metadata = self._arrived(method, raw, context)
        with self.lock:
            limit = self.break_after.pop(method.name, None)
        call = self.upstream.unary_stream(path)(raw, metadata=metadata, timeout=context.time_remaining())
        sent = 0
        try:
            for message in call:
                if sent == limit:
                    call.cancel()
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the relay broke the stream")
                yield message
                sent += 1
        except grpc.RpcError as error:
            self._pass_on(error, context)

    def offsets(self) -> list[int]:
        return [request.offset for request in self.requests["FetchArtifact"]]


@pytest.fixture
def relay(farm):
    relay = Relay(farm.target)
    relay.server.start()
    yield relay
    relay.server.stop(0)
    relay.upstream.close()


def test_the_sdk_needs_nothing_of_farm_but_the_generated_code():
    """Another service imports farm.client without the job plane, torch or Ray; the
    OpenTelemetry API only when a submit looks for the current span."""
    probe = ("import sys, farm.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('farm', 'torch', 'ray', 'sqlalchemy', 'pydantic', 'opentelemetry')))")
    loaded = ast.literal_eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                             check=True).stdout)
    assert [m for m in loaded if m != "farm" and not m.startswith(("farm.client", "farm.v1"))] == []


# Typed errors ------------------------------------------------------------------------------


def test_an_invalid_spec_is_invalid_argument_naming_the_field_and_its_limit(farm):
    with pytest.raises(errors.InvalidArgument) as caught:
        farm.client.submit(spec(width=250))
    error = caught.value
    assert error.field_violations["spec.width"] == "250 is not a multiple of 32, which ltx needs"
    assert error.explain() == ["INVALID_ARGUMENT: spec.width: 250 is not a multiple of 32, which ltx needs"]
    # Still the grpc.RpcError that code written against plain gRPC expects.
    assert isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.width" in error.details()
    assert rpc_status.from_call(error).code == code_pb2.INVALID_ARGUMENT
    assert bad_request_fields(error) == error.field_violations
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is errors.InvalidArgument and copy.field_violations == error.field_violations

    with pytest.raises(errors.InvalidArgument) as caught:
        farm.client.estimate(spec(width=250, height=250, num_frames=18))
    assert {"spec.width", "spec.height", "spec.num_frames"} <= set(caught.value.field_violations)
    lines = caught.value.explain()
    assert lines[0] == "INVALID_ARGUMENT: the request has 3 bad fields:"
    assert lines[1:] == [f"  {field}: {description}" for field, description in caught.value.field_violations.items()]


def test_an_unknown_render_is_not_found_on_every_call(farm, tmp_path):
    for call in (farm.client.get, farm.client.cancel, lambda rid: list(farm.client.watch(rid, timeout=30)),
                 farm.client.fetch, lambda rid: farm.client.download(rid, tmp_path / "clip.mp4"), farm.client.wait):
        with pytest.raises(errors.NotFound) as caught:
            call(MISSING)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and MISSING in caught.value.details()
    assert not (tmp_path / "clip.mp4").exists()


def test_a_wrong_or_missing_key_is_unauthenticated(farm):
    for key in (WRONG_KEY, None):
        with FarmClient(farm.target, key) as client:
            with pytest.raises(errors.Unauthenticated) as caught:
                client.models()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_spent_budget_is_resource_exhausted_with_the_quota_and_when_to_retry(farm, tenant):
    name, key = tenant
    farm.store.set_budget(name, 0.0, "day")
    with FarmClient(farm.target, key) as client:
        with pytest.raises(errors.ResourceExhausted) as caught:
            client.submit(spec())
    error = caught.value
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    assert error.retry_after_s == pytest.approx((midnight - now).total_seconds(), abs=5)
    assert list(error.quota_violations) == [f"tenant:{name}/budget:day"]
    lines = error.explain()
    assert lines[0].startswith("RESOURCE_EXHAUSTED: ") and "daily budget" in lines[0]
    assert lines[1].startswith(f"  tenant:{name}/budget:day: ")
    assert lines[2].startswith("  retry in ")


def test_the_other_refusals_have_classes_of_their_own(farm):
    queued = farm.client.submit(spec())
    with pytest.raises(errors.FailedPrecondition):
        farm.client.fetch(queued.id)
    key = f"key-{secrets.token_hex(4)}"
    farm.client.submit(spec(idempotency_key=key))
    with pytest.raises(errors.AlreadyExists) as caught:
        farm.client.submit(spec(idempotency_key=key, prompt="another prompt"))
    assert key in caught.value.details()
    with pytest.raises(errors.DeadlineExceeded):
        list(farm.client.watch(queued.id, timeout=0.2))
    assert isinstance(errors.FarmError.from_call(grpc.RpcError()), errors.Unknown)


def test_find_api_key_raises_no_api_key_instead_of_exiting(tmp_path, monkeypatch):
    monkeypatch.delenv("FARM_API_KEY", raising=False)
    with pytest.raises(errors.NoApiKey, match=str(tmp_path / "keys" / "default.key")):
        find_api_key(tmp_path)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "default.key").write_text("farm_key_from_file\n")
    assert find_api_key(tmp_path) == "farm_key_from_file"
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    assert find_api_key() == "farm_key_from_file"
    monkeypatch.setenv("FARM_API_KEY", "farm_key_from_env")
    assert find_api_key(tmp_path) == "farm_key_from_env"


# The CLI -----------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["farm", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_the_cli_prints_each_bad_field_and_how_long_to_wait(farm, tenant, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    code, out = run_cli(monkeypatch, capsys, "submit", "a kite", "--model", "ltx", "--width", "250", "--height",
                        "250", "--no-wait", "--target", farm.target, "--api-key", key)
    assert code == 2
    assert out.splitlines() == [
        "error: INVALID_ARGUMENT: the request has 2 bad fields:",
        "  spec.width: 250 is not a multiple of 32, which ltx needs",
        "  spec.height: 250 is not a multiple of 32, which ltx needs",
    ]
    name, other_key = tenant
    farm.store.set_budget(name, 0.0, "month")
    code, out = run_cli(monkeypatch, capsys, "submit", "a kite", "--model", "ltx", "--no-wait", "--target",
                        farm.target, "--api-key", other_key)
    lines = out.splitlines()
    assert code == 2 and lines[0].startswith("error: RESOURCE_EXHAUSTED: ") and "monthly budget" in lines[0]
    assert lines[1].startswith(f"  tenant:{name}/budget:month: ") and lines[2].startswith("  retry in ")
    # No key anywhere: the message says where it was looked for, and no traceback.
    monkeypatch.delenv("FARM_API_KEY", raising=False)
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    code, out = run_cli(monkeypatch, capsys, "list", "--target", farm.target)
    assert code == 2 and out.startswith("error: no API key: set FARM_API_KEY") and "Traceback" not in out


# The asyncio client --------------------------------------------------------------------------


def test_the_async_client_submits_gets_lists_watches_and_cancels(farm, tenant):
    name, key = tenant

    async def scenario():
        async with AsyncFarmClient(farm.target, key) as client:
            render = await client.submit(spec(idempotency_key="async-1"))
            assert (await client.submit(spec(idempotency_key="async-1"))).id == render.id
            assert (await client.get(render.id)).state == pb.RENDER_STATE_QUEUED
            assert [r.id for r in (await client.list(page_size=10)).renders] == [render.id]
            assert [m.name for m in (await client.models()).models] == ["ltx"]
            assert (await client.estimate(spec())).dollars > 0
            stream = client.watch(render.id, timeout=30)
            assert (await stream.__anext__()).state == pb.RENDER_STATE_QUEUED
            assert (await client.cancel(render.id)).state == pb.RENDER_STATE_CANCELLED
            assert [event.state async for event in stream][-1] == pb.RENDER_STATE_CANCELLED
            assert (await client.wait(render.id, timeout=30)).state == pb.RENDER_STATE_CANCELLED
            usage = await client.usage(dt.datetime(2000, 1, 1), dt.datetime.now(dt.UTC), "day")
            assert usage.total_nanodollars == 0
            with pytest.raises(errors.NotFound):
                await client.get(MISSING)
            with pytest.raises(errors.InvalidArgument) as caught:
                await client.submit(spec(width=250))
            assert "spec.width" in caught.value.field_violations
            with pytest.raises(errors.NotFound):
                [event async for event in client.watch(MISSING, timeout=30)]

    asyncio.run(scenario())
    assert len(renders_of(farm, name)) == 1


def test_the_async_client_speaks_mutual_tls(tmp_path):
    from tests.unit.test_tls import Authority

    ca = Authority.create("client-test-ca")
    files = {}
    for name, server in (("gateway", True), ("me", False)):
        cert, key, _ = ca.issue(name, server=server)
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        files[name][0].write_bytes(cert)
        files[name][1].write_bytes(key)
    ca_file = ca.write(tmp_path)
    config = FarmConfig(home=tmp_path / "farm", models=farm_config(tmp_path).models, gateway={
        "port": 0, "metrics_port": 0, "tls_cert_file": files["gateway"][0], "tls_key_file": files["gateway"][1],
        "tls_client_ca_file": ca_file})
    with serving(config) as local:
        key = (config.keys_dir / "default.key").read_text().strip()

        async def scenario():
            async with AsyncFarmClient(local.target, key, tls_ca_file=ca_file, tls_cert_file=files["me"][0],
                                       tls_key_file=files["me"][1]) as client:
                assert [m.name for m in (await client.models()).models] == ["ltx"]
            # Without a client certificate the handshake fails (sent once: retries would only repeat it).
            async with AsyncFarmClient(local.target, key, tls_ca_file=ca_file, retries=False) as client:
                with pytest.raises(errors.Unavailable):
                    await client.models()

        asyncio.run(scenario())


# Downloads ---------------------------------------------------------------------------------


ARTIFACT = secrets.token_bytes(12 * CHUNK_BYTES + 123)


def test_a_download_streams_to_the_path_and_resumes_a_partial_file(farm, relay, tmp_path):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key) as client:
        render_id = succeeded(farm, client, ARTIFACT)
        path = tmp_path / "clips" / "clip.mp4"
        assert client.download(render_id, path) == len(ARTIFACT)
        assert path.read_bytes() == ARTIFACT and not path.with_name("clip.mp4.partial").exists()
        assert relay.offsets() == [0]
        # What a download that died left behind is resumed from its end, not fetched again.
        path.unlink()
        path.with_name("clip.mp4.partial").write_bytes(ARTIFACT[:10_000])
        assert client.download(render_id, path) == len(ARTIFACT)
        assert path.read_bytes() == ARTIFACT and relay.offsets() == [0, 10_000]
        # A .partial longer than the artifact is another's: the download starts again.
        path.with_name("clip.mp4.partial").write_bytes(ARTIFACT + b"more")
        client.download(render_id, path)
        assert path.read_bytes() == ARTIFACT and relay.offsets()[2:] == [len(ARTIFACT) + 4, 0]
        # The manifest, and a whole artifact in memory.
        assert client.fetch(render_id, kind=pb.ARTIFACT_KIND_MANIFEST) == b'{\n  "seed": 1\n}'
        assert client.fetch(render_id) == ARTIFACT
        assert client.fetch(render_id, offset=len(ARTIFACT) - 5) == ARTIFACT[-5:]


def test_a_broken_stream_is_resumed_from_the_bytes_already_written(farm, relay, tmp_path):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key) as client:
        render_id = succeeded(farm, client, ARTIFACT)
        relay.break_after["FetchArtifact"] = 3
        assert client.download(render_id, tmp_path / "clip.mp4") == len(ARTIFACT)
        assert (tmp_path / "clip.mp4").read_bytes() == ARTIFACT
        assert relay.offsets() == [0, 3 * CHUNK_BYTES]
        # Into a file object, from its position.
        relay.break_after["FetchArtifact"] = 2
        buffer = io.BytesIO()
        buffer.write(ARTIFACT[:100])
        assert client.download(render_id, buffer, offset=100) == len(ARTIFACT)
        assert buffer.getvalue() == ARTIFACT and relay.offsets()[2:] == [100, 100 + 2 * CHUNK_BYTES]

    async def scenario():
        async with AsyncFarmClient(relay.target, key) as client:
            relay.break_after["FetchArtifact"] = 5
            assert await client.download(render_id, tmp_path / "async.mp4") == len(ARTIFACT)
            assert await client.fetch(render_id) == ARTIFACT

    asyncio.run(scenario())
    assert (tmp_path / "async.mp4").read_bytes() == ARTIFACT
    assert relay.offsets()[4:] == [0, 5 * CHUNK_BYTES, 0]


def test_a_stream_that_keeps_breaking_without_progress_is_given_up(farm, relay, tmp_path):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key) as client:
        render_id = succeeded(farm, client, ARTIFACT)
        relay.refuse["FetchArtifact"] = [grpc.StatusCode.UNAVAILABLE] * 100
        with pytest.raises(errors.Unavailable):
            client.download(render_id, tmp_path / "clip.mp4")
    # RETRY_ATTEMPTS tries in all. gRPC retried the first's call RETRY_ATTEMPTS times, which
    # spent half the channel's retry tokens: from then on it throttles, and each resume is one call.
    assert relay.calls["FetchArtifact"] == RETRY_ATTEMPTS + (RETRY_ATTEMPTS - 1)
    assert (tmp_path / "clip.mp4.partial").read_bytes() == b""


# Retries -----------------------------------------------------------------------------------


def test_idempotent_calls_are_retried_on_unavailable(farm, relay):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key) as client:
        render = client.submit(spec())
        relay.refuse["GetRender"] = [grpc.StatusCode.UNAVAILABLE] * 2
        assert client.get(render.id).id == render.id
        assert relay.calls["GetRender"] == 3
        # A stream before its first message.
        relay.refuse["WatchRender"] = [grpc.StatusCode.UNAVAILABLE]
        assert next(client.watch(render.id, timeout=30)).state == pb.RENDER_STATE_QUEUED
        assert relay.calls["WatchRender"] == 2
        relay.refuse["CancelRender"] = [grpc.StatusCode.UNAVAILABLE]
        assert client.cancel(render.id).state == pb.RENDER_STATE_CANCELLED
        assert relay.calls["CancelRender"] == 2
        # A cancel whose answer was lost is asked again; that changes nothing, and says why.
        other = client.submit(spec())
        relay.lose["CancelRender"] = 1
        with pytest.raises(errors.FailedPrecondition, match="already CANCELLED"):
            client.cancel(other.id)
        assert relay.calls["CancelRender"] == 4 and client.get(other.id).state == pb.RENDER_STATE_CANCELLED
    # A fresh channel: the one above spent some of its retry tokens.
    with FarmClient(relay.target, key) as client:
        relay.refuse["ListModels"] = [grpc.StatusCode.UNAVAILABLE] * 10
        with pytest.raises(errors.Unavailable):
            client.models()
        assert relay.calls["ListModels"] == RETRY_ATTEMPTS


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.NOT_FOUND])
def test_other_codes_are_not_retried(farm, relay, code):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key) as client:
        relay.refuse["ListModels"] = [code]
        with pytest.raises(errors.error_class(code)):
            client.models()
        assert client.models().models and relay.calls["ListModels"] == 2


def test_a_client_without_retries_calls_once(farm, relay):
    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    with FarmClient(relay.target, key, retries=False) as client:
        relay.refuse["ListModels"] = [grpc.StatusCode.UNAVAILABLE]
        with pytest.raises(errors.Unavailable):
            client.models()
        relay.lose["SubmitRender"] = 1
        with pytest.raises(errors.Unavailable):
            client.submit(spec(idempotency_key=f"once-{secrets.token_hex(4)}"))
    assert relay.calls["ListModels"] == 1 and relay.calls["SubmitRender"] == 1


def submitted(farm: LocalGateway) -> float:
    """Renders the gateway created, by its own metric."""
    return sum(s.value for m in farm.gateway.metrics.registry.collect() for s in m.samples
               if s.name == "farm_renders_submitted_total")


def test_a_submit_whose_answer_was_lost_is_retried_only_with_an_idempotency_key(farm, relay, tenant):
    name, key = tenant
    before = submitted(farm)
    with FarmClient(relay.target, key) as client:
        # The gateway queued the render; the answer was lost on the way back. With a key,
        # the client asks again and gets that render back.
        relay.lose["SubmitRender"] = 1
        render = client.submit(spec(idempotency_key="lost-answer"))
        assert relay.calls["SubmitRender"] == 2
        assert renders_of(farm, name) == [render.id]
        # Without a key, asking again would queue a second render: the client does not.
        relay.lose["SubmitRender"] = 1
        with pytest.raises(errors.Unavailable):
            client.submit(spec(prompt="no key"))
        assert relay.calls["SubmitRender"] == 3
        assert len(renders_of(farm, name)) == 2
        # Refused before the gateway saw it: with a key, retried until it goes through.
        relay.refuse["SubmitRender"] = [grpc.StatusCode.UNAVAILABLE] * 2
        client.submit(spec(idempotency_key="refused-twice"))
        assert relay.calls["SubmitRender"] == 6
    assert len(renders_of(farm, name)) == 3
    assert submitted(farm) - before == 3


# Tracing -----------------------------------------------------------------------------------


def test_a_submit_carries_the_callers_trace_context(farm, relay):
    from opentelemetry import trace

    key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
    given = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    current = trace.SpanContext(trace_id=0x0123456789ABCDEF0123456789ABCDEF, span_id=0x0123456789ABCDEF,
                                is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    with FarmClient(relay.target, key) as client:
        client.submit(spec(), traceparent=given)
        with trace.use_span(trace.NonRecordingSpan(current)):
            client.submit(spec())  # inside the caller's span: its context
            client.submit(spec(), traceparent=given)  # given wins
        client.submit(spec())  # outside any span: none

    async def scenario():
        async with AsyncFarmClient(relay.target, key) as client:
            await client.submit(spec(), traceparent=given)
            with trace.use_span(trace.NonRecordingSpan(current)):
                await client.submit(spec())

    asyncio.run(scenario())
    sent = [metadata.get("traceparent") for metadata in relay.metadata["SubmitRender"]]
    in_span = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    assert sent == [given, in_span, given, None, given, in_span]
    assert all(m["authorization"] == f"Bearer {key}" for m in relay.metadata["SubmitRender"])
