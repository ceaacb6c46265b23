"""The scheduler deployment: a single replica running `farm.jobs.scheduler.Scheduler`
over Serve handles of the engine deployments, each wrapped as an `EnginePool` whose
streams pass the replicas' typed events (`farm.domain.events`) through unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from farm import tracing
from farm.config import FarmConfig, ModelConfig, PoolConfig
from farm.domain.engine import EngineRequest
from farm.domain.errors import EngineLost
from farm.domain.events import EngineEvent
from farm.jobs.scheduler import Scheduler
from farm.jobs.store import JobStore
from farm.serve.flags import ServeNodeFence
from farm.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)
# Seconds assumed for a new replica to load its model and warm up, until one is measured.
DEFAULT_COLD_START_S = 30.0


def _is_engine_loss(error: BaseException) -> bool:
    """Ray's ways of saying the replica (or its node) is gone, as opposed to the
    render itself failing."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    return isinstance(error, lost) or type(error).__name__ in {"ActorDiedError", "ActorUnavailableError"}


class _ServeStream:
    def __init__(self, handle: DeploymentHandle, request: EngineRequest):
        self._response = handle.options(stream=True).render.remote(request)

    async def __aiter__(self) -> AsyncIterator[list[EngineEvent]]:
        try:
            async for event in self._response:
                yield event
        except Exception as error:
            if _is_engine_loss(error):
                raise EngineLost(str(error)) from error
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, Exception) else error) from None

    def cancel(self) -> None:
        self._response.cancel()


_status_cache: dict[str, Any] = {"at": -1.0, "value": None}
_status_lock: asyncio.Lock | None = None
# Every pool refreshes each autoscaling round; one status call (a controller RPC that
# can take a while under load) serves them all.
STATUS_TTL_S = 0.25


def _read_replicas() -> tuple[dict[tuple[str, str], list[str | None]], dict[str, float]]:
    """Node ids of the RUNNING replicas of every (app, deployment), and the quarantined
    nodes. The details are what `serve.status()` reads; it drops the replicas' nodes.
    They are read as the controller sends them: validating them into Serve's pydantic
    schema costs a noticeable share of a small node's CPU, every second."""
    from ray.serve.context import _get_global_client

    from farm.serve.flags import fenced_nodes

    def running(replica: dict) -> bool:
        state = replica.get("state")
        return getattr(state, "value", state) == "RUNNING"

    details = _get_global_client().get_serve_details()
    replicas = {(app_name, name): [r.get("node_id") for r in deployment.get("replicas", ()) if running(r)]
                for app_name, app in details.get("applications", {}).items()
                for name, deployment in app.get("deployments", {}).items()}
    return replicas, fenced_nodes(time.time())


async def _serve_replicas():
    global _status_lock
    _status_lock = _status_lock or asyncio.Lock()
    async with _status_lock:
        if time.monotonic() - _status_cache["at"] > STATUS_TTL_S:
            _status_cache["value"] = await asyncio.to_thread(_read_replicas)
            _status_cache["at"] = time.monotonic()
        return _status_cache["value"]


class ServePool:
    """One engine deployment (a model on one device kind) as the scheduler sees it."""

    def __init__(self, model: ModelConfig, pool: PoolConfig, handle: DeploymentHandle, device_kind: str,
                 app_name: str, info: dict | None):
        from farm.serve.render_replica import deployment_name

        self.model, self.handle, self.device_kind = model.name, handle, device_kind
        self.min_replicas, self.max_replicas = pool.min_replicas, pool.max_replicas
        self.backlog_target_s, self.relative_speed = pool.backlog_target_s, pool.relative_speed
        self.autoscaled = pool.min_replicas != pool.max_replicas
        self.app_name, self.deployment = app_name, deployment_name(model, pool)
        self.preemptible = bool(info.get("preemptible", False)) if info else False
        self._replicas = pool.min_replicas if self.autoscaled else pool.max_replicas
        # Running replicas on quarantined nodes: no renders go to them (farm.serve.routing).
        self._fenced_replicas = 0
        # Until a scale-up is measured: the start-up the engine reported, or a guess.
        self._cold_start_s = float(info.get("startup_seconds", DEFAULT_COLD_START_S)) if info else DEFAULT_COLD_START_S
        self._scale_asked_at: float | None = None
        self._wanted: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.device_kind}"

    @property
    def slots(self) -> int:
        return self._replicas

    @property
    def cold_start_s(self) -> float:
        return self._cold_start_s

    def render(self, request: EngineRequest) -> _ServeStream:
        return _ServeStream(self.handle, request)

    def preempt(self, render_id: str, attempt: int) -> None:
        from farm.serve.flags import request_preemption

        request_preemption(render_id, attempt)

    async def refresh(self) -> None:
        from farm.serve.flags import on_fenced_node

        replicas, fenced = await _serve_replicas()
        nodes = replicas.get((self.app_name, self.deployment))
        if nodes is None:
            return
        running = sum(1 for node in nodes if not on_fenced_node(node, fenced))
        self._fenced_replicas = len(nodes) - running
        if running > self._replicas and self._scale_asked_at is not None:
            # A scale-up finished: from asking to a replica that takes renders.
            self._cold_start_s = time.monotonic() - self._scale_asked_at
            self._scale_asked_at = None
        self._replicas = running
        if not self.preemptible and running:
            with contextlib.suppress(Exception):
                info = await self.handle.info.remote()
                self.preemptible = bool(info.get("preemptible", False))

    def scale_to(self, replicas: int) -> None:
        if not self.autoscaled:
            return
        from farm.serve.autoscaling import publish_wanted

        if replicas > self._replicas and self._scale_asked_at is None:
            self._scale_asked_at = time.monotonic()
        elif replicas <= self._replicas:
            self._scale_asked_at = None
        # Replicas on quarantined nodes take no renders: the work needs as many besides them.
        if replicas:
            replicas += self._fenced_replicas
        publish_wanted(self.app_name, self.deployment, replicas)
        self._wanted = replicas


