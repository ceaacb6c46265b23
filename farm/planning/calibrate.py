"""`farm calibrate`: measure a grid of renders on the farm's own pools, then fit and
store the timing model that EstimateCost and budget reservations use."""

from __future__ import annotations

import itertools
import random

from farm.config import ModelConfig
from farm.domain.spec import ResolvedSpec
from farm.domain.states import Stage

# Up to this size the grid spans the model's allowed range; beyond it a calibration
# render would take minutes on a CPU pool. GPU pools may raise it (--max-size).
DEFAULT_MAX_SIZE = 768
DEFAULT_MAX_FRAMES = 121
DEFAULT_MAX_STEPS = 40


def _axes(model: ModelConfig, max_size: int, max_frames: int, max_steps: int):
    limits = model.limits
    sizes = list(range(max(limits.min_size, limits.size_multiple), min(max_size, limits.max_width) + 1,
                       limits.size_multiple))
    heights = [s for s in sizes if s <= limits.max_height]
    frames = list(range(limits.min_frames, min(max_frames, limits.max_frames) + 1, limits.frame_step))
    steps = list(range(2, min(max_steps, limits.max_steps) + 1))
    return sizes, heights, frames, steps


def _corners(sizes, heights, frames, steps) -> list[dict]:
    return [dict(width=w, height=h, num_frames=f, num_inference_steps=s)
            for w, h, f, s in itertools.product((sizes[0], sizes[-1]), (heights[0], heights[-1]),
                                                (frames[0], frames[-1]), (steps[0], steps[-1]))]


def uniform_specs(model: ModelConfig, count: int, seed: int = 0, max_size: int = DEFAULT_MAX_SIZE,
                  max_frames: int = DEFAULT_MAX_FRAMES, max_steps: int = DEFAULT_MAX_STEPS) -> list[dict]:
    """Spec fields for `count` renders drawn uniformly over sizes, frame counts and
    steps (benchmarks draw their trial renders so; calibration before version 2 of the
    timing model used half of such a draw, after corners shuffled with the same seed)."""
    sizes, heights, frames, steps = _axes(model, max_size, max_frames, max_steps)
    chooser = random.Random(seed)
    chooser.shuffle(_corners(sizes, heights, frames, steps))  # keeps the draws of earlier versions
    return [dict(width=chooser.choice(sizes), height=chooser.choice(heights), num_frames=chooser.choice(frames),
                 num_inference_steps=chooser.choice(steps)) for _ in range(count)]


def calibration_specs(model: ModelConfig, count: int, seed: int = 0, max_size: int = DEFAULT_MAX_SIZE,
                      max_frames: int = DEFAULT_MAX_FRAMES, max_steps: int = DEFAULT_MAX_STEPS) -> list[dict]:
    """Spec fields for `count` renders spread over sizes, frame counts and steps: the
    corners of the range first (the linear terms are pinned at their ends), then points
    inside it, every other one a small render (sizes and frames drawn log-uniformly), so
    the fixed costs that dominate small renders, where relative error is largest, are
    measured as well as the big renders' per-pixel and per-token costs."""
    sizes, heights, frames, steps = _axes(model, max_size, max_frames, max_steps)
    corners = _corners(sizes, heights, frames, steps)
    chooser = random.Random(seed)
    chooser.shuffle(corners)
    picked = corners[: min(count, max(len(corners), count // 2))]

    def log_uniform(values: list[int]) -> int:
        target = values[0] * (values[-1] / values[0]) ** chooser.random()
        return min(values, key=lambda v: abs(v - target))

    while len(picked) < count:
        if len(picked) % 2:
            picked.append(dict(width=log_uniform(sizes), height=log_uniform(heights), num_frames=log_uniform(frames),
                               num_inference_steps=log_uniform(steps)))
        else:
            picked.append(dict(width=chooser.choice(sizes), height=chooser.choice(heights),
                               num_frames=chooser.choice(frames), num_inference_steps=chooser.choice(steps)))
    return picked


# Post-processing a spec may ask, each measured twice at different sizes so that its
# per-pixel term is pinned by measurements, not extrapolated: (width, height, frames,
# postprocess). Small clips with few steps: the engine's part is not what is measured.
POSTPROCESS_CALIBRATION = [
    (256, 256, 33, {"interpolation_factor": 2}),
    (512, 384, 49, {"interpolation_factor": 2}),
    (256, 160, 25, {"interpolation_factor": 4}),
    (384, 256, 17, {"interpolation_factor": 4}),
    (256, 256, 33, {"upscale_factor": 2}),
    (384, 192, 49, {"upscale_factor": 2}),
    (192, 128, 17, {"upscale_factor": 4}),
    (128, 128, 33, {"upscale_factor": 4}),
    (384, 384, 49, {"color_reference": {"statistics": {"mean": [55.0, 4.0, 12.0], "std": [18.0, 6.0, 9.0]}}}),
    (640, 320, 33, {"color_reference": {"statistics": {"mean": [40.0, -3.0, -8.0], "std": [22.0, 5.0, 7.0]}}}),
]
POSTPROCESS_CALIBRATION_STEPS = 4


def postprocess_calibration_specs(model: ModelConfig, max_size: int = DEFAULT_MAX_SIZE) -> list[dict]:
    """Spec fields (with `postprocess`) for renders that measure interpolation, upscaling
    and colour matching; sizes and frame counts are moved to the nearest the model takes,
    and a factor the model's limits refuse is left out."""
    sizes, heights, frames, steps = _axes(model, max_size, DEFAULT_MAX_FRAMES, DEFAULT_MAX_STEPS)
    limits = model.limits.postprocess
    picked = []
    for width, height, count, post in POSTPROCESS_CALIBRATION:
        width = min(sizes, key=lambda v: abs(v - width))
        height = min(heights, key=lambda v: abs(v - height))
        count = min(frames, key=lambda v: abs(v - count))
        factor = post.get("interpolation_factor", 1)
        upscale = post.get("upscale_factor", 1)
        if (factor > limits.max_interpolation_factor or upscale > limits.max_upscale_factor
                or width * height * upscale**2 > limits.max_output_pixels
                or (count - 1) * factor + 1 > limits.max_output_frames
                or model.defaults.fps * factor > limits.max_output_fps):
            continue
        picked.append(dict(width=width, height=height, num_frames=count,
                           num_inference_steps=min(steps, key=lambda v: abs(v - POSTPROCESS_CALIBRATION_STEPS)),
                           postprocess=post))
    return picked


def samples_on(device_kind: str, samples: list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]
               ) -> list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]:
    """The samples whose denoising ran on `device_kind` (what that kind's timing model is fitted from)."""
    return [(spec, timings) for spec, timings in samples
            if any(phase == Stage.DENOISING and kind == device_kind for phase, kind, _ in timings)]
