"""The render thread: the one thread in which an engine renders, one attempt after
another, every seed an attempt asks for.

It hands the attempt's event loop what it sees through `emit` (progress, each seed's
`Candidate`, `Preempted`, and at last `Rendered` or `Failed`), and leaves the GIL to the
engine otherwise. The first seed of an attempt (its own) is preemptible: a
`PreemptionWatch` looks for the preemption while it denoises, the engine asks it at step
boundaries and between an eager transformer's layers, and a preempted render's
checkpoint is written to the artifact store before `Preempted` goes out. A request with
`resume_from` resumes that seed from its checkpoint; one that cannot be read or does not
fit the request is logged, noted in the manifest, and the seed renders from step 0
instead (same seed, so the same video; only the checkpointed steps' time is lost).
Later candidates and quality retries are not preemptible: a checkpoint there would lose
the candidates already rendered."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from farm import tracing
from farm.domain.engine import (
    Candidate,
    CheckpointError,
    DenoiseCheckpoint,
    Engine,
    EngineRequest,
    Progress,
    RenderCancelled,
    RenderOutput,
    RenderPreempted,
)
from farm.domain.events import PhaseTiming, Preempted, RenderProgress
from farm.domain.states import Stage
from farm.render.signals import Hold, Holds, PreemptionSignal, held
from farm.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)


# Chaos drills: a node started with this variable set fails every render there at that
# denoising step, as a node with a bad GPU would (see the README's "Faults"). The Serve
# replica reads it; the render thread fails the step.
FAIL_AT_STEP_ENV = "FARM_CHAOS_FAIL_AT_STEP"


class InjectedFault(RuntimeError):
    """A failure the node was told to inject (FARM_CHAOS_FAIL_AT_STEP)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Rendered:
    """The render thread is done with the attempt's seeds: after the last candidate, or
    after `Preempted`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    """The render thread's work ended with this error (a cancel is `RenderCancelled`)."""

    error: BaseException


Message = RenderProgress | Candidate | Preempted | Rendered | Failed
"""What the render thread hands the attempt's event loop."""


class Emit(Protocol):
    """A sink of messages: `emit(message, flush=True)` asks the loop to take it at once."""

    def __call__(self, message: Message, flush: bool = False) -> None: ...


