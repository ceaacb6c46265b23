"""Cross-cutting concerns of every RPC: errors become statuses with google.rpc
details, API keys become tenants, and every call is counted and timed."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from farm.errors import FarmError, InvalidArgument, ResourceExhausted, Unauthenticated
from farm.jobs.records import TenantRecord

log = logging.getLogger(__name__)
CURRENT_TENANT: contextvars.ContextVar[TenantRecord] = contextvars.ContextVar("farm_tenant")
# Health checks and reflection are for load balancers and tools: no key needed.
PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def current_tenant() -> TenantRecord:
    return CURRENT_TENANT.get()


def _wrap(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    """Rebuilds a method handler with `around(behavior, streaming)` applied."""
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            around(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            around(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer)
    return handler  # client- and bidi-streaming: farm has none


def error_status(error: FarmError) -> status_pb2.Status:
    code = getattr(code_pb2, error.code)
    details = []
    if isinstance(error, InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]))
    if isinstance(error, ResourceExhausted):
        if error.violations:
            details.append(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                for v in error.violations
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
    return status_pb2.Status(code=code, message=error.message, details=packed)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns FarmErrors into statuses with details, hides internal errors behind
    INTERNAL, and records each call's code and duration."""

    def __init__(self, metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        method = details.method

        def around(behavior, streaming):
            async def abort(context, error: FarmError):
                status = rpc_status.to_status(error_status(error))
                await context.abort(status.code, status.details, status.trailing_metadata)

            if streaming:
                async def stream_wrapper(request, context):
                    started, code = time.perf_counter(), "OK"
                    try:
                        async for item in behavior(request, context):
                            yield item
                    except FarmError as error:
                        code = error.code
                        await abort(context, error)
                    except Exception as error:
                        code = self._code_of(context, error)
                        raise
                    finally:
                        self.metrics.observe(method, code, time.perf_counter() - started)
                return stream_wrapper

            async def unary_wrapper(request, context):
                started, code = time.perf_counter(), "OK"
                try:
                    return await behavior(request, context)
                except FarmError as error:
                    code = error.code
                    await abort(context, error)
                except Exception as error:
                    code = self._code_of(context, error)
                    raise
                finally:
                    self.metrics.observe(method, code, time.perf_counter() - started)
            return unary_wrapper

        return _wrap(await continuation(details), around)

    @staticmethod
    def _code_of(context, error: Exception) -> str:
        # context.abort() raises an exception of its own after setting the code.
        code = context.code()
        if code is not None:
            return code.name
        log.exception("unhandled error in RPC", exc_info=error)
        return "INTERNAL"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` -> the tenant, available to servicers through
    `current_tenant()`. Keys are checked against the store on every call, so a revoked
    key stops working at once."""

    def __init__(self, authenticate: Callable):
        self.authenticate = authenticate  # async (key) -> TenantRecord

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())

        def around(behavior, streaming):
            async def resolve():
                header = metadata.get("authorization", "")
                if not header:
                    raise Unauthenticated("missing `authorization: Bearer <API key>` metadata")
                scheme, _, key = header.partition(" ")
                if scheme.lower() != "bearer" or not key.strip():
                    raise Unauthenticated("authorization metadata must be `Bearer <API key>`")
                return await self.authenticate(key.strip())

            if streaming:
                async def stream_wrapper(request, context):
                    CURRENT_TENANT.set(await resolve())
                    async for item in behavior(request, context):
                        yield item
                return stream_wrapper

            async def unary_wrapper(request, context):
                CURRENT_TENANT.set(await resolve())
                return await behavior(request, context)
            return unary_wrapper

        return _wrap(handler, around)
