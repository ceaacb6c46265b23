"""The post-processing deployment: replicas that each run one chunk of a clip at a
time (interpolation, upscaling, color, quality measurements, segment encoding), and
the runner an engine replica uses to fan a clip's chunks out to them.

A replica is single-threaded by default (OpenCV and x264 at `postproc.num_cpus`
threads, 1), so a node's post-processing scales by adding replicas, one per core.
Frames travel through Ray's object store: the engine replica puts each chunk once
(`ServeChunkRunner.put`) and a replica reads its chunk from there (zero-copy on the
same node). A chunk whose replica dies is sent again, and Serve routes it to a live
replica; the render itself goes on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
from typing import Any

from ray import serve

from farm import tracing
from farm.config import PostprocConfig, TracingConfig
from farm.postproc.chunks import Chunk
from farm.postproc.pipeline import (
    CPU,
    ChunkResult,
    ChunkWork,
    StatisticsResult,
    chunk_statistics,
    device_seconds_by_phase,
    process_chunk,
    warm_up,
)
from farm.serve.allocator import allocator_env
from farm.serve.flags import HOLDS_ENV

log = logging.getLogger(__name__)
DEPLOYMENT_NAME = "postproc"
# Waits before sending a chunk again after its replica died: Serve needs a moment to
# notice the death and stop routing to that replica.
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


def is_replica_loss(error: BaseException) -> bool:
    """Ray's ways of saying a replica (or its node) is gone, as opposed to the work failing."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    return isinstance(error, lost) or type(error).__name__ in {"ActorDiedError", "ActorUnavailableError"}


def lower_priority(niceness: int) -> None:
    """Lowers every thread of this process to `niceness` (never raises a priority: that
    needs privileges, and a worker Ray started nicer stays so). Linux's nice is per
    thread, and Ray's threads already run, so each one is set; threads started later
    inherit it."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # no /proc: this thread, the one that does the work
    for tid in threads:
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            if niceness > current:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:
            pass  # the thread ended meanwhile


class PostprocServer:
    def __init__(self, config_json: str, tracing_json: str | None = None):
        import cv2

        self.config = PostprocConfig.model_validate_json(config_json)
        if tracing_json:
            tracing.configure(service_name="farm-postproc",
                              **TracingConfig.model_validate_json(tracing_json).model_dump())
        lower_priority(self.config.niceness)
        threads = self.config.threads
        # OpenCV's thread pool is per process: one replica, its own cores, no more.
        cv2.setNumThreads(threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="postproc")
        self.device_kind = self.config.device_kind or (CPU if not self.config.num_gpus else _gpu_kind())
        # Device-seconds per second of work: the cores (CPU) or GPUs the replica holds.
        self.scale = self.config.num_cpus if self.device_kind == CPU else (self.config.num_gpus or 1.0)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.holds_enabled = os.environ.get(HOLDS_ENV) == "1"
        self.upscaler = self.interpolator = None
        if self.config.upscaler_weights:
            from farm.postproc.upscale import LearnedUpscaler

            self.upscaler = LearnedUpscaler.from_file(self.config.upscaler_weights, tile=self.config.upscaler_tile)
        if self.config.interpolator_weights:
            from farm.postproc.interpolate import LearnedInterpolator

            self.interpolator = LearnedInterpolator.from_file(self.config.interpolator_weights)
        if self.upscaler is not None or self.interpolator is not None:
            import torch

            torch.set_num_threads(threads)
        warmed = warm_up(threads)
        log.info("post-processing replica %s ready (%s, %d threads, warmed up in %.2f s)", self.name,
                 self.device_kind, threads, warmed)

    async def statistics(self, frames_ref: list, chunk: Chunk, index: int,
                         trace_parent: str | None = None) -> StatisticsResult:
        frames = await frames_ref[0]
        loop = asyncio.get_running_loop()
        with self._span(f"postproc statistics {index}", trace_parent):
            result = await loop.run_in_executor(self._executor, chunk_statistics, frames, chunk, index)
        result.device_kind, result.device_seconds, result.worker = self.device_kind, result.seconds * self.scale, self.name
        return result

    async def process(self, frames_ref: list, chunk: Chunk, work: ChunkWork, index: int,
                      trace_parent: str | None = None) -> ChunkResult:
        # frames_ref is [ObjectRef]: nested, so Ray hands the reference over unresolved
        # and the frames are read here, in the replica, from the object store.
        frames = await frames_ref[0]
        loop = asyncio.get_running_loop()
        work = _with_threads(work, self.config.threads)
        if self.holds_enabled:
            await loop.run_in_executor(self._executor, self._take_hold)
        with self._span(f"postproc chunk {index}", trace_parent, frames=len(frames)):
            result = await loop.run_in_executor(
                self._executor,
                lambda: process_chunk(frames, chunk, work, index, upscaler=self.upscaler,
                                      interpolator=self.interpolator))
        result.device_kind, result.worker = self.device_kind, self.name
        result.device_seconds = device_seconds_by_phase(result.seconds, self.scale)
        return result

    def _span(self, name: str, trace_parent: str | None, **attributes):
        """A chunk's span, under the render's post-processing span (none without one)."""
        if not trace_parent:
            return contextlib.nullcontext()
        return tracing.span(name, trace_parent, attributes={"farm.worker": self.name, **attributes})

    def _take_hold(self) -> None:
        """A drill's hold on the next chunk: waits until released (or this replica is killed)."""
        from farm.serve.flags import Hold

        try:
            hold = Hold.claim_chunk(self.name)
        except Exception as error:  # noqa: BLE001 - a drill must not fail the chunk
            log.warning("cannot look for a drill's hold: %s", error)
            return
        if hold is not None:
            log.info("chunk held by a drill (%s)", hold.wait())

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        return None


