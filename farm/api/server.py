"""Starts the gateway: the RenderService with its interceptors, the standard health
service (NOT_SERVING until the store answers and an engine pool is up), server
reflection, and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from farm.api.interceptors import AuthInterceptor, ErrorInterceptor
from farm.api.metrics import GatewayMetrics
from farm.api.servicer import RenderServicer
from farm.api.watch import EventHub
from farm.config import FarmConfig
from farm.errors import AlreadyExists
from farm.jobs.schema import utcnow
from farm.jobs.store import JobStore
from farm.v1 import render_pb2, render_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name
DEFAULT_TENANT = "default"


def ensure_default_tenant(store: JobStore, keys_dir: Path) -> None:
    """The first start creates tenant `default` and leaves its key where the CLI looks."""
    key_file = keys_dir / f"{DEFAULT_TENANT}.key"
    if store.tenant_by_name(DEFAULT_TENANT) is not None:
        return
    try:
        _, key = store.create_tenant(DEFAULT_TENANT)
    except AlreadyExists:  # another process won the race and wrote the file
        return
    keys_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")


class Gateway:
    def __init__(self, config: FarmConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.store: JobStore | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port: int | None = None
        self._health_task: asyncio.Task | None = None
        self.hub: EventHub | None = None

    async def start(self) -> int:
        config = self.config
        config.home.mkdir(parents=True, exist_ok=True)
        self.store = await asyncio.to_thread(JobStore, config.store_url, migrate=config.store.migrate)
        await asyncio.to_thread(ensure_default_tenant, self.store, config.keys_dir)
        self.hub = EventHub(self.store, config.gateway.watch_poll_interval_s)

        async def authenticate(key: str):
            return await asyncio.to_thread(self.store.authenticate, key)

        limit = config.gateway.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.metrics), AuthInterceptor(authenticate)],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        render_pb2_grpc.add_RenderServiceServicer_to_server(
            RenderServicer(config, self.store, self.hub, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{config.gateway.host}:{config.gateway.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.gateway.host}:{config.gateway.port}")
        await self._set_health(False)
        await self.server.start()
        if config.gateway.metrics_port:
            self.metrics.serve_http(config.gateway.host, config.gateway.metrics_port)
        self._health_task = asyncio.create_task(self._health_loop())
        log.info("gateway listening on %s:%d", config.gateway.host, self.port)
        return self.port

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.store.ping)
                pools = await asyncio.to_thread(self.store.pools)
                now = utcnow()
                ready = any(p.is_up(self.config.gateway.pool_stale_after_s, now) for p in pools)
            except Exception:
                log.exception("health check of the store failed")
                ready = False
            await self._set_health(ready)
            await asyncio.sleep(self.config.gateway.health_interval_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self.hub:
            await self.hub.close()
        if self.server:
            await self.server.stop(grace_s)
        if self.store:
            self.store.close()


async def run_gateway(config: FarmConfig, ready_file: Path | None = None) -> None:
    """Runs until SIGINT or SIGTERM, then drains for a few seconds."""
    gateway = Gateway(config)
    port = await gateway.start()
    if ready_file:
        ready_file.write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
