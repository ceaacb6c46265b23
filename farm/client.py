"""A small synchronous client for farm.v1.RenderService, used by the CLI, the demo,
the benchmarks and the tests. It adds the API key to every call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from farm.config import default_home
from farm.v1 import render_pb2 as pb
from farm.v1 import render_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
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


class FarmClient:
    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None):
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
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
