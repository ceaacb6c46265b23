"""The farm on one machine: a local (or given) Ray cluster with the Serve
application, and the gateway in this process. `farm serve` runs this."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from pathlib import Path

from farm.config import FarmConfig

log = logging.getLogger(__name__)
# Ray's socket paths must stay under ~107 bytes, so a deep FARM_HOME keeps Ray's default.
MAX_RAY_TEMP_DIR = 60
# Ray and Serve defaults tuned for a farm whose engines share the node's CPUs: wake
# the engine replicas (and their GIL) less often for bookkeeping.
QUIET_RAY_ENV = {
    # Ray starts workers at nice 15; an engine is the product and must not yield the
    # CPU to the gateway or to clients on the same machine.
    "RAY_worker_niceness": "0",
    # Serve exports replica metrics every 100 ms and runs its control loop at 10 Hz;
    # farm's own metrics come from the scheduler.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def prepare_home(config: FarmConfig) -> None:
    for path in (config.home, config.logs_dir, config.keys_dir):
        path.mkdir(parents=True, exist_ok=True)
    if config.models is None:
        from farm.engines.tiny import make_tiny_models

        make_tiny_models(config.models_dir)


def start_inference_plane(config: FarmConfig) -> None:
    """Starts (or joins) Ray and deploys the Serve application; returns once every
    engine has loaded its model."""
    import ray
    from ray import serve

    from farm.serve import build_app

    if not ray.is_initialized():
        temp_dir = config.home / "ray"
        num_cpus = config.ray.num_cpus
        if num_cpus is None and config.ray.address is None:
            # Logical CPUs: enough for every replica even on a small machine; the
            # engines share the real cores through their torch threads.
            wanted = sum(m.num_cpus * m.replicas for m in config.served_models())
            # ... and for every post-processing replica.
            wanted += config.postproc.num_cpus * max(config.postproc.replicas, config.postproc.max_replicas or 0)
            num_cpus = max(os.cpu_count() or 1, math.ceil(wanted))
            # Workers inherit this process's environment, so these reach every replica.
            for name, value in QUIET_RAY_ENV.items():
                os.environ.setdefault(name, value)
        ray.init(
            address=config.ray.address,
            num_cpus=num_cpus if config.ray.address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            _temp_dir=str(temp_dir) if config.ray.address is None and len(str(temp_dir)) < MAX_RAY_TEMP_DIR else None,
            runtime_env={"env_vars": {"FARM_HOME": str(config.home)}},
        )
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
    serve.run(build_app(config), name=config.ray.app_name, route_prefix=None, blocking=False)


def stop_inference_plane(config: FarmConfig) -> None:
    """Hands the scheduler's renders back to the queue (their engines still up to
    checkpoint them), then deletes the application and stops Ray."""
    import ray
    from ray import serve

    from farm.serve.scheduler import drain_timeout_s

    try:
        try:
            serve.get_deployment_handle("scheduler", app_name=config.ray.app_name).drain.remote().result(
                timeout_s=drain_timeout_s(config))
        except Exception as error:  # noqa: BLE001 - stopping goes on; leases expire and requeue the renders
            log.warning("the scheduler did not hand its renders back: %s", error)
        serve.delete(config.ray.app_name)
        serve.shutdown()
    finally:
        ray.shutdown()


def run_embedded(config: FarmConfig, ready_file: Path | None = None) -> None:
    from farm.api.server import run_gateway

    prepare_home(config)
    start_inference_plane(config)
    try:
        asyncio.run(run_gateway(config, ready_file))
    finally:
        stop_inference_plane(config)
