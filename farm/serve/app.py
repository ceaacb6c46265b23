"""Builds the Serve application from a FarmConfig: an engine deployment per model
pool, the post-processing deployment their replicas fan frames out to, and the
scheduler that feeds them."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from farm.config import FarmConfig, load_config


def build_app(args: FarmConfig | dict[str, Any] | None = None) -> Application:
    """`farm.serve:build_app`. A Serve config's `args` may hold `config_path` (a farm
    YAML file) and/or inline FarmConfig fields."""
    from farm.serve.render_replica import engine_deployment
    from farm.serve.postproc import postproc_deployment
    from farm.serve.scheduler import scheduler_deployment

    if isinstance(args, FarmConfig):
        config = args
    else:
        args = dict(args or {})
        config = load_config(args.pop("config_path", None), **args)
    # Every engine replica fans its frames out to the one post-processing deployment.
    postproc = postproc_deployment(config.postproc, tracing_config=config.tracing)
    # One engine deployment per pool: a model on one kind of device.
    engines = {
        f"{m.name}/{pool.device_kind}": engine_deployment(m, pool, config.artifacts_url,
                                                          config.scheduler.renders_per_replica, config.ray.app_name,
                                                          postproc, config.postproc, config.tracing)
        for m in config.served_models() for pool in m.resolved_pools()
    }
    return scheduler_deployment(config, engines)
