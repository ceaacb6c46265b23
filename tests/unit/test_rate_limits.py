"""Rate limits of the gateway: token buckets per tenant and per client address, caps on
open WatchRender streams, and throttling of addresses that present refused keys. The
limiter's clock is a counter the tests advance, so nothing sleeps to refill a bucket.
The gRPC tests run the gateway in this process on loopback on SQLite; no Ray."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from farm.api import ratelimit
from farm.api.ratelimit import RateLimiter, method_class, peer_address
from farm.client import FarmClient
from farm.config import FarmConfig, ModelConfig, RateLimitsConfig, Task
from farm.domain.errors import ResourceExhausted, Unauthenticated
from farm.families import Family
from farm.v1 import render_pb2 as pb
from tests.gateway import serving

WRONG_KEY = "farm_000000000000_" + "x" * 43
OFF = {"rate": 0}


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(**changes) -> pb.RenderSpec:
    values = dict(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite over the dunes", width=256, height=256,
                  num_frames=17, num_inference_steps=4)
    values.update(changes)
    return pb.RenderSpec(**values)


def farm_config(home, host: str = "127.0.0.1", **limits) -> FarmConfig:
    """One LTX-Video model (its weights need not be readable here); the address limits off
    unless a test sets them, so that each test sees the limit it is about."""
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO,
                        sources={Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"})
    rate_limits = {"peer_submits": OFF, "peer_reads": OFF, "peer_watches": 0, **limits}
    return FarmConfig(home=home, models=[model],
                      gateway={"host": host, "port": 0, "metrics_port": 0, "rate_limits": rate_limits})


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def quota(error: grpc.RpcError) -> tuple[list[str], float | None]:
    """The QuotaFailure subjects and the RetryInfo delay (seconds) of a refusal."""
    subjects, delay = [], None
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return subjects, delay


def limited(error: grpc.RpcError) -> tuple[list[str], float | None]:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    return quota(error)


def refused_count(gateway, call_class: str, scope: str) -> float:
    return gateway.metrics.registry.get_sample_value(
        "farm_gateway_rate_limited_total", {"class": call_class, "scope": scope}) or 0.0


@pytest.fixture
def clock():
    return Clock()


# -- through the gateway -----------------------------------------------------------------

def test_a_tenant_over_its_submit_rate_is_refused_until_its_retry_delay_passes(tmp_path, clock):
    with serving(farm_config(tmp_path, submits={"rate": 1, "burst": 2})) as farm:
        farm.gateway.limiter.clock = clock
        first = farm.client.submit(spec())
        farm.client.submit(spec())
        error = refusal(lambda: farm.client.submit(spec()))
        subjects, delay = limited(error)
        assert subjects == ["tenant:default/submits"]
        assert delay == pytest.approx(1.0)
        assert "retry in 1 s" in error.details()
        # EstimateCost is in the same class; reads are not.
        assert limited(refusal(lambda: farm.client.estimate(spec())))[0] == ["tenant:default/submits"]
        assert farm.client.get(first.id).id == first.id
        # Another tenant has buckets of its own.
        _, other_key = farm.store.create_tenant("other")
        with FarmClient(farm.target, other_key) as other:
            other.submit(spec())
            other.estimate(spec())
        clock.advance(delay)
        farm.client.submit(spec())
        subjects, delay = limited(refusal(lambda: farm.client.submit(spec())))
        assert (subjects, delay) == (["tenant:default/submits"], pytest.approx(1.0))
        clock.advance(0.4)  # part of the way: refused, and told what is left
        assert limited(refusal(lambda: farm.client.submit(spec())))[1] == pytest.approx(0.6)
        assert refused_count(farm.gateway, "submits", "tenant") == 4
        assert refused_count(farm.gateway, "reads", "tenant") == 0
        assert len(farm.store.list(farm.store.tenant_by_name("default").id, page_size=100)[0]) == 3


def test_an_address_over_its_read_rate_is_refused_whatever_the_tenant_or_key(tmp_path, clock):
    once = {"max_failures": 1, "backoff_s": 5, "max_backoff_s": 5}
    with serving(farm_config(tmp_path, peer_reads={"rate": 2, "burst": 3}, failed_auth=once)) as farm:
        farm.gateway.limiter.clock = clock
        _, other_key = farm.store.create_tenant("other")
        with FarmClient(farm.target, other_key) as other, FarmClient(farm.target, WRONG_KEY) as wrong:
            farm.client.models()
            farm.client.list()
            other.models()
            for call in (other.models, farm.client.list, wrong.models):
                subjects, delay = limited(refusal(call))
                assert (subjects, delay) == (["peer:127.0.0.1/reads"], pytest.approx(0.5))
            farm.client.submit(spec())  # submits have a bucket of their own
            clock.advance(0.5)
            # The wrong key refused above was never checked, so it was no failed authentication
            # (one would have throttled the address); this one is.
            assert refusal(wrong.models).code() == grpc.StatusCode.UNAUTHENTICATED
            assert limited(refusal(farm.client.models))[0] == ["peer:127.0.0.1/failed-auth"]
        assert refused_count(farm.gateway, "reads", "peer") == 3


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6 loopback: the second client address is ::1")
def test_refused_keys_throttle_their_address_and_no_other(tmp_path, clock):
    # Bound to `localhost`, the gateway listens on 127.0.0.1 and ::1: two client addresses.
    failed_auth = {"max_failures": 3, "window_s": 60, "backoff_s": 10, "max_backoff_s": 25}
    with serving(farm_config(tmp_path, host="localhost", failed_auth=failed_auth)) as farm:
        farm.gateway.limiter.clock = clock
        port = farm.target.rpartition(":")[2]
        key = (farm.gateway.config.keys_dir / "default.key").read_text().strip()
        with FarmClient(farm.target, WRONG_KEY) as wrong, FarmClient(f"[::1]:{port}", key) as right6, \
                FarmClient(f"[::1]:{port}", WRONG_KEY) as wrong6:
            for _ in range(3):
                assert refusal(wrong.models).code() == grpc.StatusCode.UNAUTHENTICATED
            subjects, delay = limited(refusal(wrong.models))
            assert (subjects, delay) == (["peer:127.0.0.1/failed-auth"], pytest.approx(10))
            # The key is not looked at: a valid one from that address is refused too.
            assert limited(refusal(farm.client.models)) == (["peer:127.0.0.1/failed-auth"], pytest.approx(10))
            # Another address is not throttled, its refused keys are its own, and its
            # successes reset nothing of the first address.
            right6.models()
            assert refusal(wrong6.models).code() == grpc.StatusCode.UNAUTHENTICATED
            assert limited(refusal(farm.client.models))[0] == ["peer:127.0.0.1/failed-auth"]
            clock.advance(delay)
            farm.client.models()
            # Each further refusal lasts twice as long, up to max_backoff_s.
            for expected in (20, 25, 25):
                for _ in range(3):
                    assert refusal(wrong.models).code() == grpc.StatusCode.UNAUTHENTICATED
                assert limited(refusal(farm.client.models))[1] == pytest.approx(expected)
                clock.advance(expected)
                farm.client.models()
        assert refused_count(farm.gateway, "failed-auth", "peer") == 6


def test_open_watch_streams_are_capped_per_tenant(tmp_path, clock):
    with serving(farm_config(tmp_path, watches=2)) as farm:
        farm.gateway.limiter.clock = clock
        limiter = farm.gateway.limiter
        render = farm.client.submit(spec())  # stays QUEUED: no scheduler here
        streams = [farm.client.watch(render.id, timeout=60) for _ in range(2)]
        for stream in streams:
            assert next(stream).state == pb.RENDER_STATE_QUEUED  # admitted and following
        assert limiter.open_watches("tenant", "default") == 2
        subjects, delay = limited(refusal(lambda: next(farm.client.watch(render.id, timeout=60))))
        assert (subjects, delay) == (["tenant:default/watches"], pytest.approx(ratelimit.WATCH_RETRY_S))
        # Another tenant's streams are not counted with these (it may not see the render).
        _, other_key = farm.store.create_tenant("other")
        with FarmClient(farm.target, other_key) as other:
            assert refusal(lambda: next(other.watch(render.id, timeout=60))).code() == grpc.StatusCode.NOT_FOUND
        assert limiter.open_watches("tenant", "other") == 0
        # A stream the client cancels gives its slot back.
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while limiter.open_watches("tenant", "default") != 1:
            assert time.monotonic() < deadline, "the cancelled stream kept its slot"
            time.sleep(0.01)
        streams.append(farm.client.watch(render.id, timeout=60))
        assert next(streams[-1]).state == pb.RENDER_STATE_QUEUED
        # Streams that end (the render was cancelled) give theirs back before the client sees the end.
        farm.client.cancel(render.id)
        for stream in streams:
            assert [e.state for e in stream][-1] == pb.RENDER_STATE_CANCELLED
        assert limiter.open_watches("tenant", "default") == 0
        assert limiter.open_watches("peer", "127.0.0.1") == 0
        assert refused_count(farm.gateway, "watches", "tenant") == 1


def test_health_checks_and_reflection_are_never_limited(tmp_path, clock):
    tight = {"rate": 1, "burst": 1}
    config = farm_config(tmp_path, submits=tight, reads=tight, peer_submits=tight, peer_reads=tight, watches=1,
                         peer_watches=1, failed_auth={"max_failures": 1, "backoff_s": 60, "max_backoff_s": 60})
    with serving(config) as farm:
        farm.gateway.limiter.clock = clock
        with FarmClient(farm.target, WRONG_KEY) as wrong:
            assert refusal(wrong.models).code() == grpc.StatusCode.UNAUTHENTICATED
            assert limited(refusal(farm.client.models))[0] == ["peer:127.0.0.1/failed-auth"]
            for _ in range(50):
                farm.client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            stub = reflection_pb2_grpc.ServerReflectionStub(farm.client.channel)
            answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")] * 5),
                                                timeout=5)
            services = {s.name for r in answers for s in r.list_services_response.service}
            assert "farm.v1.RenderService" in services
            # The address was refused all along.
            assert limited(refusal(farm.client.models))[0] == ["peer:127.0.0.1/failed-auth"]
        assert farm.gateway.limiter.tracked() == 2  # the address's read bucket and its refused key


# -- the limiter itself --------------------------------------------------------------------

@pytest.mark.parametrize("peer, address", [
    ("ipv4:10.1.2.3:5123", "10.1.2.3"),
    ("ipv6:[2001:db8::1]:5123", "2001:db8::1"),
    ("ipv6:%5B2001:db8::1%5D:5123", "2001:db8::1"),
    ("ipv6:[::ffff:127.0.0.1]:40000", "127.0.0.1"),
    ("unix:/run/farm.sock", "unix"),
    ("", "unknown"),
])
def test_an_address_is_the_peer_without_its_port(peer, address):
    assert peer_address(peer) == address


def test_methods_fall_in_their_classes():
    service = "/farm.v1.RenderService/"
    assert {name: method_class(service + name) for name in pb.DESCRIPTOR.services_by_name["RenderService"]
            .methods_by_name} == {
        "SubmitRender": "submits", "EstimateCost": "submits", "WatchRender": "watches", "GetRender": "reads",
        "CancelRender": "reads", "ListRenders": "reads", "FetchArtifact": "reads", "ListModels": "reads",
        "GetUsage": "reads"}


def tenant(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


def admit(limiter: RateLimiter, method: str, who: str, peer: str = "ipv4:10.0.0.1:1000"):
    with limiter.call(f"/farm.v1.RenderService/{method}", peer) as limited_call:
        limited_call.admit(tenant(who))


def test_the_defaults_let_a_tenant_submit_a_burst_of_500_and_then_100_a_second(clock):
    limiter = RateLimiter(FarmConfig().gateway.rate_limits, clock=clock)
    for _ in range(500):
        admit(limiter, "SubmitRender", "batch")
    with pytest.raises(ResourceExhausted) as error:
        admit(limiter, "SubmitRender", "batch")
    assert error.value.retry_after_s == pytest.approx(0.01)
    clock.advance(1)
    for _ in range(100):
        admit(limiter, "SubmitRender", "batch")
    with pytest.raises(ResourceExhausted):
        admit(limiter, "SubmitRender", "batch")
    for _ in range(1000):
        admit(limiter, "GetRender", "batch")
    with pytest.raises(ResourceExhausted):
        admit(limiter, "GetRender", "batch")


async def test_the_defaults_allow_a_few_refused_keys_a_minute_from_one_address(clock):
    """tests/integration/test_gateway.py presents 8 refused keys from 127.0.0.1 to one gateway;
    the default throttles an address at its 10th in a minute."""
    limiter = RateLimiter(FarmConfig().gateway.rate_limits, clock=clock)

    async def refuse(key):
        raise Unauthenticated("unknown API key")

    for _ in range(10):
        with pytest.raises(Unauthenticated), limiter.call("/farm.v1.RenderService/GetRender", "ipv4:10.0.0.1:1") as a:
            await a.authenticate(refuse, WRONG_KEY)
    with pytest.raises(ResourceExhausted) as error:
        limiter.call("/farm.v1.RenderService/GetRender", "ipv4:10.0.0.1:2")
    assert error.value.retry_after_s == 30
    assert error.value.violations[0].subject == "peer:10.0.0.1/failed-auth"


async def test_refused_keys_age_out_of_the_window_and_the_backoff_is_forgotten_after_a_quiet_spell(clock):
    config = RateLimitsConfig(failed_auth={"max_failures": 3, "window_s": 60, "backoff_s": 10, "max_backoff_s": 100})
    limiter = RateLimiter(config, clock=clock)

    async def check(key):
        if key != "right":
            raise Unauthenticated("unknown API key")
        return tenant("a")

    async def present(key, peer="ipv4:10.0.0.1:1"):
        with limiter.call("/farm.v1.RenderService/GetRender", peer) as limited_call:
            return await limited_call.authenticate(check, key)

    async def three_wrong_keys_with_a_right_one_between(right_peer: str) -> None:
        for n in range(3):
            with pytest.raises(Unauthenticated):
                await present("wrong")
            if n == 1:
                assert (await present("right", right_peer)).name == "a"  # resets nothing

    await three_wrong_keys_with_a_right_one_between("ipv4:10.0.0.1:2")  # from the same address
    with pytest.raises(ResourceExhausted) as error:
        await present("right")
    assert error.value.retry_after_s == 10
    clock.advance(10)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await present("wrong")
    clock.advance(61)  # those two left the window
    await three_wrong_keys_with_a_right_one_between("ipv4:10.0.0.2:1")  # from another address
    with pytest.raises(ResourceExhausted) as error:
        await present("right")
    assert error.value.retry_after_s == 20
    clock.advance(20)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await present("wrong")
    with pytest.raises(ResourceExhausted) as error:
        await present("right")
    assert error.value.retry_after_s == 40
    clock.advance(40 + 100)  # quiet for max_backoff_s after the refusal ended: forgiven
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await present("wrong")
    with pytest.raises(ResourceExhausted) as error:
        await present("right")
    assert error.value.retry_after_s == 10


def test_an_address_has_limits_of_its_own_whatever_its_tenants(clock):
    config = RateLimitsConfig(peer_submits={"rate": 1, "burst": 1}, peer_watches=1)
    limiter = RateLimiter(config, clock=clock)
    admit(limiter, "SubmitRender", "a", peer="ipv4:10.0.0.1:1")
    with pytest.raises(ResourceExhausted) as error:
        admit(limiter, "SubmitRender", "b", peer="ipv4:10.0.0.1:2")
    assert (error.value.violations[0].subject, error.value.retry_after_s) == ("peer:10.0.0.1/submits", 1)
    admit(limiter, "SubmitRender", "b", peer="ipv4:10.0.0.2:1")
    watch = "/farm.v1.RenderService/WatchRender"
    with limiter.call(watch, "ipv4:10.0.0.1:1") as limited_call:
        limited_call.admit(tenant("a"))
        with pytest.raises(ResourceExhausted) as error:
            limiter.call(watch, "ipv4:10.0.0.1:3")
        assert error.value.violations[0].subject == "peer:10.0.0.1/watches"
        with limiter.call(watch, "ipv4:10.0.0.2:1") as other:
            other.admit(tenant("b"))
            assert limiter.open_watches("peer", "10.0.0.2") == limiter.open_watches("tenant", "b") == 1
    assert limiter.open_watches("peer", "10.0.0.1") == limiter.open_watches("tenant", "a") == 0
    with limiter.call(watch, "ipv4:10.0.0.1:3") as limited_call:
        limited_call.admit(tenant("a"))


def test_a_call_refused_by_its_tenant_gives_back_the_watch_slot_of_its_address(clock):
    limiter = RateLimiter(RateLimitsConfig(watches=1, peer_watches=5), clock=clock)
    watch = "/farm.v1.RenderService/WatchRender"
    with limiter.call(watch, "ipv4:10.0.0.1:1") as limited_call:
        limited_call.admit(tenant("a"))
        with pytest.raises(ResourceExhausted) as error, limiter.call(watch, "ipv4:10.0.0.1:2") as second:
            second.admit(tenant("a"))
        assert error.value.violations[0].subject == "tenant:a/watches"
        assert limiter.open_watches("peer", "10.0.0.1") == 1
    assert limiter.open_watches("peer", "10.0.0.1") == 0


def test_zero_or_none_means_unlimited(clock):
    config = RateLimitsConfig(submits={"rate": 0, "burst": 1}, reads={"rate": None}, watches=0, peer_submits=OFF,
                              peer_reads={"rate": None}, peer_watches=None, failed_auth={"max_failures": 0})
    limiter = RateLimiter(config, clock=clock)
    held = []
    for _ in range(5000):
        admit(limiter, "SubmitRender", "a")
        admit(limiter, "GetRender", "a")
        limited_call = limiter.call("/farm.v1.RenderService/WatchRender", "ipv4:10.0.0.1:1")
        limited_call.admit(tenant("a"))
        held.append(limited_call)
        limiter._failed("10.0.0.1")
    limiter.call("/farm.v1.RenderService/GetRender", "ipv4:10.0.0.1:1")
    assert limiter.tracked() == 0


def test_what_the_limiter_tracks_is_dropped_once_it_limits_no_one(clock):
    config = RateLimitsConfig(failed_auth={"max_failures": 3, "window_s": 60, "backoff_s": 10, "max_backoff_s": 100})
    limiter = RateLimiter(config, clock=clock)
    for n in range(300):
        admit(limiter, "SubmitRender", f"tenant-{n}", peer=f"ipv4:10.0.{n // 250}.{n % 250}:1")
        limiter._failed(f"10.0.{n // 250}.{n % 250}")
    assert limiter.tracked() == 3 * 300  # a tenant's and an address's bucket of submits, an address's refused key
    clock.advance(ratelimit.SWEEP_INTERVAL_S)
    admit(limiter, "GetRender", "someone")
    assert limiter.tracked() == 2  # the buckets of this call


def test_a_limit_refuses_with_what_ran_out_and_when_to_retry(clock):
    limiter = RateLimiter(RateLimitsConfig(submits={"rate": 3, "burst": 1}), clock=clock)
    admit(limiter, "SubmitRender", "studio")
    with pytest.raises(ResourceExhausted) as error:
        admit(limiter, "SubmitRender", "studio")
    assert error.value.code == "RESOURCE_EXHAUSTED"
    assert error.value.retry_after_s == 0.334  # a third of a second, rounded up to a millisecond
    [violation] = error.value.violations
    assert violation.subject == "tenant:studio/submits"
    assert "3 submits and estimates a second per tenant, in bursts of up to 1" in violation.description
    clock.advance(0.334)
    admit(limiter, "SubmitRender", "studio")


def test_config_rejects_a_max_backoff_below_the_first(monkeypatch):
    with pytest.raises(ValueError, match="max_backoff_s"):
        RateLimitsConfig(failed_auth={"backoff_s": 60, "max_backoff_s": 30})
    monkeypatch.setenv("FARM_GATEWAY__RATE_LIMITS__SUBMITS__RATE", "7")
    assert FarmConfig().gateway.rate_limits.submits.rate == 7
