"""The synchronous client of farm.v1.RenderService (`AsyncFarmClient` in farm/client/aio.py
has the same methods for asyncio)."""

from __future__ import annotations

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


class EventStream:
    """A WatchRender stream: iterate it for the render's events; `cancel()` ends it. Errors
    arrive as FarmError's subclasses."""

    def __init__(self, call):
        self.call = call

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> pb.RenderEvent:
        try:
            return next(self.call)
        except grpc.RpcError as error:
            raise FarmError.from_call(error) from None

    def cancel(self) -> bool:
        return self.call.cancel()

    def __getattr__(self, name: str):  # the rest of grpc.Call: code(), trailing_metadata(), ...
        if name == "call":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.call, name)


class FarmClient:
    """A connection to the gateway. Every call sends the API key, and raises a FarmError
    subclass (farm/client/errors.py) for an answer other than OK. Idempotent calls are
    retried on UNAVAILABLE, a submit only where its spec has an idempotency key.

        with FarmClient("farm.example:50051", key, tls_ca_file="ca.crt") as client:
            render = client.wait(client.submit(spec).id)
            client.download(render.id, "clip.mp4")
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, tls: bool = False,
                 tls_ca_file: str | Path | None = None, tls_cert_file: str | Path | None = None,
                 tls_key_file: str | Path | None = None, tls_server_name: str | None = None,
                 retries: bool = True, options: Sequence[tuple[str, Any]] = ()):
        """A channel to the gateway at `target`, plaintext unless `tls` or any `tls_*` is given.

        api_key: the tenant's key (see `find_api_key`); None sends none (health checks).
        tls_ca_file: PEM CA certificates to check the gateway's certificate against (None:
            the system's roots). tls_cert_file, tls_key_file: the client's certificate chain
            and key, for a gateway that asks for one (mutual TLS). tls_server_name: the name
            to expect in the gateway's certificate instead of the target's host (an address,
            or a name the certificate does not carry).
        retries: False sends every call once (a test of the gateway's own answers).
        options: more gRPC channel options; they win over the client's."""
        channel_options, credentials = channel_arguments(
            tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
            tls_server_name=tls_server_name, retries=retries, options=options)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options)
        self.retries = retries
        self.stub = render_pb2_grpc.RenderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = bearer(api_key)
        """Sent with every call (the API key)."""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None, metadata=None):
        try:
            return method(request, metadata=self.metadata if metadata is None else metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise FarmError.from_call(error) from None

    def is_serving(self, timeout: float = 2.0) -> bool:
        """Whether the gateway's health service says SERVING (no key needed, no retries)."""
        try:
            response = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def submit(self, spec: pb.RenderSpec, timeout: float = 30, traceparent: str | None = None) -> pb.Render:
        """Queues a render. Retried on UNAVAILABLE only where `spec.idempotency_key` is set
        (the gateway then returns the render the first call made); `timeout` covers every
        try. `traceparent`: the W3C trace context to render under; by default the current
        OpenTelemetry span's, where there is one."""
        request = pb.SubmitRenderRequest(spec=spec)
        metadata = self.metadata + trace_metadata(traceparent)
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._call(self.stub.SubmitRender, request, remaining(deadline), metadata)
            except Unavailable as error:
                pause = submit_pause(self.retries, spec, attempt, error, deadline)
                if pause is None:
                    raise
                time.sleep(pause)

    def get(self, render_id: str, timeout: float = 30) -> pb.Render:
        return self._call(self.stub.GetRender, pb.GetRenderRequest(render_id=render_id), timeout)

    def cancel(self, render_id: str, timeout: float = 30) -> pb.Render:
        return self._call(self.stub.CancelRender, pb.CancelRenderRequest(render_id=render_id), timeout)

    def list(self, *, timeout: float = 30, **fields) -> pb.ListRendersResponse:
        """One page of the tenant's renders, newest first; `fields` are ListRendersRequest's
        (states, model, page_size, page_token)."""
        return self._call(self.stub.ListRenders, pb.ListRendersRequest(**fields), timeout)

    def models(self, timeout: float = 30) -> pb.ListModelsResponse:
        return self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)

    def estimate(self, spec: pb.RenderSpec, timeout: float = 30) -> pb.CostEstimate:
        return self._call(self.stub.EstimateCost, pb.EstimateCostRequest(spec=spec), timeout)

    def usage(self, since, until, group_by: int | str = "model", timeout: float = 30) -> pb.UsageReport:
        """What the tenant was charged in [since, until) (datetimes, naive ones UTC, or
        Timestamps), by model, device, day or phase, and its budget."""
        return self._call(self.stub.GetUsage, usage_request(since, until, group_by), timeout)

    def watch(self, render_id: str, after_sequence: int = 0, timeout: float | None = None) -> EventStream:
        """The render's events after `after_sequence`, in order; the stream ends after the
        final state. A client that reconnects passes the last sequence it saw."""
        call = self.stub.WatchRender(pb.WatchRenderRequest(render_id=render_id, after_sequence=after_sequence),
                                     metadata=self.metadata, timeout=timeout)
        return EventStream(call)

    def wait(self, render_id: str, timeout: float = 600) -> pb.Render:
        """Follows the render's events until its final state (a broken stream is resumed
        after the last event seen); returns the render."""
        deadline = time.monotonic() + timeout
        last_sequence, failures = 0, 0
        while True:
            try:
                for event in self.watch(render_id, after_sequence=last_sequence, timeout=remaining(deadline)):
                    last_sequence, failures = event.sequence, 0
                return self.get(render_id)
            except Unavailable as error:
                failures += 1
                pause = resume_pause(failures, error, deadline)
                if pause is None:
                    raise
                time.sleep(pause)

    def fetch(self, render_id: str, kind: int = pb.ARTIFACT_KIND_VIDEO, offset: int = 0,
              timeout: float = 600) -> bytes:
        """An artifact (from byte `offset`) in memory: for small ones, such as the manifest.
        `download` writes a video to disk as it arrives."""
        buffer = io.BytesIO()
        self.download(render_id, buffer, kind=kind, offset=offset, timeout=timeout)
        return buffer.getvalue()

    def download(self, render_id: str, destination: str | Path | BinaryIO, kind: int = pb.ARTIFACT_KIND_VIDEO,
                 *, offset: int = 0, timeout: float = 3600) -> int:
        """Streams an artifact to `destination` chunk by chunk; returns its size in bytes.

        A path is written to `<path>.partial` and renamed to the path once whole; a
        `.partial` that an earlier download left is resumed from its end. A binary file is
        written from its position on, which stands for the artifact's byte `offset`. A
        stream that breaks (UNAVAILABLE) is resumed from the bytes already written
        (FetchArtifact's `offset`), up to `timeout` in all."""
        target = Destination(destination, offset)
        deadline = time.monotonic() + timeout
        failures, total = 0, None
        try:
            while True:
                before = target.written
                request = pb.FetchArtifactRequest(render_id=render_id, kind=kind, offset=target.written)
                call = self.stub.FetchArtifact(request, metadata=self.metadata, timeout=remaining(deadline))
                try:
                    for chunk in call:
                        target.write(chunk)
                        total = chunk.total_bytes
                except grpc.RpcError as raw:
                    error = FarmError.from_call(raw)
                    if isinstance(error, InvalidArgument) and "offset" in error.field_violations and target.restart():
                        continue  # the .partial was longer than the artifact: another's
                    if not isinstance(error, Unavailable):
                        raise error from None
                    failures = 1 if target.written > before else failures + 1
                    pause = resume_pause(failures, error, deadline)
                    if pause is None:
                        raise error from None
                    time.sleep(pause)
                    continue
                finally:
                    call.cancel()  # a no-op once the stream ended
                if finished(target, total, before):
                    return target.written
        finally:
            target.close()
