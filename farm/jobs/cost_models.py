"""Timing models kept in the store: fitted from the renders it recorded, saved for the
gateway's estimates and the scheduler's placement."""

from __future__ import annotations

from farm.config import ModelConfig
from farm.domain.spec import ResolvedSpec
from farm.jobs.store import JobStore
from farm.planning.calibrate import samples_on
from farm.planning.estimate import DEFAULT_CHUNK_FRAMES, TimingModel, fit_timing_model


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
