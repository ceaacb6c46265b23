"""One render attempt, without Ray: from the request to the MP4 and its manifest.

`AttemptRunner.run` is an async generator of event lists (`farm.domain.events`): the
render thread renders every candidate seed of the render, one after the other, while
this event loop scores each candidate that arrives; the best one is post-processed
(its chunks fanned out through the chunk runner), the quality gate checks it (and
renders the next seed when it fails and retries are left), and the MP4 is written
with its manifest; the stream ends with `Done`. The render thread is free as soon as
the frames exist, so the next attempt queued on it starts while this one is
post-processed. A preempted attempt ends with `Preempted` instead, its checkpoint
written; a failed one raises. When the caller cancels the generator (CancelledError),
the stop flag makes the engine return at its next step boundary, before decoding.

Everything it works with is given to it: the engine, the chunk runner, the artifact
store, the preemption signal, and in drills the holds. The Serve replica
(`farm.serve.render_replica`) gives it Serve's; tests give it local ones."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable

from farm import tracing
from farm.config import PostprocConfig
from farm.domain.engine import Candidate, Engine, EngineRequest
from farm.domain.errors import RenderRejected
from farm.domain.events import Done, EngineEvent, PhaseTiming, Preempted, RenderProgress
from farm.domain.spec import ResolvedPostprocess
from farm.domain.states import Stage
from farm.postproc.audio import AUDIO_CODEC, mux_audio
from farm.postproc.color import ColorStats
from farm.postproc.pipeline import ChunkRunner, ClipResult, StoredClip, postprocess_clip, store_clip
from farm.postproc.quality import gate_failures, summary
from farm.render import candidates
from farm.render.candidates import Contender, candidate_seed
from farm.render.manifest import build_manifest
from farm.render.render_thread import Failed, Message, Rendered, RenderThread
from farm.render.signals import Holds, PreemptionSignal
from farm.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)
CPU = "CPU"
# Progress reaches the store in batches (scheduler.event_flush_interval_s, 0.1 s by
# default); waking the event loop more often than that only takes CPU from the engine.
WAKE_INTERVAL_S = 0.1


class QualityRejected(RenderRejected):
    """The delivered clip crossed the quality gate of `postproc.quality` (action fail,
    or retry with every retry used)."""


def phase_timings(entries) -> list[PhaseTiming]:
    """(phase, device kind, seconds) entries as PhaseTimings of Stage phases."""
    return [PhaseTiming(Stage(phase), kind, seconds) for phase, kind, seconds in entries]


class AttemptRunner:
    """Runs the render attempts of one engine, one at a time in its render thread."""

    def __init__(self, engine: Engine, chunks: ChunkRunner, artifacts: ArtifactStore, preemption: PreemptionSignal,
                 *, postproc: PostprocConfig | None = None, holds: Holds | None = None,
                 executor: concurrent.futures.Executor | None = None, node: str | None = None,
                 threads_beside_postprocessing: int | None = None, fail_at_step: int = 0):
        """chunks: where post-processing runs (`LocalChunkRunner`, or Serve's deployment);
        postproc: chunking, the quality gate and the encoder's threads; holds: a drill's
        holds (None: renders are never held); node: where it runs, as progress and
        results name it. The rest goes to the render thread (`RenderThread`)."""
        self.engine, self.chunks, self.artifacts = engine, chunks, artifacts
        self.postproc = postproc or PostprocConfig()
        self.node = node or socket.gethostname()
        self.render_thread = RenderThread(engine, artifacts, preemption, executor=executor, holds=holds,
                                          node=self.node, threads_beside_postprocessing=threads_beside_postprocessing,
                                          fail_at_step=fail_at_step)

    @property
    def postprocessing(self) -> set[str]:
        """Renders past the engine and not yet written."""
        return self.render_thread.postprocessing

    async def run(self, request: EngineRequest) -> AsyncIterator[list[EngineEvent]]:
        """One attempt: lists of progress of every candidate, post-processing and writing,
        then `Done` (or `Preempted`). The render thread renders the candidates;
        everything after runs in this event loop."""
        with tracing.span("engine attempt", request.trace_parent, attributes={
                "farm.render_id": request.render_id, "farm.attempt": request.attempt, "farm.node": self.node,
                "farm.device_kind": self.engine.device_kind}) as span:
            if tracing.enabled():
                request = dataclasses.replace(request, trace_parent=tracing.traceparent_of(span))
            async for batch in self._attempt(request):
                yield batch

    async def _attempt(self, request: EngineRequest) -> AsyncIterator[list[EngineEvent]]:
        post = request.postprocess or ResolvedPostprocess()
        gate = self.postproc.quality
        steps = request.num_inference_steps
        stop = threading.Event()
        jobs: list[asyncio.Future] = []
        contenders: list[Contender] = []
        clip_timings: list[PhaseTiming] = []
        retries: list[dict] = []
        try:
            seeds = [candidate_seed(request.seed, index) for index in range(post.candidates)]

            def arrived(candidate: Candidate) -> None:
                # Several candidates: score each one while the next renders.
                scoring = None
                if post.candidates > 1:
                    scoring = asyncio.ensure_future(
                        candidates.score(candidate.output, self.chunks, self.postproc.chunk_frames))
                contenders.append(Contender(candidate, scoring))

            def rerendered(candidate: Candidate) -> None:
                contenders.append(Contender(candidate))  # a quality retry: delivered or rejected, never scored

            preempted = False
            async for batch in self._run_engine(request, seeds, 0, len(seeds) * steps, stop, jobs, arrived):
                preempted = preempted or any(isinstance(event, Preempted) for event in batch)
                yield batch
            if preempted:
                return  # the attempt ends with its checkpoint; the scheduler queues the render again
            chosen, scored = await candidates.choose(contenders)
            while True:
                yield [RenderProgress(Stage.POSTPROCESSING)]
                stored = chosen.scoring.result().stored if chosen.scoring else None
                clip = await self._postprocess(request, post, chosen.output, stored)
                clip_timings += phase_timings(clip.timings)
                failures = gate_failures(clip.quality, gate)
                if not failures:
                    break
                used = len(contenders)
                if gate.action == "retry" and len(retries) < gate.max_retries:
                    retries.append({"seed": chosen.seed, "issues": failures})
                    log.info("render %s: seed %d crossed the quality gate (%s); rendering seed %d",
                             request.render_id, chosen.seed, "; ".join(failures), candidate_seed(request.seed, used))
                    retry = [candidate_seed(request.seed, used)]
                    self.postprocessing.discard(request.render_id)  # back in the engine
                    async for batch in self._run_engine(request, retry, used * steps, (used + 1) * steps, stop,
                                                        jobs, rerendered):
                        yield batch
                    chosen = contenders[-1]
                    continue
                # Charge what ran; then fail the render with the scores.
                yield [RenderProgress(Stage.POSTPROCESSING, finished_phases=tuple(clip_timings))]
                tried = f" after {len(retries)} retries with new seeds" if retries else ""
                raise QualityRejected(f"quality below the farm's thresholds{tried}: {'; '.join(failures)}")
            yield [RenderProgress(Stage.WRITING)]
            with tracing.span("engine writing", request.trace_parent, attributes={"farm.render_id": request.render_id}):
                done = await self._finish(request, post, contenders, chosen, scored, clip, clip_timings, retries)
            yield [done]
        except asyncio.CancelledError:
            stop.set()
            for job in jobs:
                await asyncio.shield(job)
            raise
        finally:
            self.postprocessing.discard(request.render_id)
            for contender in contenders:
                if contender.scoring is not None and not contender.scoring.done():
                    contender.scoring.cancel()

    async def _run_engine(self, request: EngineRequest, seeds: list[int], first_step: int, total_steps: int,
                          stop: threading.Event, jobs: list, arrived: Callable[[Candidate], None]):
        """Renders `seeds` in the render thread; yields progress batches and hands each
        candidate to `arrived` as it comes. The render thread only appends to a deque
        and wakes this loop when it is not already awake: one wake-up and one stream
        item per batch, not per step, so the loop does not fight the engine for the GIL."""
        loop = asyncio.get_running_loop()
        pending: collections.deque[Message] = collections.deque()
        wake = asyncio.Event()
        last_wake = 0.0

        def emit(message: Message, flush: bool = False) -> None:
            nonlocal last_wake
            pending.append(message)
            # Steps shorter than WAKE_INTERVAL_S travel together; stage changes, results,
            # errors and flushed steps go at once.
            now = time.monotonic()
            urgent = flush or not isinstance(message, RenderProgress) or not message.step
            if (urgent or now - last_wake >= WAKE_INTERVAL_S) and not wake.is_set():
                last_wake = now
                loop.call_soon_threadsafe(wake.set)

        job = loop.run_in_executor(self.render_thread.executor, self.render_thread.render, request, emit, stop,
                                   seeds, first_step, total_steps)
        jobs.append(job)
        finished = False
        while not finished:
            await wake.wait()
            wake.clear()
            batch: list[EngineEvent] = []
            while pending:
                message = pending.popleft()
                if isinstance(message, Failed):
                    raise message.error
                if isinstance(message, Candidate):
                    arrived(message)
                elif isinstance(message, Rendered):
                    finished = True
                else:
                    batch.append(message)
            if batch:
                yield batch
        await job

    async def _postprocess(self, request: EngineRequest, post: ResolvedPostprocess, output,
                           stored: StoredClip | None) -> ClipResult:
        with tracing.span("engine postprocess", request.trace_parent,
                          attributes={"farm.render_id": request.render_id}) as span, tracing.current(span):
            return await self._postprocess_chunks(request, post, output, stored)

    async def _postprocess_chunks(self, request: EngineRequest, post: ResolvedPostprocess, output,
                                  stored: StoredClip | None) -> ClipResult:
        if stored is None:
            stored = await store_clip(output.frames, self.chunks, self.postproc.chunk_frames)
        color = post.color_reference
        return await postprocess_clip(
            stored, self.chunks, fps=request.fps, interpolation_factor=post.interpolation_factor,
            upscale_factor=post.upscale_factor,
            color_reference=ColorStats(mean=color.mean, std=color.std, pixels=1) if color else None,
            color_strength=color.strength if color else 1.0, crf=post.crf, bitrate_kbps=post.bitrate_kbps,
            preset=post.preset, threads=self.postproc.threads,
        )

    async def _finish(self, request: EngineRequest, post: ResolvedPostprocess, contenders: list[Contender],
                      chosen: Contender, scored: list, clip: ClipResult, clip_timings: list[PhaseTiming],
                      retries: list[dict]) -> Done:
        """Writes the MP4 and its manifest; returns `Done`."""
        timings = phase_timings(t for contender in contenders for t in contender.output.timings)
        for contender in contenders:
            if contender.scoring is not None:
                timings += contender.scoring.result().timings
        timings += clip_timings
        reported = candidates.report(contenders, scored, chosen)
        report = {
            "spec": post.to_dict(),
            "output": {"frames": clip.num_frames, "height": clip.height, "width": clip.width, "fps": clip.fps},
            "chunk_frames": self.postproc.chunk_frames,
            **clip.report,
            "quality": clip.quality.to_dict(),
            "color_statistics": clip.statistics.to_dict() if clip.statistics else None,
            "candidates": reported,
            "quality_retries": retries,
        }
        output = chosen.output
        started = time.perf_counter()
        video = clip.video
        if output.audio is not None:
            video = await asyncio.to_thread(mux_audio, video, output.audio, output.audio_sample_rate,
                                            clip.num_frames, clip.fps)
            report["audio"] = {"codec": AUDIO_CODEC, "sample_rate": output.audio_sample_rate,
                               "channels": int(output.audio.shape[0]),
                               "duration_s": clip.num_frames / clip.fps, "in_sync_with_video": True}
        manifest = build_manifest(self.engine.describe(), dataclasses.replace(request, seed=chosen.seed), timings,
                                  (clip.num_frames, clip.height, clip.width), output.peak_memory_bytes,
                                  output.backend, output.notes, postprocess=report, cpu_threads=output.cpu_threads,
                                  adapters=output.adapters)
        artifact_uri, manifest_uri = await asyncio.to_thread(
            self.artifacts.write, request.render_id, request.attempt, video, manifest)
        timings.append(PhaseTiming(Stage.WRITING, CPU, time.perf_counter() - started))
        return Done(
            artifact_uri=artifact_uri, manifest_uri=manifest_uri, timings=tuple(timings),
            device_kind=self.engine.device_kind, node=self.node, frames=clip.num_frames, seed=chosen.seed,
            quality=summary(clip.quality), candidates=reported,
        )
