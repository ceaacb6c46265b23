"""The scheduler deployment: a single replica running `farm.jobs.scheduler.Scheduler`
over Serve handles of the engine deployments."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from farm.config import FarmConfig
from farm.engines.base import EngineRequest
from farm.errors import EngineLost
from farm.jobs.scheduler import Scheduler
from farm.jobs.store import JobStore
from farm.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


def _is_engine_loss(error: BaseException) -> bool:
    """Ray's ways of saying the replica (or its node) is gone, as opposed to the
    render itself failing."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    return isinstance(error, lost) or type(error).__name__ in {"ActorDiedError", "ActorUnavailableError"}


class _ServeStream:
    def __init__(self, handle: DeploymentHandle, request: EngineRequest):
        self._response = handle.options(stream=True).render.remote(request)

    async def __aiter__(self):
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


class ServePool:
    def __init__(self, model: str, handle: DeploymentHandle, replicas: int, device_kind: str):
        self.model, self.handle, self.replicas, self.device_kind = model, handle, replicas, device_kind

    @property
    def slots(self) -> int:
        return self.replicas

    def render(self, request: EngineRequest) -> _ServeStream:
        return _ServeStream(self.handle, request)


class SchedulerServer:
    async def __init__(self, config_json: str, engines: dict[str, DeploymentHandle]):
        self.config = FarmConfig.model_validate_json(config_json)
        self.store = JobStore(self.config.store_url, migrate=self.config.store.migrate)
        self.metrics = ServeMetrics()
        if self.config.scheduler.metrics_port:
            self.metrics.serve_http(self.config.scheduler.metrics_host, self.config.scheduler.metrics_port)
        pools = {}
        for model in self.config.served_models():
            info = await engines[model.name].info.remote()
            # A device without a price is a start-up error, never a free render.
            self.config.prices.price_of(info["device_kind"])
            pools[model.name] = ServePool(model.name, engines[model.name], model.replicas, info["device_kind"])
        owner = f"scheduler-{socket.gethostname()}-{os.getpid()}"
        self.scheduler = Scheduler(self.store, pools, self.config, owner, self.metrics)
        self.scheduler.start()
        log.info("scheduler %s started with pools %s", owner, sorted(pools))

    async def status(self) -> dict[str, Any]:
        return {
            "owner": self.scheduler.owner,
            "running": {rid: r.claimed.attempt for rid, r in self.scheduler.running.items()},
        }

    async def __del__(self):
        if hasattr(self, "scheduler"):  # the constructor may have failed
            await self.scheduler.stop()


def scheduler_deployment(config: FarmConfig, engines: dict):
    return serve.deployment(SchedulerServer).options(
        name="scheduler",
        num_replicas=1,
        # It mostly waits on the store and on engines; reserving no CPU lets it start on
        # a node whose CPUs the engines have taken.
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False, "log_level": "INFO"},
    ).bind(config.model_dump_json(), engines)
