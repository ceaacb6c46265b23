"""Cross-cutting concerns of every RPC: errors become statuses with google.rpc
details, API keys become tenants, and every call is counted and timed.

Every answer names a gRPC code that says what the client can do about it, never
UNKNOWN: a body that is not the method's message is INVALID_ARGUMENT, a passed
deadline DEADLINE_EXCEEDED, a database that cannot be reached UNAVAILABLE with
RetryInfo, and anything else INTERNAL. No answer carries a Python class name, SQL
or a whole long value: the logs have those."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from farm.api.ratelimit import LimitedCall, RateLimiter
from farm.domain.errors import (
    DeadlineExceeded,
    FarmError,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    quoted,
)
from farm.jobs.outages import store_unreachable
from farm.jobs.records import TenantRecord

log = logging.getLogger(__name__)
CURRENT_TENANT: contextvars.ContextVar[TenantRecord] = contextvars.ContextVar("farm_tenant")
# Health checks and reflection are for load balancers and tools: no key needed.
PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# What a client is told to wait before retrying while the job store cannot be reached
# (a PostgreSQL restart or failover takes seconds).
STORE_RETRY_S = 1.0
# A TimeoutError this close to the client's deadline is that deadline passing.
DEADLINE_SLACK_S = 0.1
# The status travels in trailers, which clients cap at 8 KiB before they start refusing
# answers (16 KiB hard): the message and the details are kept well inside that.
MAX_MESSAGE_BYTES = 512
MAX_DETAILS_BYTES = 3072


def current_tenant() -> TenantRecord:
    return CURRENT_TENANT.get()


def _wrap(handler: grpc.RpcMethodHandler, around: Callable,
          decode_in_behavior: bool = False) -> grpc.RpcMethodHandler:
    """Rebuilds a method handler with `around(behavior, streaming)` applied. With
    `decode_in_behavior`, gRPC hands the wrapped behavior the request's raw bytes and
    `around` decodes them (`handler.request_deserializer`)."""
    if handler is None:
        return None
    deserializer = None if decode_in_behavior else handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            around(handler.unary_unary, False), deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            around(handler.unary_stream, True), deserializer, handler.response_serializer)
    return handler  # client- and bidi-streaming: farm has none


def _clip(text: str, limit: int) -> str:
    """`text` cut to `limit` bytes of UTF-8, saying how much was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + f"... ({len(data) - limit} more bytes)"


def _bad_request(violations: list[FieldViolation]) -> error_details_pb2.BadRequest:
    """Every violation that fits the trailers' budget, then a note of how many did not."""
    bad = error_details_pb2.BadRequest()
    for index, violation in enumerate(violations):
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=_clip(violation.field, 256), description=_clip(violation.description, 512))
        if bad.ByteSize() + entry.ByteSize() > MAX_DETAILS_BYTES:
            left = len(violations) - index
            bad.field_violations.add(field="", description=f"{left} more problems are not listed; fix these first")
            break
        bad.field_violations.append(entry)
    return bad


def error_status(error: FarmError) -> status_pb2.Status:
    code = getattr(code_pb2, error.code)
    details = []
    if isinstance(error, InvalidArgument):
        details.append(_bad_request(error.violations))
    if isinstance(error, ResourceExhausted) and error.violations:
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=_clip(v.subject, 256),
                                                     description=_clip(v.description, 512))
            for v in error.violations[:8]
        ]))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=_clip(error.message, MAX_MESSAGE_BYTES), details=packed)


