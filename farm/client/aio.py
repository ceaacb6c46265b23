"""The asyncio client of farm.v1.RenderService: FarmClient's methods as coroutines, on a
grpc.aio channel, with the same errors, retries and TLS. Create it inside the event loop
that uses it."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from farm.client.channel import (
    DEFAULT_TARGET,
    Destination,
    bearer,
    channel_arguments,
    finished,
    remaining,
    resume_pause,
    submit_pause,
    trace_metadata,
    usage_request,
)
from farm.client.errors import FarmError, InvalidArgument, Unavailable
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc


class AsyncEventStream:
    """A WatchRender stream: `async for` it for the render's events; `cancel()` ends it.
    Errors arrive as FarmError's subclasses."""

    def __init__(self, call):
        self.call = call
        self._events = None

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> pb.RenderEvent:
        if self._events is None:
            self._events = self.call.__aiter__()
        try:
            return await self._events.__anext__()
        except grpc.RpcError as error:
            raise FarmError.from_call(error) from None

    def cancel(self) -> bool:
        return self.call.cancel()

    def __getattr__(self, name: str):  # the rest of grpc.aio.Call: code(), trailing_metadata(), ...
        if name == "call":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.call, name)


class AsyncFarmClient:
    """`FarmClient` for asyncio:

        async with AsyncFarmClient("farm.example:50051", key, tls=True) as client:
            render = await client.submit(spec)
            async for event in client.watch(render.id):
                print(event.stage, event.step)
            await client.download(render.id, "clip.mp4")
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, tls: bool = False,
                 tls_ca_file: str | Path | None = None, tls_cert_file: str | Path | None = None,
                 tls_key_file: str | Path | None = None, tls_server_name: str | None = None,
                 retries: bool = True, options: Sequence[tuple[str, Any]] = ()):
        """As FarmClient's."""
        channel_options, credentials = channel_arguments(
            tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
            tls_server_name=tls_server_name, retries=retries, options=options)
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options)
        self.retries = retries
        self.stub = render_pb2_grpc.RenderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = bearer(api_key)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncFarmClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout: float | None, metadata=None):
        try:
            return await method(request, metadata=self.metadata if metadata is None else metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise FarmError.from_call(error) from None

    async def is_serving(self, timeout: float = 2.0) -> bool:
        try:
            response = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def submit(self, spec: pb.RenderSpec, timeout: float = 30, traceparent: str | None = None) -> pb.Render:
        """As FarmClient.submit: retried only with an idempotency key; `traceparent`, else
        the current OpenTelemetry span's context, is sent with it."""
        request = pb.SubmitRenderRequest(spec=spec)
        metadata = self.metadata + trace_metadata(traceparent)
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call(self.stub.SubmitRender, request, remaining(deadline), metadata)
            except Unavailable as error:
                pause = submit_pause(self.retries, spec, attempt, error, deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def get(self, render_id: str, timeout: float = 30) -> pb.Render:
        return await self._call(self.stub.GetRender, pb.GetRenderRequest(render_id=render_id), timeout)

    async def cancel(self, render_id: str, timeout: float = 30) -> pb.Render:
        return await self._call(self.stub.CancelRender, pb.CancelRenderRequest(render_id=render_id), timeout)

    async def list(self, *, timeout: float = 30, **fields) -> pb.ListRendersResponse:
        return await self._call(self.stub.ListRenders, pb.ListRendersRequest(**fields), timeout)

    async def models(self, timeout: float = 30) -> pb.ListModelsResponse:
        return await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)

    async def estimate(self, spec: pb.RenderSpec, timeout: float = 30) -> pb.CostEstimate:
        return await self._call(self.stub.EstimateCost, pb.EstimateCostRequest(spec=spec), timeout)

    async def usage(self, since, until, group_by: int | str = "model", timeout: float = 30) -> pb.UsageReport:
        return await self._call(self.stub.GetUsage, usage_request(since, until, group_by), timeout)

    def watch(self, render_id: str, after_sequence: int = 0, timeout: float | None = None) -> AsyncEventStream:
        """An async iterator of the render's events after `after_sequence` (no await to open it)."""
        call = self.stub.WatchRender(pb.WatchRenderRequest(render_id=render_id, after_sequence=after_sequence),
                                     metadata=self.metadata, timeout=timeout)
        return AsyncEventStream(call)

    async def wait(self, render_id: str, timeout: float = 600) -> pb.Render:
        deadline = time.monotonic() + timeout
        last_sequence, failures = 0, 0
        while True:
            try:
                async for event in self.watch(render_id, after_sequence=last_sequence, timeout=remaining(deadline)):
                    last_sequence, failures = event.sequence, 0
                return await self.get(render_id)
            except Unavailable as error:
                failures += 1
                pause = resume_pause(failures, error, deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def fetch(self, render_id: str, kind: int = pb.ARTIFACT_KIND_VIDEO, offset: int = 0,
                    timeout: float = 600) -> bytes:
        buffer = io.BytesIO()
        await self.download(render_id, buffer, kind=kind, offset=offset, timeout=timeout)
        return buffer.getvalue()

    async def download(self, render_id: str, destination: str | Path | BinaryIO,
                       kind: int = pb.ARTIFACT_KIND_VIDEO, *, offset: int = 0, timeout: float = 3600) -> int:
        """As FarmClient.download. The chunks (1 MiB by default) are written to the file in
        the event loop's thread."""
        target = Destination(destination, offset)
        deadline = time.monotonic() + timeout
        failures, total = 0, None
        try:
            while True:
                before = target.written
                request = pb.FetchArtifactRequest(render_id=render_id, kind=kind, offset=target.written)
                call = self.stub.FetchArtifact(request, metadata=self.metadata, timeout=remaining(deadline))
                try:
                    async for chunk in call:
                        target.write(chunk)
                        total = chunk.total_bytes
                except grpc.RpcError as raw:
                    error = FarmError.from_call(raw)
                    if isinstance(error, InvalidArgument) and "offset" in error.field_violations and target.restart():
                        continue
                    if not isinstance(error, Unavailable):
                        raise error from None
                    failures = 1 if target.written > before else failures + 1
                    pause = resume_pause(failures, error, deadline)
                    if pause is None:
                        raise error from None
                    await asyncio.sleep(pause)
                    continue
                finally:
                    call.cancel()
                if finished(target, total, before):
                    return target.written
        finally:
            target.close()