class SchedulerServer:
    async def __init__(self, config_json: str, engines: dict[str, DeploymentHandle]):
        self.config = FarmConfig.model_validate_json(config_json)
        tracing.configure(service_name="farm-scheduler", **self.config.tracing.model_dump())
        self.store = JobStore(self.config.store_url, migrate=self.config.store.migrate)
        self.metrics = ServeMetrics()
        if self.config.scheduler.metrics_port:
            self.metrics.serve_http(self.config.scheduler.metrics_host, self.config.scheduler.metrics_port)
        pools: dict[str, list[ServePool]] = {}
        for model in self.config.served_models():
            for pool in model.resolved_pools():
                handle = engines[f"{model.name}/{pool.device_kind}"]
                info = None
                if pool.min_replicas > 0 or pool.device_kind == "auto":
                    info = await handle.info.remote()
                device_kind = info["device_kind"] if pool.device_kind == "auto" else pool.device_kind
                # A device without a price is a start-up error, never a free render.
                self.config.prices.price_of(device_kind)
                pools.setdefault(model.name, []).append(
                    ServePool(model, pool, handle, device_kind, self.config.ray.app_name, info))
        owner = f"scheduler-{socket.gethostname()}-{os.getpid()}"
        self.scheduler = Scheduler(self.store, pools, self.config, owner, self.metrics, fence=ServeNodeFence())
        self.scheduler.start()
        self._drained: asyncio.Future | None = None
        log.info("scheduler %s started with pools %s", owner, [p.key for ps in pools.values() for p in ps])

    async def status(self) -> dict[str, Any]:
        return {
            "owner": self.scheduler.owner,
            "quarantined_nodes": self.scheduler.quarantine.active(),
            "running": {rid: r.claimed.attempt for rid, r in self.scheduler.running.items()},
            "pools": {p.key: {"replicas": p.slots, "fenced_replicas": p._fenced_replicas, "wanted": p._wanted,
                              "cold_start_s": p.cold_start_s,
                              "running": len(self.scheduler.running_on(p))} for p in self.scheduler.all_pools()},
        }

    async def drain(self) -> None:
        """Hands every render back to the queue and stops (see `Scheduler.drain`); once."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self.scheduler.drain(self.config.scheduler.stop_timeout_s))
        await asyncio.shield(self._drained)

    async def __del__(self):
        # Serve calls this as it stops the replica (the app deleted, the pod terminating).
        if hasattr(self, "scheduler"):  # the constructor may have failed
            await self.drain()
            await asyncio.to_thread(tracing.flush)


def drain_timeout_s(config: FarmConfig) -> float:
    """The longest a stopping scheduler takes: the drain's two rounds (checkpoint, then
    withdraw) and its store writes."""
    return 2 * config.scheduler.stop_timeout_s + 5


def scheduler_deployment(config: FarmConfig, engines: dict):
    return serve.deployment(SchedulerServer).options(
        name="scheduler",
        num_replicas=1,
        graceful_shutdown_timeout_s=drain_timeout_s(config),
        # It mostly waits on the store and on engines; reserving no CPU lets it start on
        # a node whose CPUs the engines have taken.
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False, "log_level": "INFO"},
    ).bind(config.model_dump_json(), engines)
