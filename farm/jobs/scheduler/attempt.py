"""One attempt the scheduler holds: the render it claimed, the pool it was placed on,
the stream from that pool's engine, and where the attempt stands."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from farm.domain.engine import EngineRequest
from farm.jobs.records import ClaimedRender
from farm.jobs.scheduler.protocols import EnginePool, RenderStream
from farm.metering.charging import AttemptMeter


@dataclasses.dataclass(eq=False)  # one attempt is itself, whatever its fields say
class RunningAttempt:
    claimed: ClaimedRender
    pool: EnginePool
    stream: RenderStream | None = None
    task: asyncio.Task | None = None
    cancel_sent: bool = False
    # Preemption asked of a started render (it checkpoints), or a render taken back
    # from a replica's queue before it started.
    preempt_sent: bool = False
    withdrawn: bool = False
    # Claimed but kept back from its pool until its turn (see preemption.may_dispatch).
    held: bool = False
    # The engine has let go of it (a preemption's checkpoint is written).
    engine_done: bool = False
    # Its frames are being post-processed or written: the engine is free for the next.
    postprocessing: bool = False
    engine_started: bool = False
    node: str | None = None
    # Phases finished so far: what a cancel, a failure or a lost replica is charged (or absorbed).
    meter: AttemptMeter = dataclasses.field(init=False)
    # Its ending's write is being tried again (the store was out of reach).
    ending_retried: bool = False
    # Handed back to the queue because the scheduler is stopping (see Scheduler.drain).
    handed_back: bool = False
    # The attempt's tracing span (non-recording when tracing is off).
    span: Any = None

    def __post_init__(self) -> None:
        self.meter = AttemptMeter(self.pool.device_kind, self.claimed.spec.surcharge)

    @property
    def needs_engine(self) -> bool:
        """Rendering, or waiting to (held, prefetched): not yet past the engine."""
        return not (self.engine_done or self.postprocessing)

    @property
    def dispatched(self) -> bool:
        """Sent to its pool's engine (and not taken back)."""
        return self.stream is not None and not self.withdrawn


def engine_request(claimed: ClaimedRender, trace_parent: str | None = None) -> EngineRequest:
    """trace_parent: the attempt's span, under which the engine's spans go."""
    spec = claimed.spec
    return EngineRequest(
        render_id=claimed.id, attempt=claimed.attempt, task=spec.task, prompt=spec.prompt,
        negative_prompt=spec.negative_prompt, image=spec.image or None, width=spec.width, height=spec.height,
        num_frames=spec.num_frames, fps=spec.fps, num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale, seed=spec.seed, resume_from=claimed.checkpoint_uri,
        postprocess=spec.postprocess, estimated_memory_bytes=spec.memory_bytes, avoid_nodes=claimed.failed_nodes,
        trace_parent=trace_parent, adapters=spec.adapters, motion_bucket_id=spec.motion_bucket_id,
        noise_aug_strength=spec.noise_aug_strength, decode_chunk_size=spec.decode_chunk_size,
    )
