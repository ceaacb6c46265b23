"""Timing models kept in the store, and what a spec will cost, predicted at submit: its
model's timing model for each device kind it may run on (the one the store keeps, else
one fitted from the renders measured there, else none: the pessimistic fallback), each
looked up again after a while rather than at every submit."""

from __future__ import annotations

import time
from collections.abc import Callable

from farm.config import ModelConfig, PriceConfig
from farm.domain.spec import ResolvedSpec
from farm.jobs.store import JobStore
from farm.planning.calibrate import samples_on
from farm.planning.estimate import DEFAULT_CHUNK_FRAMES, Estimate, TimingModel, estimate_cost, fit_timing_model

# Submits are the hot path; a timing model the scheduler stores reaches estimates this late.
TIMING_CACHE_S = 30.0
# A (model, device kind) without a stored timing model is fitted from its measured
# renders once there are at least this many (of the latest SAMPLES_TO_FIT).
MIN_SAMPLES_TO_FIT = 4
SAMPLES_TO_FIT = 200


def measured_samples(store: JobStore, model: ModelConfig, device_kind: str,
                     limit: int = 500) -> list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]:
    """Recent succeeded renders of the model whose denoising ran on `device_kind`."""
    return samples_on(device_kind, store.recent_timings(model.name, limit))


def fit_and_store(store: JobStore, model: ModelConfig, device_kind: str,
                  samples: list[tuple[ResolvedSpec, list[tuple[str, str, float]]]] | None = None,
                  chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> TimingModel:
    """Fits the (model, device kind) timing model from `samples`, by default the recent
    measured renders, and stores it. chunk_frames: the farm's postproc.chunk_frames."""
    if samples is None:
        samples = measured_samples(store, model, device_kind)
    timing = fit_timing_model(samples, model, chunk_frames)
    store.save_cost_model(model.name, device_kind, timing.to_json(), timing.samples)
    return timing


class CostEstimator:
    """Predicted costs for one farm's prices. Blocking (a lookup reads the store): call it
    off the event loop. Calls from several threads at once may each look the same pair up;
    the last to finish is kept."""

    def __init__(self, store: JobStore, prices: PriceConfig, cache_s: float = TIMING_CACHE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.prices = prices
        self.cache_s = cache_s
        self._clock = clock
        # (model, device kind) -> (when looked up, its timing model)
        self._timings: dict[tuple[str, str], tuple[float, TimingModel | None]] = {}

    def timing(self, model: ModelConfig, device_kind: str) -> TimingModel | None:
        """The pair's timing model: stored, else fitted from enough measured renders, else None."""
        now = self._clock()
        cached = self._timings.get((model.name, device_kind))
        if cached is None or now - cached[0] > self.cache_s:
            stored = self.store.cost_model(model.name, device_kind)
            timing = TimingModel.from_json(stored) if stored else None
            if timing is None:
                samples = measured_samples(self.store, model, device_kind, SAMPLES_TO_FIT)
                timing = fit_timing_model(samples, model) if len(samples) >= MIN_SAMPLES_TO_FIT else None
            self._timings[(model.name, device_kind)] = cached = (now, timing)
        return cached[1]

    def estimate(self, spec: ResolvedSpec, model: ModelConfig, kinds: list[str]) -> Estimate:
        """The spec's predicted cost: on the kind it prefers where that is among `kinds`,
        else on the dearest of `kinds`, so that a budget reservation never falls short."""
        wanted = spec.prefer_device_kind if spec.prefer_device_kind in kinds else ""
        estimates = [estimate_cost(spec, model, self.timing(model, kind), kind, self.prices)
                     for kind in ([wanted] if wanted else kinds)]
        return max(estimates, key=lambda e: e.nanodollars)