def _request_name(deserializer) -> str:
    """`farm.v1.GetRenderRequest` for a generated message's FromString."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def _nul_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """Each string of the request (map keys included, at any depth) that holds U+0000, by
    its field path. PostgreSQL's text cannot hold one (a query naming it fails), and no
    field means anything by it, so it is refused on every store alike."""
    found = []

    def check(path: str, value) -> None:
        if isinstance(value, str) and "\x00" in value:
            found.append(FieldViolation(path, "holds a NUL character (U+0000); no string of a request may hold one"))
        elif isinstance(value, Message):
            found.extend(_nul_violations(value, f"{path}."))

    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                entry = f"{path}[{quoted(key) if isinstance(key, str) else key}]"
                check(entry, key if isinstance(key, str) and "\x00" in key else item)
        elif field.is_repeated:
            for index, item in enumerate(value):
                check(f"{path}[{index}]", item)
        else:
            check(path, value)
    return found


def _decoder(deserializer) -> Callable[[bytes], object]:
    """Decodes a request body; a body that is not the message, or whose strings hold NUL
    characters, is INVALID_ARGUMENT."""
    if deserializer is None:
        return lambda raw: raw
    name = _request_name(deserializer)

    def decode(raw: bytes):
        try:
            request = deserializer(raw)
        except DecodeError as error:
            # protobuf says e.g. "Error parsing message with type 'X': Wire format was corrupt".
            reason = str(error).rpartition(": ")[2].strip().rstrip(".") or "it cannot be parsed"
            raise InvalidArgument([FieldViolation(
                "request", f"the body is not a valid {name} ({_clip(reason, 128)})")]) from None
        if isinstance(request, Message) and (violations := _nul_violations(request)):
            raise InvalidArgument(violations)
        return request
    return decode


async def _abort(context, error: FarmError) -> None:
    status = rpc_status.to_status(error_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns every error into a status with a code a client can act on and google.rpc
    details, and records each call's code and duration. It decodes requests itself, so
    that a corrupt body is answered here rather than by gRPC."""

    def __init__(self, metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        method = details.method
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        decode = _decoder(handler.request_deserializer)

        def around(behavior, streaming):
            if streaming:
                async def stream_wrapper(raw, context):
                    started, code = time.perf_counter(), "OK"
                    try:
                        async for item in behavior(decode(raw), context):
                            yield item
                    except BaseException as error:
                        code, answer = self._answer(method, context, error)
                        if answer is None:
                            raise
                        await _abort(context, answer)
                    finally:
                        self.metrics.observe(method, code, time.perf_counter() - started)
                return stream_wrapper

            async def unary_wrapper(raw, context):
                started, code = time.perf_counter(), "OK"
                try:
                    return await behavior(decode(raw), context)
                except BaseException as error:
                    code, answer = self._answer(method, context, error)
                    if answer is None:
                        raise
                    await _abort(context, answer)
                finally:
                    self.metrics.observe(method, code, time.perf_counter() - started)
            return unary_wrapper

        return _wrap(handler, around, decode_in_behavior=True)

    def _answer(self, method: str, context, error: BaseException) -> tuple[str, FarmError | None]:
        """The code of the call, and the error to answer with; None where gRPC must see
        `error` itself (the call was cancelled, or the servicer aborted it already)."""
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            # The client went away or its deadline passed: gRPC has ended the call.
            remaining = context.time_remaining()
            return ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"), None
        if context.code() is not None:  # context.abort() raises an exception of its own
            return context.code().name, None
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
            return "INTERNAL", None
        answer = self._farm_error(method, context, error)
        return answer.code, answer

    def _farm_error(self, method: str, context, error: Exception) -> FarmError:
        if isinstance(error, FarmError):
            return error
        if store_unreachable(error):
            self.metrics.store_errors.inc()
            log.warning("the job store is unreachable in %s: %s", method, error)
            return Unavailable("the job store is unavailable; retry shortly", retry_after_s=STORE_RETRY_S)
        if isinstance(error, TimeoutError):
            remaining = context.time_remaining()
            if remaining is not None and remaining <= DEADLINE_SLACK_S:
                return DeadlineExceeded("the deadline passed before the answer was ready")
            log.warning("a dependency timed out in %s", method, exc_info=error)
            return Unavailable("a dependency of the gateway timed out; retry shortly", retry_after_s=STORE_RETRY_S)
        # A bug: the client learns only that it happened and how to find it in the logs.
        reference = secrets.token_hex(4)
        log.error("unhandled error in %s (reference %s)", method, reference, exc_info=error)
        return FarmError(f"internal error (reference {reference}); the gateway logged it")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` -> the tenant, available to servicers through
    `current_tenant()`. Keys are checked against the store on every call, so a revoked
    key stops working at once. The rate limiter (`farm.api.ratelimit`) is asked before
    the key is checked (the client address's limits, and whether refused keys throttle
    it) and after (the tenant's); a refused key counts against the client address."""

    def __init__(self, authenticate: Callable, limiter: RateLimiter | None = None, reauth_interval_s: float = 2.0):
        """reauth_interval_s: how often a stream checks its key again (a watch lasts for
        as long as its render, and a key revoked meanwhile must stop it)."""
        self.authenticate = authenticate  # async (key) -> TenantRecord
        self.limiter = limiter or RateLimiter.unlimited()
        self.reauth_interval_s = reauth_interval_s

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())

        def around(behavior, streaming):
            def key() -> str:
                header = metadata.get("authorization", "")
                if not header:
                    raise Unauthenticated("missing `authorization: Bearer <API key>` metadata")
                scheme, _, key = header.partition(" ")
                if scheme.lower() != "bearer" or not key.strip():
                    raise Unauthenticated("authorization metadata must be `Bearer <API key>`")
                return key.strip()

            async def resolve(limited: LimitedCall) -> TenantRecord:
                return limited.admit(await limited.authenticate(self.authenticate, key()))

            if streaming:
                async def stream_wrapper(request, context):
                    with self.limiter.call(details.method, context.peer()) as limited:
                        CURRENT_TENANT.set(await resolve(limited))
                        async for item in self._while_authorized(behavior(request, context), key()):
                            yield item
                return stream_wrapper

            async def unary_wrapper(request, context):
                with self.limiter.call(details.method, context.peer()) as limited:
                    CURRENT_TENANT.set(await resolve(limited))
                return await behavior(request, context)
            return unary_wrapper

        return _wrap(handler, around)

    async def _while_authorized(self, items: AsyncIterator, key: str) -> AsyncIterator:
        """`items`, ended with UNAUTHENTICATED once `key` no longer authenticates (it is
        checked every `reauth_interval_s`, between items and while none comes). A store
        that cannot answer the check does not end the stream: the key was good."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        pending: asyncio.Future | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(items))
                wait_s = max(0.0, checked + self.reauth_interval_s - loop.time())
                done, _ = await asyncio.wait({pending}, timeout=wait_s)
                if not done:
                    checked = loop.time()
                    try:
                        await self.authenticate(key)
                    except Unauthenticated:
                        raise
                    except Exception as error:  # noqa: BLE001 - checked again next interval
                        log.warning("cannot check a stream's API key again: %s", error)
                    continue
                try:
                    item = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield item
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            await items.aclose()