class RenderThread:
    def __init__(self, engine: Engine, artifacts: ArtifactStore, preemption: PreemptionSignal, *,
                 executor: concurrent.futures.Executor | None = None, holds: Holds | None = None,
                 node: str | None = None, threads_beside_postprocessing: int | None = None, fail_at_step: int = 0):
        """executor: the single thread renders run in (the one the engine was loaded in);
        None starts one. threads_beside_postprocessing: the CPU threads of a render that
        starts while another of this engine is post-processed on the same cores (None:
        the engine's own count). fail_at_step: a chaos drill fails every render at this
        denoising step (0: never)."""
        self.engine, self.artifacts, self.preemption, self.holds = engine, artifacts, preemption, holds
        # One render at a time: a second request waits here, already dispatched, so the
        # engine starts it the moment the first one ends.
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                          thread_name_prefix="engine")
        self.node = node
        self.threads_beside_postprocessing = threads_beside_postprocessing
        self.fail_at_step = fail_at_step
        self.postprocessing: set[str] = set()
        """Renders past the engine and not yet written (added here as each is handed
        over; the attempt removes it at its end, or when a quality retry takes it back)."""

    def render_threads(self) -> int | None:
        """CPU threads for the render starting now (None: the engine's). While another
        render is post-processed, its chunks share the cores (see `threads_beside_postprocessing`)."""
        return self.threads_beside_postprocessing if self.postprocessing else None

    def render(self, request: EngineRequest, emit: Emit, stop: threading.Event, seeds: list[int] | None = None,
               first_step: int = 0, total_steps: int | None = None) -> None:
        """Renders each seed in turn (in the calling thread); emits progress, a
        `Candidate` with each output, and `Rendered` at the end. Steps count across seeds
        (first_step + 1 ... of total_steps), so progress only goes forward. A failure is
        emitted as `Failed`, never raised."""
        if stop.is_set():
            return
        seeds = seeds or [request.seed]
        steps = request.num_inference_steps
        total_steps = total_steps or len(seeds) * steps
        device = self.engine.device_kind
        threads = self.render_threads()
        stage_started: dict = {"stage": None, "at": time.perf_counter()}
        offset = {"steps": first_step}
        hold = self._claim_hold(request) if first_step == 0 else None
        phases = tracing.Phases(request.trace_parent, "engine",
                                {"farm.render_id": request.render_id, "farm.device_kind": device})

        def on_progress(progress: Progress) -> None:
            if self.fail_at_step and progress.step == self.fail_at_step:
                raise InjectedFault(f"{FAIL_AT_STEP_ENV}={self.fail_at_step} on node {self.node}")
            stage = Stage(progress.stage)
            phases.enter(stage)
            if progress.step:
                event = RenderProgress(stage, step=offset["steps"] + progress.step, total_steps=total_steps,
                                       step_seconds=progress.step_seconds, at=time.time())
            elif stage != stage_started["stage"]:
                # A stage change closes the previous phase; denoising is charged per step instead.
                # Stage changes say where the render runs: the scheduler needs the node
                # to retry a failed render elsewhere and to count a node's failures.
                event = RenderProgress(stage, at=time.time(), node=self.node,
                                       finished_phases=self._close_stage(stage_started, device, stage))
            else:
                event = RenderProgress(stage, at=time.time())
            # A held step goes at once: whoever holds the render waits to see it.
            emit(event, flush=hold is not None and progress.step == hold.step)

        try:
            for index, seed in enumerate(seeds):
                offset["steps"] = first_step + index * steps
                candidate = request if seed == request.seed else dataclasses.replace(request, seed=seed)
                if first_step == 0 and index == 0:
                    output = self._render_preemptible(candidate, on_progress, stop, threads, hold)
                else:
                    output = self.engine.render(candidate, on_progress, stop.is_set, cpu_threads=threads)
                emit(Candidate(seed, output))
            phases.close()
            finished = self._close_stage(stage_started, device, Stage.POSTPROCESSING)
            # Counted before `Rendered` reaches the event loop: the next render may start
            # in this thread at once.
            self.postprocessing.add(request.render_id)
            emit(RenderProgress(Stage.POSTPROCESSING, node=self.node, finished_phases=finished))
            emit(Rendered())
        except RenderPreempted as preempted:
            phases.close()
            self._preempted(request, preempted, emit)
        except RenderCancelled as cancelled:
            phases.close(cancelled)
            log.info("render %s cancelled after step %d", request.render_id, cancelled.step)
            emit(Failed(cancelled))
        except BaseException as error:  # handed to the caller through the stream
            phases.close(error)
            emit(Failed(error))

    @staticmethod
    def _close_stage(stage_started: dict, device: str, stage: Stage) -> tuple[PhaseTiming, ...]:
        """Starts `stage`; the previous stage's timing, unless it was denoising (charged per step)."""
        now = time.perf_counter()
        previous = stage_started["stage"]
        finished = ()
        if previous and previous != Stage.DENOISING:
            finished = (PhaseTiming(previous, device, now - stage_started["at"]),)
        stage_started.update(stage=stage, at=now)
        return finished

    # -- preemption ---------------------------------------------------------------------

    def _render_preemptible(self, request: EngineRequest, on_progress: Callable[[Progress], None],
                            stop: threading.Event, threads: int | None, hold: Hold | None = None) -> RenderOutput:
        """The engine's render, preemptible, and resumed from `resume_from` when the request
        has one; a drill's `hold` stops it after a step until released, cancelled or preempted."""
        if not self.engine.supports_checkpoint:
            return self._render_resumed(request, held(on_progress, hold, stop.is_set), stop, None, threads)
        with self.preemption.watch(request.render_id, request.attempt) as watch:

            def progress(event: Progress) -> None:
                if event.stage == Stage.DECODING:
                    watch.stop()  # past the last preemption point: stop looking
                on_progress(event)

            # A preemption ends the hold only once the watch has seen it, so the engine
            # stops right after the held step.
            interrupted = lambda: stop.is_set() or watch.look()  # noqa: E731
            return self._render_resumed(request, held(progress, hold, interrupted), stop, watch.requested, threads)

    def _claim_hold(self, request: EngineRequest) -> Hold | None:
        if self.holds is None:
            return None
        try:
            return self.holds.claim(request.render_id)
        except Exception as error:  # noqa: BLE001 - a drill must not fail the render
            log.warning("render %s: cannot look for a drill's hold: %s", request.render_id, error)
            return None

    def _render_resumed(self, request: EngineRequest, on_progress: Callable[[Progress], None],
                        stop: threading.Event, should_preempt: Callable[[], bool] | None,
                        threads: int | None) -> RenderOutput:
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

    def _preempted(self, request: EngineRequest, preempted: RenderPreempted, emit: Emit) -> None:
        """Writes the checkpoint, lowers the preemption, and ends with `Preempted` (and `Rendered`)."""
        started = time.perf_counter()
        try:
            checkpoint_uri = self.artifacts.write_checkpoint(
                request.render_id, request.attempt, preempted.checkpoint.to_bytes())
        except Exception as error:  # the stream must end: as a failed attempt, with the reason
            log.warning("render %s: the checkpoint after step %d cannot be written: %s", request.render_id,
                        preempted.step, error)
            emit(Failed(error))
            return
        checkpoint_seconds = time.perf_counter() - started
        try:
            self.preemption.clear(request.render_id, request.attempt)
        except Exception as error:  # noqa: BLE001 - the checkpoint is written; a stale flag is harmless
            log.warning("render %s: cannot clear the preemption flag: %s", request.render_id, error)
        log.info("render %s attempt %d preempted after step %d of %d; checkpoint %s written in %.3f s",
                 request.render_id, request.attempt, preempted.step, preempted.checkpoint.total_steps,
                 checkpoint_uri, checkpoint_seconds)
        emit(Preempted(
            checkpoint_uri=checkpoint_uri, step=preempted.step, total_steps=preempted.checkpoint.total_steps,
            # The work done before the preemption, to be charged (the checkpoint write is not in it).
            timings=tuple(PhaseTiming(Stage(t.phase), t.device_kind, t.seconds) for t in preempted.timings),
            checkpoint_seconds=checkpoint_seconds, device_kind=self.engine.device_kind, node=self.node,
        ))
        emit(Rendered())
