"""A small synchronous client for farm.v1.RenderService, used by the CLI, the demo,
the benchmarks and the tests. It adds the API key to every call, and speaks TLS (with a
client certificate for mutual TLS) where asked to."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from farm.config import default_home
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# The gateway's largest answer (MAX_SEND_BYTES in farm/api/limits.py); requests beyond its
# receive limit are refused by the gateway, not here.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def find_api_key(home: Path | None = None) -> str:
    """$FARM_API_KEY, else the default tenant's key that the first start wrote."""
    if key := os.environ.get("FARM_API_KEY"):
        return key
    key_file = (home or default_home()) / "keys" / "default.key"
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(f"no API key: set FARM_API_KEY or start farm once so that {key_file} exists") from None


def channel_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                        key_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the server's certificate checked against `ca_file` (PEM; None: the
    system's roots), and for mutual TLS the client's certificate chain and key."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file),
                                        certificate_chain=read(cert_file))


class FarmClient:
    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, tls: bool = False,
                 tls_ca_file: str | Path | None = None, tls_cert_file: str | Path | None = None,
                 tls_key_file: str | Path | None = None, tls_server_name: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        """A channel to the gateway at `target`, plaintext unless `tls` or any `tls_*` is given.

        tls_ca_file: PEM CA certificates to check the gateway's certificate against (None:
            the system's roots). tls_cert_file, tls_key_file: the client's certificate chain
            and key, for a gateway that asks for one (mutual TLS). tls_server_name: the name
            to expect in the gateway's certificate instead of the target's host (an address,
            or a name the certificate does not carry). options: more gRPC channel options."""
        channel_options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *options,
        ]
        secure = tls or any(v is not None for v in (tls_ca_file, tls_cert_file, tls_key_file, tls_server_name))
        if secure:
            if tls_server_name:
                channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
            self.channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options)
        self.stub = render_pb2_grpc.RenderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "FarmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_serving(self, timeout: float = 2.0) -> bool:
        try:
            response = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def submit(self, spec: pb.RenderSpec, timeout: float = 30) -> pb.Render:
        return self.stub.SubmitRender(pb.SubmitRenderRequest(spec=spec), metadata=self.metadata, timeout=timeout)

    def get(self, render_id: str, timeout: float = 30) -> pb.Render:
        return self.stub.GetRender(pb.GetRenderRequest(render_id=render_id), metadata=self.metadata, timeout=timeout)

    def cancel(self, render_id: str, timeout: float = 30) -> pb.Render:
        return self.stub.CancelRender(pb.CancelRenderRequest(render_id=render_id), metadata=self.metadata,
                                      timeout=timeout)

    def list(self, **kwargs) -> pb.ListRendersResponse:
        return self.stub.ListRenders(pb.ListRendersRequest(**kwargs), metadata=self.metadata, timeout=30)

    def models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=30)

    def estimate(self, spec: pb.RenderSpec) -> pb.CostEstimate:
        return self.stub.EstimateCost(pb.EstimateCostRequest(spec=spec), metadata=self.metadata, timeout=30)

    def watch(self, render_id: str, after_sequence: int = 0, timeout: float | None = None) -> Iterator[pb.RenderEvent]:
        return self.stub.WatchRender(pb.WatchRenderRequest(render_id=render_id, after_sequence=after_sequence),
                                     metadata=self.metadata, timeout=timeout)

    def wait(self, render_id: str, timeout: float = 600) -> pb.Render:
        """Follows the render's events until its final state; returns the render."""
        for _ in self.watch(render_id, timeout=timeout):
            pass
        return self.get(render_id)

    def fetch(self, render_id: str, kind: int = pb.ARTIFACT_KIND_VIDEO, offset: int = 0) -> bytes:
        chunks = self.stub.FetchArtifact(pb.FetchArtifactRequest(render_id=render_id, kind=kind, offset=offset),
                                         metadata=self.metadata, timeout=600)
        return b"".join(chunk.data for chunk in chunks)
