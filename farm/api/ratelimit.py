"""Rate limits of the gateway: token buckets per tenant and per client address, caps on
open WatchRender streams, and throttling of client addresses that present refused API
keys. Settings: `gateway.rate_limits` (`farm.config.RateLimitsConfig`).

Limits are kept in memory, in each gateway process: with N gateway replicas behind a
load balancer a client may get up to N times the configured limits (less where the
balancer keeps a client on one replica). That is the usual trade-off of local limiting:
no store round trip on every call, nothing shared to lose or to wait for.

Calls fall in classes with limits of their own:
- submits: SubmitRender and EstimateCost (each resolves, places and prices a spec; a
  submit also runs a budget transaction);
- reads: every other RenderService call (GetRender, ListRenders, GetUsage, ListModels,
  FetchArtifact, CancelRender: one cheap store query or update each), and each
  WatchRender as it opens;
- watches: WatchRender streams open at once, a cap rather than a rate.

Each class is limited per client address (the peer gRPC reports, without its port) before
the API key is checked, so that floods without a valid key are limited too, and per tenant
once it is. A refusal is RESOURCE_EXHAUSTED with a google.rpc QuotaFailure naming what ran
out (`tenant:<name>/submits`, `peer:<address>/reads`, `peer:<address>/failed-auth`, ...)
and a RetryInfo with the time until the call would be served. A refused call takes no
token, so a client that waits the RetryInfo delay is served. Health checks and
reflection never reach the limiter (the auth interceptor passes them through).

Failed authentications: an address that presents `max_failures` refused keys within
`window_s` has every call refused, without its key being looked at, for `backoff_s`,
twice as long each further time, up to `max_backoff_s`. A valid key from that address is
refused too: the key is not checked, which is the point (a guesser learns nothing and
costs no store round trip), and clients that share an address (behind NAT) share the
penalty. A successful authentication resets nothing, for its own address or another: a
guesser holding one valid key could otherwise mix it in with its guesses. Calls with no
`Bearer` key at all are not counted (no key was guessed); the address limits cover them.

The limiter runs on the gateway's event loop and is not thread-safe. What it tracks is
bounded: buckets that have refilled and addresses with nothing held against them are
dropped every minute, and past `MAX_TRACKED` entries the oldest go first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter

from farm.config import FailedAuthLimits, RateLimit, RateLimitsConfig
from farm.domain.errors import QuotaViolation, ResourceExhausted, Unauthenticated

log = logging.getLogger(__name__)
T = TypeVar("T")

SUBMITS, READS, WATCHES, FAILED_AUTH = "submits", "reads", "watches", "failed-auth"
TENANT, PEER = "tenant", "peer"
# The class of each RenderService method; any other (a method added later) is a read.
METHOD_CLASSES = {"SubmitRender": SUBMITS, "EstimateCost": SUBMITS, "WatchRender": WATCHES}
# What a client refused for too many open watches is told to wait: a stream may end at any moment.
WATCH_RETRY_S = 1.0
# Tokens short of a whole one that still count as one: a client that waited the RetryInfo
# delay (rounded on the wire to whole nanoseconds) is not refused for a rounding error.
TOKEN_SLACK = 1e-5
# Likewise, seconds short of the end of a refusal that count as its end.
TIME_SLACK_S = 1e-6
SWEEP_INTERVAL_S = 60.0
MAX_TRACKED = 100_000


def peer_address(peer: str | None) -> str:
    """The client's address without its port, from gRPC's peer string: `ipv4:10.1.2.3:5123`
    -> `10.1.2.3`; `ipv6:[2001:db8::1]:5123` (or with `%5B`, `%5D`) -> `2001:db8::1`; an IPv4
    address mapped into IPv6 -> the IPv4 address; a Unix socket -> `unix`; anything else whole."""
    if not peer:
        return "unknown"
    scheme, _, rest = peer.partition(":")
    if scheme == "unix":
        return "unix"
    if scheme not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def method_class(method: str) -> str:
    """`/farm.v1.RenderService/SubmitRender` -> `submits`."""
    return METHOD_CLASSES.get(method.rsplit("/", 1)[-1], READS)


def _ceil_ms(seconds: float) -> float:
    """Rounded up to a whole millisecond, so that a client told to wait this long is served
    (a nanosecond's worth of floating-point noise is not rounded up; TOKEN_SLACK covers it)."""
    return max(0.001, math.ceil(seconds * 1000 - 1e-6) / 1000)


@dataclasses.dataclass
class _Bucket:
    limit: RateLimit
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.limit.burst), self.tokens + max(0.0, now - self.stamp) * self.limit.rate)
        self.stamp = now


