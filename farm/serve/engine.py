"""The engine deployment: one per served model, hosting its diffusers pipelines.

`render` is an async generator: it streams progress while the pipeline runs in a
worker thread, then encodes the MP4, writes it with its manifest, and ends with a
"done" event. When the caller cancels the request, Serve raises CancelledError here;
the stop flag makes the pipeline return at its next step boundary, before decoding."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from ray import serve

from farm.config import ModelConfig, PoolConfig
from farm.engines.base import ENCODING, WRITING, EngineRequest, Progress, RenderCancelled
from farm.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)
CPU = "CPU"
WAKE_INTERVAL_S = 0.025
GIL_SWITCH_INTERVAL_S = 0.02


def node_name() -> str:
    """Host name and Ray node id: several Ray nodes may share a host (and do in tests)."""
    try:
        import ray

        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # outside Ray
        return socket.gethostname()


def build_manifest(engine_info: dict, request: EngineRequest, timings: list, output_shape: tuple,
                   peak_memory_bytes: int | None, backend: str | None = None, notes: list[str] = ()) -> dict:
    """Everything needed to reproduce the render, and what it took."""
    spec = {
        "task": request.task.value, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "width": request.width, "height": request.height, "num_frames": request.num_frames, "fps": request.fps,
        "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "image_sha256": hashlib.sha256(request.image).hexdigest() if request.image else None,
    }
    return {
        "render_id": request.render_id,
        "attempt": request.attempt,
        "spec": spec,
        "seed": request.seed,
        "model": engine_info,
        # The backend that actually ran this render (an unbuilt shape falls back to eager).
        "backend": backend or engine_info.get("backend"),
        "notes": list(notes),
        "timings": [{"phase": p, "device_kind": k, "seconds": s} for p, k, s in timings],
        "output": {"frames": output_shape[0], "height": output_shape[1], "width": output_shape[2]},
        "peak_memory_bytes": peak_memory_bytes,
        "node": socket.gethostname(),
        "written_at": time.time(),
    }


class EngineServer:
    def __init__(self, model_json: str, artifacts_url: str):
        from farm.engines import load_engine

        started = time.perf_counter()
        self.model = ModelConfig.model_validate_json(model_json)
        self.node = node_name()
        # The pipeline thread is the replica's real work; Serve's own threads need the
        # GIL only briefly. A longer switch interval stops them from preempting the
        # pipeline's Python code every 5 ms (it matters when steps are milliseconds).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.engine = load_engine(self.model)
        self.artifacts = ArtifactStore(artifacts_url)
        # One render at a time per replica: a second request waits here, already
        # dispatched, so the engine starts it the moment the first one ends.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine", initializer=self._set_thread_count)
        # Model load and warm-up: the cold start autoscaling counts until it measures one.
        self.startup_seconds = time.perf_counter() - started
        log.info("engine %s ready on %s (%s) in %.1f s", self.model.name, self.engine.device_kind,
                 self.engine.backend, self.startup_seconds)

    def _set_thread_count(self) -> None:
        # OpenMP's thread count is per OS thread, and Ray starts workers with
        # OMP_NUM_THREADS=1: without this, torch in the render thread ran on one core.
        import torch

        torch.set_num_threads(self.engine.cpu_threads)

    def info(self) -> dict:
        return {**self.engine.describe(), "startup_seconds": self.startup_seconds, "node": self.node}

    def check_health(self) -> None:
        self.engine.check_health()

    async def render(self, request: EngineRequest):
        """Streams lists of events. The engine thread only appends to a deque and
        wakes this loop when it is not already awake: one wake-up and one stream item
        per batch, not per step, so the loop does not fight the engine for the GIL."""
        loop = asyncio.get_running_loop()
        pending: collections.deque = collections.deque()
        arrived = asyncio.Event()
        stop = threading.Event()

        last_wake = 0.0

        def emit(event: dict[str, Any]) -> None:
            nonlocal last_wake
            pending.append(event)
            # Steps shorter than WAKE_INTERVAL_S travel together; stage changes, results
            # and errors go at once.
            now = time.monotonic()
            urgent = event["kind"] != "progress" or not event.get("step")
            if (urgent or now - last_wake >= WAKE_INTERVAL_S) and not arrived.is_set():
                last_wake = now
                loop.call_soon_threadsafe(arrived.set)

        job = loop.run_in_executor(self._executor, self._render_blocking, request, emit, stop)
        try:
            finished = False
            while not finished:
                await arrived.wait()
                arrived.clear()
                batch = []
                while pending:
                    event = pending.popleft()
                    if event["kind"] == "error":
                        raise event["error"]
                    batch.append(event)
                    finished = finished or event["kind"] == "done"
                if batch:
                    yield batch
            await job
        except asyncio.CancelledError:
            stop.set()
            await asyncio.shield(job)
            raise

    def _render_blocking(self, request: EngineRequest, emit, stop: threading.Event) -> None:
        if stop.is_set():
            return
        device = self.engine.device_kind
        stage_started = {"stage": None, "at": time.perf_counter()}

        def on_progress(progress: Progress) -> None:
            event: dict[str, Any] = {"kind": "progress", "stage": progress.stage}
            if progress.step:
                event.update(step=progress.step, total_steps=progress.total_steps,
                             step_seconds=progress.step_seconds)
            elif progress.stage != stage_started["stage"]:
                # A stage change closes the previous phase; denoising is charged per step instead.
                now = time.perf_counter()
                previous = stage_started["stage"]
                if previous and previous != "DENOISING":
                    event["finished_phases"] = [(previous, device, now - stage_started["at"])]
                stage_started.update(stage=progress.stage, at=now)
                # Stage changes say where the render runs: the scheduler needs the node
                # to retry a failed render elsewhere and to count a node's failures.
                event["node"] = self.node
            emit(event)

        try:
            output = self.engine.render(request, on_progress, stop.is_set)
            emit({"kind": "progress", "stage": WRITING})
            from farm.postproc.encode import encode_mp4

            started = time.perf_counter()
            video = encode_mp4(output.frames, request.fps)
            encoded = time.perf_counter()
            timings = [(t.phase, t.device_kind, t.seconds) for t in output.timings]
            timings.append((ENCODING, CPU, encoded - started))
            manifest = build_manifest(self.engine.describe(), request, timings, output.frames.shape,
                                      output.peak_memory_bytes, output.backend, output.notes)
            artifact_uri, manifest_uri = self.artifacts.write(request.render_id, request.attempt, video, manifest)
            timings.append((WRITING, CPU, time.perf_counter() - encoded))
            emit({
                "kind": "done", "artifact_uri": artifact_uri, "manifest_uri": manifest_uri, "timings": timings,
                "device_kind": device, "node": self.node, "frames": int(output.frames.shape[0]),
            })
        except RenderCancelled as cancelled:
            log.info("render %s cancelled after step %d", request.render_id, cancelled.step)
            emit({"kind": "error", "error": cancelled})
        except BaseException as error:  # handed to the caller through the stream
            emit({"kind": "error", "error": error})


def deployment_name(model: ModelConfig, pool: PoolConfig) -> str:
    """engine-<model> for a model's implicit single pool; engine-<model>-<kind> per explicit pool."""
    return f"engine-{model.name}-{pool.device_kind.lower()}" if model.explicit_pools else f"engine-{model.name}"


def pool_model(model: ModelConfig, pool: PoolConfig) -> ModelConfig:
    """The model config an engine of this pool loads: its device kind, GPUs and CPUs."""
    kind = None if pool.device_kind == "auto" else pool.device_kind
    return model.model_copy(update={"device_kind": kind, "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus})


def engine_deployment(model: ModelConfig, pool: PoolConfig, artifacts_url: str, prefetch: int, app_name: str):
    options: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if not pool.num_gpus:
        # Ray sets OMP_NUM_THREADS to the actor's CPU count (1), which caps torch's
        # OpenMP threads in every thread but the first; a CPU engine uses its cores.
        threads = model.cpu_threads or os.cpu_count() or 1
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
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
    return serve.deployment(EngineServer).options(
        name=name,
        **scaling,
        # Room for the renders the scheduler prefetches, plus health and info calls.
        max_ongoing_requests=2 + prefetch,
        ray_actor_options=options,
        health_check_period_s=10,
        # A replica that Serve scales away first finishes the renders it holds.
        graceful_shutdown_timeout_s=pool.drain_timeout_s,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    ).bind(pool_model(model, pool).model_dump_json(), artifacts_url)
