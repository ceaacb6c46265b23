"""First cost estimates: scale what recent renders of the same model measured.

Denoising work grows with steps x latent volume (x2 with classifier-free guidance);
the other phases grow with the output volume. Each phase's rate is the ratio of sums
over recent renders, so one outlier moves it little."""

from __future__ import annotations

import dataclasses

from farm.config import PriceConfig
from farm.jobs.spec import ResolvedSpec

# Used until a model has measurements: deliberately pessimistic device-seconds per
# unit of work, so a budget is never under-reserved.
FALLBACK_DENOISE_SECONDS_PER_UNIT = 2e-7
FALLBACK_OTHER_SECONDS_PER_UNIT = 5e-8


@dataclasses.dataclass(frozen=True)
class Estimate:
    device_seconds: float
    nanodollars: int
    device_kind: str
    measured_renders: int


def denoise_units(spec: ResolvedSpec) -> float:
    guidance_batch = 2 if spec.guidance_scale > 1 else 1
    return spec.num_inference_steps * spec.width * spec.height * spec.num_frames * guidance_batch


def output_units(spec: ResolvedSpec) -> float:
    return spec.width * spec.height * spec.num_frames


def estimate(spec: ResolvedSpec, history: list[tuple[ResolvedSpec, list[tuple[str, str, float]]]],
             device_kind: str, prices: PriceConfig) -> Estimate:
    denoise_s = denoise_u = other_s = other_u = 0.0
    for past, timings in history:
        for phase, _kind, seconds in timings:
            if phase == "DENOISING":
                denoise_s += seconds
            else:
                other_s += seconds
        denoise_u += denoise_units(past)
        other_u += output_units(past)
    denoise_rate = denoise_s / denoise_u if denoise_u else FALLBACK_DENOISE_SECONDS_PER_UNIT
    other_rate = other_s / other_u if other_u else FALLBACK_OTHER_SECONDS_PER_UNIT
    seconds = denoise_rate * denoise_units(spec) + other_rate * output_units(spec)
    dollars = seconds * prices.price_of(device_kind) / 3600
    return Estimate(seconds, round(dollars * 1e9), device_kind, len(history))
