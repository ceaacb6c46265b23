"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("farm_gateway_requests_total", "RPCs by method and status code.",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("farm_gateway_request_duration_seconds", "RPC handling time (streams: until they end).",
                                 ["method"], registry=self.registry)
        self.submitted = Counter("farm_renders_submitted_total", "Renders queued (idempotent replays excluded).",
                                 ["model", "task"], registry=self.registry)
        self.store_errors = Counter("farm_gateway_store_errors_total",
                                    "Calls answered UNAVAILABLE because the job store could not be reached.",
                                    registry=self.registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.requests.labels(name, code).inc()
        self.latency.labels(name).observe(seconds)

    def serve_http(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
