"""The engine deployment: one per served model, hosting its diffusers pipelines.

`render` is an async generator: it streams progress while the pipeline runs in the
replica's single render thread (every candidate seed of the render, one after the
other), then post-processes the frames in the replica's event loop, fanning chunks
out to the post-processing deployment, writes the MP4 with its manifest, and ends
with a "done" event. The render thread is free as soon as the frames exist, so the
next render queued on the replica starts while this one is post-processed (on a CPU
engine, on the threads post-processing leaves it: `_render_threads`). When the
caller cancels the request, Serve raises CancelledError here; the stop flag makes the
pipeline return at its next step boundary, before decoding.

Preemption: the scheduler raises a flag for the attempt (`farm.serve.flags`); while
the render's first candidate (its own seed) denoises, a thread of the replica looks for
the flag every PREEMPT_CHECK_INTERVAL_S and the engine asks that thread at step
boundaries and between an eager transformer's layers; when it is up, it stops with a
denoising checkpoint, which is written to the artifact store; the stream then ends
normally with a "preempted" event instead of "done". A request with `resume_from`
resumes that candidate from the checkpoint; a checkpoint that cannot be read or does not
fit the request is logged, noted in the manifest, and the candidate runs from step 0
instead (same seed, so the same video; only the checkpointed steps' time is lost). Later
candidates and quality retries are not preemptible: a checkpoint there would lose the
candidates already rendered."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ray import serve

from farm.config import ModelConfig, PoolConfig, PostprocConfig
from farm.domain.engine import (
    CheckpointError,
    DenoiseCheckpoint,
    EngineRequest,
    Progress,
    RenderCancelled,
    RenderOutput,
    RenderPreempted,
)
from farm.domain.errors import RenderRejected
from farm.domain.spec import MAX_SEED, ResolvedPostprocess
from farm.domain.states import Stage
from farm.postproc.quality import gate_failures
from farm.serve.allocator import allocator_env
from farm.serve.flags import HOLDS_ENV
from farm.storage.artifacts import ArtifactStore

if TYPE_CHECKING:
    from farm.serve.flags import Hold

log = logging.getLogger(__name__)
CPU = "CPU"
# Progress reaches the store in batches (scheduler.event_flush_interval_s, 0.1 s by
# default); waking the event loop more often than that only takes CPU from the engine.
WAKE_INTERVAL_S = 0.1
GIL_SWITCH_INTERVAL_S = 0.02
# Chaos drills: a node started with this variable set fails every render there at that
# denoising step, as a node with a bad GPU would (see the README's "Faults").
FAIL_AT_STEP_ENV = "FARM_CHAOS_FAIL_AT_STEP"


class InjectedFault(RuntimeError):
    """A failure the node was told to inject (FARM_CHAOS_FAIL_AT_STEP)."""


# The preemption flag is a GCS read, made this often while a preemptible render denoises:
# an urgent render waits at most this (and a layer) longer for its engine.
PREEMPT_CHECK_INTERVAL_S = 0.1


def node_name() -> str:
    """Host name and Ray node id: several Ray nodes may share a host (and do in tests)."""
    try:
        import ray

        if ray.is_initialized():  # asking the runtime context outside Ray would start a cluster
            return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # the node id is a nicety of the name
        pass
    return socket.gethostname()


class QualityRejected(RenderRejected):
    """The delivered clip crossed the quality gate of `postproc.quality` (action fail,
    or retry with every retry used)."""


def build_manifest(engine_info: dict, request: EngineRequest, timings: list, output_shape: tuple,
                   peak_memory_bytes: int | None, backend: str | None = None, notes: list[str] = (),
                   postprocess: dict | None = None, cpu_threads: int | None = None) -> dict:
    """Everything needed to reproduce the render, and what it took. output_shape is the
    delivered clip's (frames, height, width); postprocess, what post-processing did."""
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
        # A CPU render's thread count (it can change the last bits of the frames).
        "cpu_threads": cpu_threads,
        "notes": list(notes),
        "timings": [{"phase": p, "device_kind": k, "seconds": s} for p, k, s in timings],
        "output": {"frames": output_shape[0], "height": output_shape[1], "width": output_shape[2]},
        "peak_memory_bytes": peak_memory_bytes,
        "estimated_memory_bytes": request.estimated_memory_bytes,
        "node": socket.gethostname(),
        "written_at": time.time(),
        "postprocess": postprocess,
    }