def _with_threads(work: ChunkWork, threads: int) -> ChunkWork:
    import dataclasses

    return work if work.threads == threads else dataclasses.replace(work, threads=threads)


def _gpu_kind() -> str:
    import torch

    from farm.engines.pipeline_engine import detect_device_kind

    return detect_device_kind(torch.device("cuda"))


class ServeChunkRunner:
    """Fans chunks out to the post-processing deployment (see farm.postproc.pipeline.ChunkRunner)."""

    def __init__(self, handle, retries: int):
        self.handle = handle
        self.retries = retries

    async def put(self, frames) -> list:
        import ray

        # In a list, so that the reference reaches the replica unresolved.
        return [await asyncio.to_thread(ray.put, frames)]

    async def _call(self, method: str, *args: Any):
        # The render's post-processing span, when the chunk is part of one (tracing on).
        trace = {"trace_parent": parent} if (parent := tracing.current_traceparent()) else {}
        for attempt in range(self.retries + 1):
            try:
                result = await getattr(self.handle, method).remote(*args, **trace)
            except Exception as error:
                if not is_replica_loss(error) or attempt == self.retries:
                    raise
                log.warning("post-processing replica lost during %s of chunk %s (%s); sending it again",
                            method, args[-1], type(error).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
                continue
            result.retries = attempt
            return result
        raise AssertionError("unreachable")

    async def statistics(self, frames_ref: list, chunk: Chunk, index: int) -> StatisticsResult:
        return await self._call("statistics", frames_ref, chunk, index)

    async def process(self, frames_ref: list, chunk: Chunk, work: ChunkWork, index: int) -> ChunkResult:
        return await self._call("process", frames_ref, chunk, work, index)


def postproc_deployment(config: PostprocConfig, name: str = DEPLOYMENT_NAME,
                        tracing_config: TracingConfig | None = None):
    options: dict[str, Any] = {"num_cpus": config.num_cpus}
    if config.num_gpus:
        options["num_gpus"] = config.num_gpus
    # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch (learned models) and numpy follow it.
    # Every chunk's frames are large allocations: keep them for the next chunk (farm.serve.allocator).
    options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(config.threads), **allocator_env()}}
    scaling: dict[str, Any] = {"num_replicas": config.replicas}
    if config.max_replicas is not None and config.max_replicas > config.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": config.replicas, "max_replicas": config.max_replicas,
            # A replica works on one chunk at a time: more than one waiting means too few replicas.
            "target_ongoing_requests": 1,
        }}
    from ray.serve.config import RequestRouterConfig

    return serve.deployment(PostprocServer).options(
        name=name,
        # A clip's chunks in turn over the replicas (farm.serve.routing).
        request_router_config=RequestRouterConfig(request_router_class="farm.serve.routing:ChunkRouter"),
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=options,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=30,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        **scaling,
    ).bind(config.model_dump_json(),
           tracing_config.model_dump_json() if tracing_config and tracing_config.otlp_endpoint else None)
