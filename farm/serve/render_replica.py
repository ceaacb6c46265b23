"""The render replica: the Serve deployment of one model's engine on one pool, a shim
over `farm.render.attempt.AttemptRunner`.

What is Ray's stays here: the engine is loaded in the replica's render thread, the
attempt gets Serve's collaborators (the post-processing deployment's chunk runner, the
preemption flags and drill holds in Ray's key-value store, this node's name), the chaos
variables are read from the environment, and the deployment's options, autoscaling and
router are set. `render` yields the attempt's event lists as they come. When the caller
cancels the request, Serve raises CancelledError in the attempt, which stops the engine
at its next step boundary."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import sys
import time
from typing import Any

from ray import serve

from farm import tracing
from farm.config import ModelConfig, PoolConfig, PostprocConfig, TracingConfig
from farm.domain.engine import EngineRequest
from farm.render.attempt import AttemptRunner
from farm.render.render_thread import FAIL_AT_STEP_ENV
from farm.serve.allocator import allocator_env
from farm.serve.flags import HOLDS_ENV, KVPreemption, RenderHolds
from farm.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.02


def node_name() -> str:
    """Host name and Ray node id: several Ray nodes may share a host (and do in tests)."""
    try:
        import ray

        if ray.is_initialized():  # asking the runtime context outside Ray would start a cluster
            return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # the node id is a nicety of the name
        pass
    return socket.gethostname()


def threads_beside_postprocessing(engine, model: ModelConfig, postproc: PostprocConfig) -> int | None:
    """CPU threads of a render that starts while another render of the replica is being
    post-processed (None: the engine's). Its chunks then run on the same cores: an
    engine team as wide as the node would lose a thread to them at every barrier of
    every step, so the engine leaves them their threads."""
    if engine.device.type != "cpu":
        return None
    if model.cpu_threads_beside_postprocessing:
        return model.cpu_threads_beside_postprocessing
    return max(1, engine.cpu_threads - postproc.replicas * postproc.threads)


class RenderReplica:
    def __init__(self, model_json: str, artifacts_url: str, postproc=None, postproc_json: str | None = None,
                 tracing_json: str | None = None):
        from farm.engines import load_engine
        from farm.postproc.pipeline import LocalChunkRunner
        from farm.serve.postproc import ServeChunkRunner

        started = time.perf_counter()
        self.model = ModelConfig.model_validate_json(model_json)
        self.node = node_name()
        if tracing_json:
            tracing.configure(service_name="farm-engine", resource={"farm.model": self.model.name},
                              **TracingConfig.model_validate_json(tracing_json).model_dump())
        fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
        if fail_at_step:
            log.warning("chaos drill: this replica fails every render at step %d (%s)", fail_at_step,
                        FAIL_AT_STEP_ENV)
        holds = RenderHolds(self.model.name, self.model.device_kind, self.node) \
            if os.environ.get(HOLDS_ENV) == "1" else None
        # The render thread is the replica's real work; Serve's own threads need the
        # GIL only briefly. A longer switch interval stops them from preempting the
        # pipeline's Python code every 5 ms (it matters when steps are milliseconds).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # The render thread loads the model too, so it is the only thread here that runs
        # OpenMP work. libgomp gives each such thread a team of its own, and once the
        # teams hold more threads than there are cores its waiting threads stop spinning,
        # which slows the engine's decoding.
        self.engine = executor.submit(load_engine, self.model).result()
        # Post-processing: the deployment's handle when the app has one; else (a replica
        # built on its own) chunks run in a thread here.
        postproc_config = (PostprocConfig.model_validate_json(postproc_json) if postproc_json
                           else PostprocConfig())
        chunks = (ServeChunkRunner(postproc, postproc_config.chunk_retries) if postproc is not None
                  else LocalChunkRunner(workers=1))
        self.attempts = AttemptRunner(
            self.engine, chunks, ArtifactStore(artifacts_url), KVPreemption(), postproc=postproc_config,
            holds=holds, executor=executor, node=self.node, fail_at_step=fail_at_step,
            threads_beside_postprocessing=threads_beside_postprocessing(self.engine, self.model, postproc_config))
        # Model load and warm-up: the cold start autoscaling counts until it measures one.
        self.startup_seconds = time.perf_counter() - started
        log.info("engine %s ready on %s (%s) in %.1f s", self.model.name, self.engine.device_kind,
                 self.engine.backend, self.startup_seconds)

    def info(self) -> dict:
        return {**self.engine.describe(), "startup_seconds": self.startup_seconds, "node": self.node}

    def check_health(self) -> None:
        self.engine.check_health()

    async def render(self, request: EngineRequest):
        """The attempt's event lists (`farm.domain.events`), as they come."""
        async for batch in self.attempts.run(request):
            yield batch

    def __del__(self) -> None:
        # Serve calls it when it stops the replica: a context-parallel engine's worker
        # processes (one per extra device) go with it.
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()


def deployment_name(model: ModelConfig, pool: PoolConfig) -> str:
    """engine-<model> for a model's implicit single pool; engine-<model>-<kind> per explicit pool."""
    return f"engine-{model.name}-{pool.device_kind.lower()}" if model.explicit_pools else f"engine-{model.name}"


def pool_model(model: ModelConfig, pool: PoolConfig) -> ModelConfig:
    """The model config an engine of this pool loads: its device kind, GPUs and CPUs."""
    kind = None if pool.device_kind == "auto" else pool.device_kind
    return model.model_copy(update={"device_kind": kind, "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus})


def engine_deployment(model: ModelConfig, pool: PoolConfig, artifacts_url: str, renders_per_replica: int,
                      app_name: str, postproc=None, postproc_config: PostprocConfig | None = None,
                      tracing_config: TracingConfig | None = None):
    """postproc: the post-processing deployment (bound), whose handle the replicas get."""
    options: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if not pool.num_gpus:
        # Ray sets OMP_NUM_THREADS to the actor's CPU count (1), which caps torch's
        # OpenMP threads in every thread but the first; a CPU engine uses its cores.
        threads = model.cpu_threads or os.cpu_count() or 1
        # OpenMP's default waits (a short spin, then sleep): post-processing replicas on
        # the same cores run at a lower priority (postproc.niceness), so a spinning
        # engine thread's sibling is not descheduled for them; passive waits cost the
        # engine denoising time, idle or not. Activations are freed into the heap for
        # the next layer, not to the kernel (farm.serve.allocator).
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads), **allocator_env()}}
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    if pool.ray_accelerator_type:
        # Ray's convention: a node with that accelerator offers accelerator_type:<type> = 1;
        # asking a sliver of it pins the replica to such a node without limiting how many fit.
        options["resources"] = {f"accelerator_type:{pool.ray_accelerator_type}": 0.001}
    name = deployment_name(model, pool)
    scaling: dict[str, Any] = {"num_replicas": pool.max_replicas}
    if pool.min_replicas != pool.max_replicas:
        from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

        from farm.serve.autoscaling import BacklogPolicy

        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=pool.min_replicas, max_replicas=pool.max_replicas, initial_replicas=pool.min_replicas,
            upscale_delay_s=0, downscale_delay_s=pool.downscale_delay_s,
            downscale_to_zero_delay_s=pool.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function=BacklogPolicy,
                                     policy_kwargs={"app": app_name, "deployment": name}),
        )}
    from ray.serve.config import RequestRouterConfig

    return serve.deployment(RenderReplica).options(
        name=name,
        **scaling,
        # Least loaded of all replicas, none on a quarantined node (farm.serve.routing).
        request_router_config=RequestRouterConfig(request_router_class="farm.serve.routing:EngineRouter"),
        # Room for every render the scheduler may leave with a replica (rendering,
        # prefetched, post-processing), plus health and info calls.
        max_ongoing_requests=renders_per_replica + 1,
        ray_actor_options=options,
        health_check_period_s=10,
        # A replica that Serve scales away first finishes the renders it holds.
        graceful_shutdown_timeout_s=pool.drain_timeout_s,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    ).bind(pool_model(model, pool).model_dump_json(), artifacts_url, postproc,
           postproc_config.model_dump_json() if postproc_config else None,
           tracing_config.model_dump_json() if tracing_config and tracing_config.otlp_endpoint else None)
