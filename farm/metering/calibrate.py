"""`farm calibrate`: measure a grid of renders on the farm's own pools, then fit and
store the timing model that EstimateCost and budget reservations use."""

from __future__ import annotations

import itertools
import random

from farm.config import ModelConfig
from farm.jobs.spec import ResolvedSpec
from farm.jobs.store import JobStore
from farm.metering.estimate import TimingModel, fit_timing_model

# Up to this size the grid spans the model's allowed range; beyond it a calibration
# render would take minutes on a CPU pool. GPU pools may raise it (--max-size).
DEFAULT_MAX_SIZE = 768
DEFAULT_MAX_FRAMES = 121
DEFAULT_MAX_STEPS = 40


def calibration_specs(model: ModelConfig, count: int, seed: int = 0, max_size: int = DEFAULT_MAX_SIZE,
                      max_frames: int = DEFAULT_MAX_FRAMES, max_steps: int = DEFAULT_MAX_STEPS) -> list[dict]:
    """Spec fields for `count` renders spread over sizes, frame counts and steps:
    the corners of the range first, then random points inside it."""
    limits = model.limits
    sizes = list(range(max(limits.min_size, limits.size_multiple), min(max_size, limits.max_width) + 1,
                       limits.size_multiple))
    heights = [s for s in sizes if s <= limits.max_height]
    frames = list(range(limits.min_frames, min(max_frames, limits.max_frames) + 1, limits.frame_step))
    steps = list(range(2, min(max_steps, limits.max_steps) + 1))
    corners = [dict(width=w, height=h, num_frames=f, num_inference_steps=s)
               for w, h, f, s in itertools.product((sizes[0], sizes[-1]), (heights[0], heights[-1]),
                                                   (frames[0], frames[-1]), (steps[0], steps[-1]))]
    chooser = random.Random(seed)
    chooser.shuffle(corners)
    picked = corners[: count // 2]
    while len(picked) < count:
        picked.append(dict(width=chooser.choice(sizes), height=chooser.choice(heights),
                           num_frames=chooser.choice(frames), num_inference_steps=chooser.choice(steps)))
    return picked


def measured_samples(store: JobStore, model: ModelConfig, device_kind: str,
                     limit: int = 500) -> list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]:
    """Recent succeeded renders of the model whose denoising ran on `device_kind`."""
    return [(spec, timings) for spec, timings in store.recent_timings(model.name, limit)
            if any(phase == "DENOISING" and kind == device_kind for phase, kind, _ in timings)]


def fit_and_store(store: JobStore, model: ModelConfig, device_kind: str) -> TimingModel:
    timing = fit_timing_model(measured_samples(store, model, device_kind), model)
    store.save_cost_model(model.name, device_kind, timing.to_json(), timing.samples)
    return timing
