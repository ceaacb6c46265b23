"""Where renders may go and where each one goes: the room each pool has (a render on
each replica's engine, `prefetch_per_replica` waiting behind it, and up to
`postprocessing_per_replica` whose frames are being post-processed), the pools whose
devices hold a render (the memory the gateway estimated at submit), what the claim may
take from the store, and the pool a claimed render is sent to: of the kind it requires,
where it would finish first, the kind it prefers on a tie."""

from __future__ import annotations

from farm.config import FarmConfig
from farm.domain.spec import ResolvedSpec
from farm.jobs.records import ClaimedRender
from farm.jobs.scheduler.attempt import RunningAttempt
from farm.jobs.scheduler.protocols import EnginePool
from farm.planning.estimate import TimingModel
from farm.planning.memory import fits, pool_capacity


class Placement:
    def __init__(self, pools: dict[str, list[EnginePool]], config: FarmConfig, running: dict[str, RunningAttempt]):
        """`running`: the scheduler's attempts (read, never changed, here)."""
        self.pools = pools
        self.config = config
        self.settings = config.scheduler
        self.models = {m.name: m for m in config.served_models()}
        self.running = running
        self._capacities: dict[str, int | None] = {}
        # (model, device kind) -> its calibrated timing model, None until one is stored
        self._timing_models: dict[tuple[str, str], TimingModel | None] = {}

    def all_pools(self) -> list[EnginePool]:
        return [pool for pools in self.pools.values() for pool in pools]

    def on_pool(self, pool: EnginePool) -> list[RunningAttempt]:
        return [r for r in self.running.values() if r.pool is pool]

    # -- room ----------------------------------------------------------------------------

    def room(self, pool: EnginePool) -> int:
        """Renders the pool can take now: each replica renders one and holds
        `prefetch_per_replica` more, and may hold `postprocessing_per_replica` whose
        frames are being post-processed (they do not keep its engine from the next)."""
        held = self.on_pool(pool)
        engine_room = pool.slots * (1 + self.settings.prefetch_per_replica) - sum(r.needs_engine for r in held)
        return min(engine_room, pool.slots * self.settings.renders_per_replica - len(held))

    def free_slots(self) -> dict[str, int]:
        """Per model, the renders its pools can take now (models with none left out)."""
        free = {model: sum(max(self.room(p), 0) for p in pools) for model, pools in self.pools.items()}
        return {model: slots for model, slots in free.items() if slots > 0}

    def free_kinds(self) -> dict[str, list[str]]:
        """Per model, the device kinds of its pools with room."""
        return {model: [p.device_kind for p in pools if self.room(p) > 0] for model, pools in self.pools.items()}

    # -- device memory -------------------------------------------------------------------

    def capacity(self, pool: EnginePool) -> int | None:
        """GPU memory a replica of the pool may use (None: not checked, e.g. a CPU pool)."""
        if pool.key not in self._capacities:
            self._capacities[pool.key] = pool_capacity(self.models[pool.model], pool.device_kind,
                                                       self.config.devices)
        return self._capacities[pool.key]

    def pools_it_fits(self, spec: ResolvedSpec) -> list[EnginePool]:
        """The model's pools whose devices hold the render (the memory the gateway
        estimated at submit); all of them if none does (it was queued before the
        config changed: it runs rather than waiting for ever)."""
        pools = self.pools[spec.model]
        return [p for p in pools if fits(spec.memory_bytes, self.capacity(p))] or pools

    def free_memory(self) -> dict[str, int | None]:
        """Per model, the most memory a claimed render may need: that of its largest
        pool with room (None when one of them is not checked), so that a render no pool
        with room can hold stays queued instead of piling onto a full pool."""
        free: dict[str, int | None] = {}
        for model, pools in self.pools.items():
            capacities = [self.capacity(p) for p in pools if self.room(p) > 0]
            if capacities:
                free[model] = None if None in capacities else max(capacities)
        return free

    # -- time ------------------------------------------------------------------------------

    def use_timing_model(self, model: str, device_kind: str, timing: TimingModel | None) -> None:
        """The calibrated timing model of the model on that kind of device (None: none yet)."""
        self._timing_models[(model, device_kind)] = timing

    def estimate_seconds(self, spec: ResolvedSpec, pool: EnginePool) -> float:
        """Device-seconds the render would take on the pool: its calibrated cost model,
        else the fallback model scaled by the pool's relative speed."""
        model = self.models.get(spec.model)
        if model is None:
            return 0.0
        timing = self._timing_models.get((spec.model, pool.device_kind))
        if timing is not None:
            return sum(timing.phase_seconds(spec, model).values())
        return sum(TimingModel.fallback().phase_seconds(spec, model).values()) / pool.relative_speed

    def remaining_seconds(self, entry: RunningAttempt) -> float:
        total = self.estimate_seconds(entry.claimed.spec, entry.pool)
        return max(total - entry.meter.seconds, 0.0)

    # -- routing ---------------------------------------------------------------------------

    def route(self, claimed: ClaimedRender) -> EnginePool:
        """The pool with room where the render would finish first (work already on
        the pool spread over its replicas, plus the render itself); the preferred kind
        wins a tie. A render that requires a kind goes only there."""
        spec = claimed.spec
        holding = self.pools_it_fits(spec)
        pools = [p for p in holding if self.room(p) > 0]
        if spec.require_device_kind:
            pools = [p for p in pools if p.device_kind == spec.require_device_kind]
        pools = pools or holding

        def finish(pool: EnginePool) -> tuple[float, bool]:
            ahead = sum(self.remaining_seconds(r) for r in self.on_pool(pool)) / max(pool.slots, 1)
            return ahead + self.estimate_seconds(spec, pool), pool.device_kind != spec.prefer_device_kind

        return min(pools, key=finish)
