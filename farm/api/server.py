"""Starts the gateway: the RenderService with its interceptors, the standard health
service (NOT_SERVING until the store answers and an engine pool is up), server
reflection, and the Prometheus endpoint; over TLS (mutual TLS with a client CA) where
the config names certificates, re-read when they change."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from farm import tracing
from farm.api.interceptors import AuthInterceptor, ErrorInterceptor
from farm.api.limits import MAX_SEND_BYTES, LargeRequestLimit, max_receive_bytes
from farm.api.metrics import GatewayMetrics
from farm.api.ratelimit import RateLimiter
from farm.api.servicer import RenderServicer
from farm.api.watch import EventHub
from farm.config import FarmConfig, GatewayConfig
from farm.domain.errors import AlreadyExists
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


class CertificateFiles:
    """The gateway's certificate chain, key and (for mutual TLS) client CA, read again
    when one of the files changes. gRPC asks `fetch` before every TLS handshake, so a
    renewed certificate is served to the next connection; connections already open keep
    theirs."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p is not None)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._failed: tuple | str | None = None
        self.initial = self._load_unchanged(self._stamp)
        """The configuration to start with; at start an unreadable or mismatched file is an error."""
        self.reloads = 0

    def _stat(self) -> tuple:
        # A rename into place (how Kubernetes updates a mounted secret) changes the inode
        # even where the size and the modification time look the same.
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (os.stat(p) for p in self.paths))

    def _load(self) -> grpc.ServerCertificateConfiguration:
        # gRPC takes any bytes and fails each handshake later; ssl checks that the chain
        # and the key parse and belong together, and that the CA file holds certificates.
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            check.load_verify_locations(cafile=self.client_ca_file)
        cert, key = Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()
        client_ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def _load_unchanged(self, stamp: tuple) -> grpc.ServerCertificateConfiguration:
        """The configuration from files still as `stamp` saw them after they were read, so
        that what was checked is what gRPC gets."""
        loaded = self._load()
        if self._stat() != stamp:
            raise OSError("the files changed while they were read")
        return loaded

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration where a file changed since the last one; None keeps the current
        one (nothing changed, or the new files cannot be used yet: a rotation half written)."""
        with self._lock:
            stamp: tuple | str | None = None
            try:
                stamp = self._stat()
                if stamp in (self._stamp, self._failed):  # unchanged since it was loaded, or found unusable
                    return None
                loaded = self._load_unchanged(stamp)
            except (OSError, ssl.SSLError) as error:
                stamp = stamp or str(error)  # a file missing: its error stands for its state
                if stamp != self._failed:  # once per change, not at every connection
                    log.warning("TLS files changed but cannot be used (%s); serving the previous certificate", error)
                    self._failed = stamp
                return None
            self._stamp, self._failed = stamp, None
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.cert_file)
            return loaded

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_ca_file is not None)


def certificate_files(gateway: GatewayConfig) -> CertificateFiles | None:
    if not gateway.tls:
        return None
    return CertificateFiles(gateway.tls_cert_file, gateway.tls_key_file, gateway.tls_client_ca_file)


class Gateway:
    def __init__(self, config: FarmConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter(config.gateway.rate_limits, self.metrics)
        self.store: JobStore | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port: int | None = None
        self._health_task: asyncio.Task | None = None
        self.hub: EventHub | None = None
        self.certificates: CertificateFiles | None = None
        self.large_requests: LargeRequestLimit | None = None

    async def start(self) -> int:
        config = self.config
        # Checked again here: a test or an embedder may have changed fields after validation.
        GatewayConfig.model_validate(config.gateway.model_dump())
        receive_limit = max_receive_bytes(config)
        self.certificates = certificate_files(config.gateway)
        config.home.mkdir(parents=True, exist_ok=True)
        tracing.configure(service_name="farm-gateway", **config.tracing.model_dump())
        self.store = await asyncio.to_thread(JobStore, config.store_url, migrate=config.store.migrate)
        await asyncio.to_thread(ensure_default_tenant, self.store, config.keys_dir)
        self.hub = EventHub(self.store, config.gateway.watch_poll_interval_s)

        async def authenticate(key: str):
            return await asyncio.to_thread(self.store.authenticate, key)

        # The large-request limit comes first: it sees each body's size before anything parses it.
        self.large_requests = LargeRequestLimit(
            config.gateway.large_request_bytes, config.gateway.max_concurrent_large_requests, self.metrics)
        self.server = grpc.aio.server(
            interceptors=[self.large_requests, ErrorInterceptor(self.metrics),
                          AuthInterceptor(authenticate, self.limiter, config.gateway.stream_reauth_interval_s)],
            options=[("grpc.max_receive_message_length", receive_limit),
                     ("grpc.max_send_message_length", MAX_SEND_BYTES)],
        )
        render_pb2_grpc.add_RenderServiceServicer_to_server(
            RenderServicer(config, self.store, self.hub, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{config.gateway.host}:{config.gateway.port}"
        if self.certificates is not None:
            self.port = self.server.add_secure_port(address, self.certificates.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.gateway.host}:{config.gateway.port}")
        await self._set_health(False)
        await self.server.start()
        if config.gateway.metrics_port:
            self.metrics.serve_http(config.gateway.host, config.gateway.metrics_port)
        self._health_task = asyncio.create_task(self._health_loop())
        security = ("mutual TLS" if config.gateway.tls_client_ca_file else "TLS") if self.certificates else "plaintext"
        log.info("gateway listening on %s:%d (%s; requests up to %d bytes)",
                 config.gateway.host, self.port, security, receive_limit)
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
        await asyncio.to_thread(tracing.flush)


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