def candidate_seed(seed: int, index: int) -> int:
    """Candidate `index` of a render renders seed + index (wrapping within the seed range)."""
    return (seed + index) % (MAX_SEED + 1)


@dataclasses.dataclass
class _Candidate:
    seed: int
    output: RenderOutput
    scoring: asyncio.Task | None = None


class EngineServer:
    def __init__(self, model_json: str, artifacts_url: str, postproc=None, postproc_json: str | None = None):
        from farm.engines import load_engine
        from farm.postproc.pipeline import LocalChunkRunner
        from farm.serve.postproc import ServeChunkRunner

        started = time.perf_counter()
        self.model = ModelConfig.model_validate_json(model_json)
        self.node = node_name()
        self.fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
        if self.fail_at_step:
            log.warning("chaos drill: this replica fails every render at step %d (%s)", self.fail_at_step,
                        FAIL_AT_STEP_ENV)
        self.holds_enabled = os.environ.get(HOLDS_ENV) == "1"
        # The pipeline thread is the replica's real work; Serve's own threads need the
        # GIL only briefly. A longer switch interval stops them from preempting the
        # pipeline's Python code every 5 ms (it matters when steps are milliseconds).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # One render at a time per replica: a second request waits here, already
        # dispatched, so the engine starts it the moment the first one ends.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # The render thread loads the model too, so it is the only thread here that runs
        # OpenMP work. libgomp gives each such thread a team of its own, and once the
        # teams hold more threads than there are cores its waiting threads stop spinning:
        # a model loaded in this thread cost the tiny engine's decoding about 40 ms a render.
        self.engine = self._executor.submit(load_engine, self.model).result()
        self.artifacts = ArtifactStore(artifacts_url)
        # Post-processing: the deployment's handle when the app has one; else (a replica
        # built on its own) chunks run in a thread here.
        self.postproc_config = (PostprocConfig.model_validate_json(postproc_json) if postproc_json
                                else PostprocConfig())
        self.chunks = (ServeChunkRunner(postproc, self.postproc_config.chunk_retries) if postproc is not None
                       else LocalChunkRunner(workers=1))
        # Renders of this replica past its engine and not yet written (the render thread
        # adds one as it hands it over; the event loop removes it at the end).
        self._postprocessing: set[str] = set()
        # Model load and warm-up: the cold start autoscaling counts until it measures one.
        self.startup_seconds = time.perf_counter() - started
        log.info("engine %s ready on %s (%s) in %.1f s", self.model.name, self.engine.device_kind,
                 self.engine.backend, self.startup_seconds)

    def _render_threads(self) -> int | None:
        """CPU threads for the render starting now (None: the model's). While a render of
        this replica is being post-processed, its chunks run on the same cores: an engine
        team as wide as the node would then lose a thread to them at every barrier of
        every step, so the engine leaves them their threads."""
        if self.engine.device.type != "cpu" or not self._postprocessing:
            return None
        if self.model.cpu_threads_beside_postprocessing:
            return self.model.cpu_threads_beside_postprocessing
        post_threads = self.postproc_config.replicas * self.postproc_config.threads
        return max(1, self.engine.cpu_threads - post_threads)

    def info(self) -> dict:
        return {**self.engine.describe(), "startup_seconds": self.startup_seconds, "node": self.node}

    def check_health(self) -> None:
        self.engine.check_health()

    async def render(self, request: EngineRequest):
        """Streams lists of events: progress of every candidate, post-processing, writing,
        and at last "done" (see `_finish`). The render thread renders the candidates;
        everything after runs in this replica's event loop."""
        post = request.postprocess or ResolvedPostprocess()
        gate = self.postproc_config.quality
        steps = request.num_inference_steps
        stop = threading.Event()
        jobs: list[asyncio.Future] = []
        candidates: list[_Candidate] = []
        clip_timings: list[tuple[str, str, float]] = []
        retries: list[dict] = []
        try:
            seeds = [candidate_seed(request.seed, index) for index in range(post.candidates)]

            def arrived(candidate: _Candidate) -> None:
                # Several candidates: score each one while the next renders.
                if post.candidates > 1:
                    candidate.scoring = asyncio.ensure_future(self._score(candidate.output))
                candidates.append(candidate)

            preempted = False
            async for batch in self._run_engine(request, seeds, 0, len(seeds) * steps, stop, jobs, arrived):
                preempted = preempted or any(event["kind"] == "preempted" for event in batch)
                yield batch
            if preempted:
                return  # the attempt ends with its checkpoint; the scheduler queues the render again
            chosen, scored = await self._choose(candidates)
            while True:
                yield [{"kind": "progress", "stage": Stage.POSTPROCESSING}]
                stored = chosen.scoring.result()[0] if chosen.scoring else None
                clip = await self._postprocess(request, post, chosen.output, stored)
                clip_timings += clip.timings
                failures = gate_failures(clip.quality, gate)
                if not failures:
                    break
                used = len(candidates)
                if gate.action == "retry" and len(retries) < gate.max_retries:
                    retries.append({"seed": chosen.seed, "issues": failures})
                    log.info("render %s: seed %d crossed the quality gate (%s); rendering seed %d",
                             request.render_id, chosen.seed, "; ".join(failures), candidate_seed(request.seed, used))
                    retry = [candidate_seed(request.seed, used)]
                    self._postprocessing.discard(request.render_id)  # back in the engine
                    async for batch in self._run_engine(request, retry, used * steps, (used + 1) * steps, stop,
                                                        jobs, candidates.append):
                        yield batch
                    chosen = candidates[-1]
                    continue
                # Charge what ran; then fail the render with the scores.
                yield [{"kind": "progress", "stage": Stage.POSTPROCESSING, "finished_phases": list(clip_timings)}]
                tried = f" after {len(retries)} retries with new seeds" if retries else ""
                raise QualityRejected(f"quality below the farm's thresholds{tried}: {'; '.join(failures)}")
            yield [{"kind": "progress", "stage": Stage.WRITING}]
            yield [await self._finish(request, post, candidates, chosen, scored, clip, clip_timings, retries)]
        except asyncio.CancelledError:
            stop.set()
            for job in jobs:
                await asyncio.shield(job)
            raise
        finally:
            self._postprocessing.discard(request.render_id)
            for candidate in candidates:
                if candidate.scoring is not None and not candidate.scoring.done():
                    candidate.scoring.cancel()

    async def _run_engine(self, request: EngineRequest, seeds: list[int], first_step: int, total_steps: int,
                          stop: threading.Event, jobs: list, arrived):
        """Renders `seeds` in the render thread; yields progress batches and hands each
        candidate's output to `arrived` as it comes. The engine thread only appends to a
        deque and wakes this loop when it is not already awake: one wake-up and one stream
        item per batch, not per step, so the loop does not fight the engine for the GIL."""
        loop = asyncio.get_running_loop()
        pending: collections.deque = collections.deque()
        wake = asyncio.Event()
        last_wake = 0.0

        def emit(event: dict[str, Any]) -> None:
            nonlocal last_wake
            flush = event.pop("flush", False)
            pending.append(event)
            # Steps shorter than WAKE_INTERVAL_S travel together; stage changes, results,
            # errors and flushed steps go at once.
            now = time.monotonic()
            urgent = flush or event["kind"] != "progress" or not event.get("step")
            if (urgent or now - last_wake >= WAKE_INTERVAL_S) and not wake.is_set():
                last_wake = now
                loop.call_soon_threadsafe(wake.set)

        job = loop.run_in_executor(self._executor, self._render_blocking, request, emit, stop, seeds, first_step,
                                   total_steps)
        jobs.append(job)
        finished = False
        while not finished:
            await wake.wait()
            wake.clear()
            batch = []
            while pending:
                event = pending.popleft()
                if event["kind"] == "error":
                    raise event["error"]
                if event["kind"] == "candidate":
                    arrived(_Candidate(event["seed"], event["output"]))
                elif event["kind"] == "rendered":
                    finished = True
                else:
                    batch.append(event)
            if batch:
                yield batch
        await job

    async def _score(self, output: RenderOutput):
        """A candidate's frames stored for post-processing, its quality scores and what scoring cost."""
        from farm.postproc.pipeline import measure_clip, store_clip

        stored = await store_clip(output.frames, self.chunks, self.postproc_config.chunk_frames)
        scores, timings, _ = await measure_clip(stored, self.chunks)
        return stored, scores, timings

    async def _choose(self, candidates: list[_Candidate]):
        """The best-scoring candidate (the first one when there is only one) and every
        candidate's (scores, score)."""
        from farm.postproc.quality import overall_score

        if len(candidates) == 1:
            return candidates[0], []
        scored = []
        for candidate in candidates:
            _, scores, _ = await candidate.scoring
            scored.append((scores, overall_score(scores)))
        best = max(range(len(candidates)), key=lambda index: scored[index][1])
        return candidates[best], scored

    async def _postprocess(self, request: EngineRequest, post: ResolvedPostprocess, output: RenderOutput, stored):
        from farm.postproc.color import ColorStats
        from farm.postproc.pipeline import postprocess_clip, store_clip

        if stored is None:
            stored = await store_clip(output.frames, self.chunks, self.postproc_config.chunk_frames)
        color = post.color_reference
        return await postprocess_clip(
            stored, self.chunks, fps=request.fps, interpolation_factor=post.interpolation_factor,
            upscale_factor=post.upscale_factor,
            color_reference=ColorStats(mean=color.mean, std=color.std, pixels=1) if color else None,
            color_strength=color.strength if color else 1.0, crf=post.crf, bitrate_kbps=post.bitrate_kbps,
            preset=post.preset, threads=self.postproc_config.threads,
        )

    async def _finish(self, request, post, candidates, chosen, scored, clip, clip_timings, retries) -> dict:
        """Writes the MP4 and its manifest; returns the "done" event."""
        from farm.postproc.quality import summary

        timings = [(t.phase, t.device_kind, t.seconds) for c in candidates for t in c.output.timings]
        for candidate in candidates:
            if candidate.scoring is not None:
                timings += candidate.scoring.result()[2]
        timings += clip_timings
        reported = [
            {"seed": candidate.seed, "quality": summary(scores), "score": value, "chosen": candidate is chosen}
            for candidate, (scores, value) in zip(candidates, scored)
        ] or None
        report = {
            "spec": post.to_dict(),
            "output": {"frames": clip.num_frames, "height": clip.height, "width": clip.width, "fps": clip.fps},
            "chunk_frames": self.postproc_config.chunk_frames,
            **clip.report,
            "quality": clip.quality.to_dict(),
            "color_statistics": clip.statistics.to_dict() if clip.statistics else None,
            "candidates": reported,
            "quality_retries": retries,
        }
        output = chosen.output
        started = time.perf_counter()
        manifest = build_manifest(self.engine.describe(), dataclasses.replace(request, seed=chosen.seed), timings,
                                  (clip.num_frames, clip.height, clip.width), output.peak_memory_bytes,
                                  output.backend, output.notes, postprocess=report, cpu_threads=output.cpu_threads)
        artifact_uri, manifest_uri = await asyncio.to_thread(
            self.artifacts.write, request.render_id, request.attempt, clip.video, manifest)
        timings.append((Stage.WRITING, CPU, time.perf_counter() - started))
        return {
            "kind": "done", "artifact_uri": artifact_uri, "manifest_uri": manifest_uri, "timings": timings,
            "device_kind": self.engine.device_kind, "node": self.node, "frames": clip.num_frames,
            "quality": summary(clip.quality), "candidates": reported, "seed": chosen.seed,
        }

    def _render_blocking(self, request: EngineRequest, emit, stop: threading.Event, seeds: list[int] | None = None,
                         first_step: int = 0, total_steps: int | None = None) -> None:
        """Renders each seed in turn (the render thread); emits progress, a "candidate"
        event with each output, and "rendered" at the end. Steps count across seeds
        (first_step + 1 ... of total_steps), so progress only goes forward."""
        if stop.is_set():
            return
        seeds = seeds or [request.seed]
        steps = request.num_inference_steps
        total_steps = total_steps or len(seeds) * steps
        device = self.engine.device_kind
        threads = self._render_threads()
        stage_started = {"stage": None, "at": time.perf_counter()}
        offset = {"steps": first_step}
        hold = self._claim_hold(request) if first_step == 0 else None

        def on_progress(progress: Progress) -> None:
            if self.fail_at_step and progress.step == self.fail_at_step:
                raise InjectedFault(f"{FAIL_AT_STEP_ENV}={self.fail_at_step} on node {self.node}")
            event: dict[str, Any] = {"kind": "progress", "stage": progress.stage, "at": time.time()}
            if progress.step:
                event.update(step=offset["steps"] + progress.step, total_steps=total_steps,
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
            if hold is not None and progress.step == hold.step:
                event["flush"] = True  # at once: whoever holds the render waits to see this step
            emit(event)

        try:
            for index, seed in enumerate(seeds):
                offset["steps"] = first_step + index * steps
                candidate = request if seed == request.seed else dataclasses.replace(request, seed=seed)
                if first_step == 0 and index == 0:
                    output = self._render_preemptible(candidate, on_progress, stop, threads, hold)
                else:
                    output = self.engine.render(candidate, on_progress, stop.is_set, cpu_threads=threads)
                emit({"kind": "candidate", "seed": seed, "output": output})
            previous = stage_started["stage"]
            event: dict[str, Any] = {"kind": "progress", "stage": Stage.POSTPROCESSING, "node": self.node}
            if previous and previous != "DENOISING":
                event["finished_phases"] = [(previous, device, time.perf_counter() - stage_started["at"])]
            # Counted before "rendered" reaches the event loop: the next render may start
            # in this thread at once.
            self._postprocessing.add(request.render_id)
            emit(event)
            emit({"kind": "rendered"})
        except RenderPreempted as preempted:
            self._preempted(request, preempted, emit)
        except RenderCancelled as cancelled:
            log.info("render %s cancelled after step %d", request.render_id, cancelled.step)
            emit({"kind": "error", "error": cancelled})
        except BaseException as error:  # handed to the caller through the stream
            emit({"kind": "error", "error": error})


    # -- preemption (render thread) -------------------------------------------------------

    def _render_preemptible(self, request: EngineRequest, on_progress, stop: threading.Event,
                            threads: int | None, hold: Hold | None = None) -> RenderOutput:
        """The engine's render, preemptible, and resumed from `resume_from` when the request
        has one; a drill's `hold` stops it after a step until released, cancelled or preempted."""
        from farm.serve.flags import PreemptionWatch

        if not self.engine.supports_checkpoint:
            return self._render_resumed(request, held(on_progress, hold, stop.is_set), stop, None, threads)
        with PreemptionWatch(request.render_id, request.attempt, PREEMPT_CHECK_INTERVAL_S) as watch:

            def progress(event: Progress) -> None:
                if event.stage == Stage.DECODING:
                    watch.stop()  # past the last preemption point: no more GCS reads
                on_progress(event)

            # A preemption ends the hold only once the watch has seen it, so the engine
            # stops right after the held step.
            interrupted = lambda: stop.is_set() or watch.look()  # noqa: E731
            return self._render_resumed(request, held(progress, hold, interrupted), stop, watch.requested, threads)

    def _claim_hold(self, request: EngineRequest) -> Hold | None:
        if not self.holds_enabled:
            return None
        from farm.serve.flags import Hold

        try:
            return Hold.claim_render(self.model.name, self.model.device_kind, request.render_id, self.node)
        except Exception as error:  # noqa: BLE001 - a drill must not fail the render
            log.warning("render %s: cannot look for a drill's hold: %s", request.render_id, error)
            return None

    def _render_resumed(self, request: EngineRequest, on_progress, stop: threading.Event,
                        should_preempt, threads: int | None) -> RenderOutput:
        """The engine's render, from the request's checkpoint when it has a usable one."""
        render = functools.partial(self.engine.render, request, on_progress, stop.is_set,
                                   should_preempt=should_preempt, cpu_threads=threads)
        if not request.resume_from:
            return render()
        try:
            return render(resume=DenoiseCheckpoint.from_bytes(self.artifacts.read_checkpoint(request.resume_from)))
        except (CheckpointError, FileNotFoundError) as unusable:
            # Same seed, same video from step 0: only the checkpointed steps' time is lost.
            note = f"checkpoint {request.resume_from} was not used ({unusable}); rendered from step 0"
            log.warning("render %s attempt %d: %s", request.render_id, request.attempt, note)
        output = render()
        output.notes.append(note)
        return output

    def _preempted(self, request: EngineRequest, preempted: RenderPreempted, emit) -> None:
        """Writes the checkpoint, lowers the flag, and ends the stream with a "preempted" event."""
        from farm.serve.flags import clear_preemption

        started = time.perf_counter()
        try:
            checkpoint_uri = self.artifacts.write_checkpoint(
                request.render_id, request.attempt, preempted.checkpoint.to_bytes())
        except Exception as error:  # the stream must end: as a failed attempt, with the reason
            log.warning("render %s: the checkpoint after step %d cannot be written: %s", request.render_id,
                        preempted.step, error)
            emit({"kind": "error", "error": error})
            return
        checkpoint_seconds = time.perf_counter() - started
        try:
            clear_preemption(request.render_id, request.attempt)
        except Exception as error:  # noqa: BLE001 - the checkpoint is written; a stale flag is harmless
            log.warning("render %s: cannot clear the preemption flag: %s", request.render_id, error)
        log.info("render %s attempt %d preempted after step %d of %d; checkpoint %s written in %.3f s",
                 request.render_id, request.attempt, preempted.step, preempted.checkpoint.total_steps,
                 checkpoint_uri, checkpoint_seconds)
        emit({
            "kind": "preempted", "checkpoint_uri": checkpoint_uri, "step": preempted.step,
            "total_steps": preempted.checkpoint.total_steps,
            # The work done before the preemption, to be charged (the checkpoint write is not in it).
            "timings": [(t.phase, t.device_kind, t.seconds) for t in preempted.timings],
            "checkpoint_seconds": checkpoint_seconds,
            "device_kind": self.engine.device_kind, "node": self.node,
        })
        emit({"kind": "rendered"})


def held(on_progress, hold: Hold | None, interrupted):
    """on_progress, waiting after the hold's denoising step (when there is a hold)."""
    if hold is None:
        return on_progress

    def progress(event: Progress) -> None:
        on_progress(event)
        if event.stage == Stage.DENOISING and event.step == hold.step:
            log.info("render %s: held after step %d by a drill", hold.holder, hold.step)
            outcome = hold.wait(interrupted)
            log.info("render %s: hold after step %d ended (%s)", hold.holder, hold.step, outcome)

    return progress


def deployment_name(model: ModelConfig, pool: PoolConfig) -> str:
    """engine-<model> for a model's implicit single pool; engine-<model>-<kind> per explicit pool."""
    return f"engine-{model.name}-{pool.device_kind.lower()}" if model.explicit_pools else f"engine-{model.name}"


def pool_model(model: ModelConfig, pool: PoolConfig) -> ModelConfig:
    """The model config an engine of this pool loads: its device kind, GPUs and CPUs."""
    kind = None if pool.device_kind == "auto" else pool.device_kind
    return model.model_copy(update={"device_kind": kind, "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus})


def engine_deployment(model: ModelConfig, pool: PoolConfig, artifacts_url: str, renders_per_replica: int,
                      app_name: str, postproc=None, postproc_config: PostprocConfig | None = None):
    """postproc: the post-processing deployment (bound), whose handle the replicas get."""
    options: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if not pool.num_gpus:
        # Ray sets OMP_NUM_THREADS to the actor's CPU count (1), which caps torch's
        # OpenMP threads in every thread but the first; a CPU engine uses its cores.
        threads = model.cpu_threads or os.cpu_count() or 1
        # OpenMP's default waits (a short spin, then sleep): post-processing replicas on
        # the same cores run at a lower priority (postproc.niceness), so a spinning
        # engine thread's sibling is not descheduled for them. Passive waits cost the
        # tiny engine 30-50 ms of denoising per render, idle or not. Activations are
        # freed into the heap for the next layer, not to the kernel (farm.serve.allocator).
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

    return serve.deployment(EngineServer).options(
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
           postproc_config.model_dump_json() if postproc_config else None)