@dataclasses.dataclass
class _Failures:
    """The refused keys of one address in the window, and its refusals so far."""
    times: deque = dataclasses.field(default_factory=deque)
    level: int = 0
    """How many times the address was refused; the next refusal lasts backoff_s * 2**level."""
    last: float = -math.inf
    blocked_until: float = -math.inf

    def quiet_since(self) -> float:
        return max(self.last, self.blocked_until)


class RateLimiter:
    """The limits of one gateway process. `call()` admits a call from a client address (or
    refuses it) and returns its `LimitedCall`, through which the key is checked and the
    tenant's limits are applied."""

    def __init__(self, config: RateLimitsConfig, metrics=None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        """Monotonic seconds; tests substitute a clock they advance."""
        registry = metrics.registry if metrics is not None else CollectorRegistry()
        self.refused = Counter("farm_gateway_rate_limited_total",
                               "Calls refused by a rate limit, by class of call and scope (tenant or peer).",
                               ["class", "scope"], registry=registry)
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self._watches: dict[tuple[str, str], int] = {}
        self._failures: dict[str, _Failures] = {}
        self._next_sweep = -math.inf

    @classmethod
    def unlimited(cls) -> RateLimiter:
        off = RateLimit(rate=None)
        return cls(RateLimitsConfig(submits=off, reads=off, watches=None, peer_submits=off, peer_reads=off,
                                    peer_watches=None, failed_auth=FailedAuthLimits(max_failures=None)))

    # -- what the auth interceptor calls -------------------------------------------------

    def call(self, method: str, peer: str | None) -> LimitedCall:
        """Admits a call of `method` from gRPC peer `peer`, or raises ResourceExhausted:
        the address is throttled for refused keys, or over its limit of the call's class."""
        now = self.clock()
        self._sweep(now)
        address = peer_address(peer)
        call_class = method_class(method)
        limited = LimitedCall(self, call_class, address)
        failures = self._failures.get(address)
        if failures is not None and now + TIME_SLACK_S < failures.blocked_until:
            self._refuse_failed_auth(address, failures, now)
        peer_limits = {SUBMITS: self.config.peer_submits, READS: self.config.peer_reads,
                       WATCHES: self.config.peer_reads}
        self._take(PEER, call_class, address, peer_limits[call_class], now)
        if call_class == WATCHES:
            limited._hold(PEER, address, self.config.peer_watches)
        return limited

    def open_watches(self, scope: str, who: str) -> int:
        """WatchRender streams open for a tenant (by name) or a client address."""
        return self._watches.get((scope, who), 0)

    def tracked(self) -> int:
        """Buckets, stream counts and addresses held in memory."""
        return len(self._buckets) + len(self._watches) + len(self._failures)

    # -- buckets ---------------------------------------------------------------------------

    def _take(self, scope: str, call_class: str, who: str, limit: RateLimit, now: float) -> None:
        """One token of `who`'s bucket of `call_class` (watches take a read), or a refusal."""
        if not limit.rate:  # 0 or None: unlimited
            return
        bucket_class = READS if call_class == WATCHES else call_class
        key = (scope, bucket_class, who)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit is not limit:  # new, or the limits changed
            bucket = self._buckets[key] = _Bucket(limit, float(limit.burst), now)
            self._trim(self._buckets)
        else:
            bucket.refill(now)
        if bucket.tokens >= 1 - TOKEN_SLACK:
            bucket.tokens = max(0.0, bucket.tokens - 1)
            return
        retry = _ceil_ms((1 - bucket.tokens) / limit.rate)
        noun = "submits and estimates" if bucket_class == SUBMITS else "reads"
        self._refuse(scope, bucket_class, who,
                     f"{scope} {who} is over its rate of {noun} ({limit.rate:g}/s, bursts of {limit.burst}); "
                     f"retry in {retry:g} s",
                     f"at most {limit.rate:g} {noun} a second per {scope}, in bursts of up to {limit.burst}",
                     retry)

    # -- open watches ----------------------------------------------------------------------

    def _open(self, scope: str, who: str, cap: int | None) -> bool:
        """Counts one more open stream for `who`, or refuses it; True if it was counted."""
        if not cap:
            return False
        key = (scope, who)
        open_now = self._watches.get(key, 0)
        if open_now >= cap:
            self._refuse(scope, WATCHES, who,
                         f"{scope} {who} has {open_now} WatchRender streams open, its most; "
                         f"end one or retry in {WATCH_RETRY_S:g} s",
                         f"at most {cap} WatchRender streams open at once per {scope}", WATCH_RETRY_S)
        self._watches[key] = open_now + 1
        return True

    def _close(self, scope: str, who: str) -> None:
        key = (scope, who)
        left = self._watches.get(key, 0) - 1
        if left > 0:
            self._watches[key] = left
        else:
            self._watches.pop(key, None)

    # -- failed authentications ------------------------------------------------------------

    def _failed(self, address: str) -> None:
        """Counts a refused key from `address`; the `max_failures`th in the window starts
        its refusal."""
        limits = self.config.failed_auth
        if not limits.max_failures:
            return
        now = self.clock()
        failures = self._failures.get(address)
        if failures is None:
            failures = self._failures[address] = _Failures()
            self._trim(self._failures)
        if now - failures.quiet_since() >= limits.max_backoff_s:
            failures.level = 0
        failures.last = now
        failures.times.append(now)
        while failures.times and failures.times[0] <= now - limits.window_s:
            failures.times.popleft()
        if len(failures.times) >= limits.max_failures:
            backoff = min(limits.backoff_s * 2.0 ** failures.level, limits.max_backoff_s)
            failures.level = min(failures.level + 1, 64)
            failures.blocked_until = now + backoff
            failures.times.clear()
            log.warning("%d refused API keys from %s within %g s: refusing its calls for %g s",
                        limits.max_failures, address, limits.window_s, backoff)

    def _refuse_failed_auth(self, address: str, failures: _Failures, now: float) -> None:
        limits = self.config.failed_auth
        retry = _ceil_ms(failures.blocked_until - now)
        self._refuse(PEER, FAILED_AUTH, address,
                     f"too many refused API keys from {address}; its calls are refused for {retry:g} s more",
                     f"at most {limits.max_failures} refused API keys in {limits.window_s:g} s per client address",
                     retry)

    # -- refusals and housekeeping ---------------------------------------------------------

    def _refuse(self, scope: str, call_class: str, who: str, message: str, description: str,
                retry_after_s: float) -> None:
        self.refused.labels(call_class, scope).inc()
        raise ResourceExhausted(message, [QuotaViolation(f"{scope}:{who}/{call_class}", description)],
                                retry_after_s=retry_after_s)

    def _sweep(self, now: float) -> None:
        """Drops what no longer limits anyone: full buckets, addresses with no refused key
        in the window, no refusal running and their back-off forgotten."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.limit.burst:
                del self._buckets[key]
        limits = self.config.failed_auth
        for address, failures in list(self._failures.items()):
            recent = failures.times and failures.times[-1] > now - limits.window_s
            if not recent and now + TIME_SLACK_S >= failures.blocked_until and (
                    failures.level == 0 or now - failures.quiet_since() >= limits.max_backoff_s):
                del self._failures[address]

    @staticmethod
    def _trim(table: dict) -> None:
        """Past MAX_TRACKED entries, the oldest go (a dropped bucket is full again, a dropped
        address forgiven: a flood from that many addresses is met by the address limits)."""
        while len(table) > MAX_TRACKED:
            del table[next(iter(table))]


class LimitedCall:
    """One call's way through the limits, made by `RateLimiter.call` once the client address
    passed its own. A context manager: leaving it gives back the watch slots the call held."""

    def __init__(self, limiter: RateLimiter, call_class: str, address: str):
        self.limiter = limiter
        self.call_class = call_class
        self.address = address
        self._held: list[tuple[str, str]] = []

    def _hold(self, scope: str, who: str, cap: int | None) -> None:
        if self.limiter._open(scope, who, cap):
            self._held.append((scope, who))

    async def authenticate(self, authenticate: Callable[[str], Awaitable[T]], key: str) -> T:
        """`await authenticate(key)`; a key it refuses counts against the client address."""
        try:
            return await authenticate(key)
        except Unauthenticated:
            self.limiter._failed(self.address)
            raise

    def admit(self, tenant: T) -> T:
        """Applies the limits of `tenant` (a TenantRecord) to the call; returns it."""
        limiter, config = self.limiter, self.limiter.config
        tenant_limits = {SUBMITS: config.submits, READS: config.reads, WATCHES: config.reads}
        limiter._take(TENANT, self.call_class, tenant.name, tenant_limits[self.call_class], limiter.clock())
        if self.call_class == WATCHES:
            self._hold(TENANT, tenant.name, config.watches)
        return tenant

    def release(self) -> None:
        while self._held:
            self.limiter._close(*self._held.pop())

    def __enter__(self) -> LimitedCall:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
