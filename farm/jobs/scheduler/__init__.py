"""The scheduler: claims queued renders for the free room of their model's engine pools,
places each on a pool, streams it there, keeps its lease, preempts lower classes for
urgent work, sizes the pools from their backlog, and records how each attempt ends with
its charges (priced by `farm.metering.charging`).

It knows engines only through `EnginePool` and its typed `RenderStream`, so it runs (and
is tested) without Ray; `farm.serve.scheduler` wraps Ray Serve deployment handles into
pools. Its parts: `loop` (the Scheduler: its loops and the attempts it holds), `attempt`
(one attempt), `placement` (room, memory, routing), `preemption`, `outcomes` (how an
attempt ends, written to the store), `progress` (progress on its way to the store),
`autoscale` (pool sizes from the backlog), `quarantine` (failing nodes kept out) and
`protocols` (what it needs of pools, metrics and the node fence). The claim's order
(priority, then fair share between tenants) is the store's: `farm.jobs.fairshare`."""

from farm.jobs.scheduler.loop import Scheduler
from farm.jobs.scheduler.protocols import EnginePool, NodeFence, RenderStream, SchedulerMetrics

__all__ = ["EnginePool", "NodeFence", "RenderStream", "Scheduler", "SchedulerMetrics"]
