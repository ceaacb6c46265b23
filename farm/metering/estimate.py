"""Cost estimates: a per-(model, device kind) timing model fitted from measured renders.

Denoising dominates: each step runs the transformer over the latent tokens (x2 with
classifier-free guidance, which runs as one batch), so denoising seconds are fitted as
k + steps * (c0 + c1*T + c2*T^2) in the token count T (the square is attention; k is
the pipeline's set-up per render). VAE decoding and
MP4 encoding grow with the output pixels; prompt encoding is about constant. Each
term is fitted by least squares with non-negative coefficients, on the timings the
farm recorded for real renders (`farm calibrate` runs a grid of them)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from farm.config import Family, ModelConfig, PriceConfig
from farm.jobs.spec import ResolvedSpec

TEMPORAL_COMPRESSION = {Family.LTX_VIDEO: 8, Family.COGVIDEOX: 4}
# Before any measurement: deliberately pessimistic seconds per unit, so a budget is
# never under-reserved (CPU-scale numbers; GPU pools fit their own model quickly).
FALLBACK = {"DENOISING": (0.5, 0.0, 2e-4, 0.0), "OTHER": (0.05, 2e-7)}
PER_PIXEL_PHASES = ("DECODING", "ENCODING", "WRITING", "POSTPROCESSING")
CPU_PHASES = ("ENCODING", "WRITING", "POSTPROCESSING")


def latent_tokens(spec: ResolvedSpec, model: ModelConfig) -> float:
    """Tokens the transformer sees per pass, times the guidance batch."""
    multiple = model.limits.size_multiple
    latent_frames = (spec.num_frames - 1) // TEMPORAL_COMPRESSION[model.family] + 1
    batch = 2 if spec.guidance_scale > 1 else 1
    return latent_frames * (spec.height / multiple) * (spec.width / multiple) * batch


def output_pixels(spec: ResolvedSpec) -> float:
    return float(spec.width * spec.height * spec.num_frames)


def delivered_pixels(spec: ResolvedSpec) -> float:
    """Pixels of the delivered clip, after interpolation and upscaling: what
    post-processing and encoding handle."""
    post = spec.postprocess
    if not post:
        return output_pixels(spec)
    return float(post.output_frames(spec.num_frames) * spec.width * spec.height * post.upscale_factor ** 2)


def _nonnegative_fit(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best of the fits over the
    subsets of features whose solution is non-negative (four features at most)."""
    best, best_error = np.zeros(features.shape[1]), float(np.sum(targets**2))
    for size in range(1, features.shape[1] + 1):
        for subset in itertools.combinations(range(features.shape[1]), size):
            columns = list(subset)
            solution, *_ = np.linalg.lstsq(features[:, columns], targets, rcond=None)
            if np.any(solution < 0):
                continue
            coefficients = np.zeros(features.shape[1])
            coefficients[columns] = solution
            error = float(np.sum((features @ coefficients - targets) ** 2))
            if error < best_error:
                best, best_error = coefficients, error
    return best


@dataclasses.dataclass(frozen=True)
class TimingModel:
    """Seconds per phase as a function of the spec, for one (model, device kind)."""

    denoise: tuple[float, float, float, float]
    """k, c0, c1, c2 of k + steps * (c0 + c1*T + c2*T^2)."""
    prompt_seconds: float
    per_pixel: dict[str, tuple[float, float]]
    samples: int

    def to_json(self) -> dict:
        return {"denoise": list(self.denoise), "prompt_seconds": self.prompt_seconds,
                "per_pixel": {k: list(v) for k, v in self.per_pixel.items()}, "samples": self.samples}

    @classmethod
    def from_json(cls, data: dict) -> "TimingModel":
        return cls(tuple(data["denoise"]), data["prompt_seconds"],
                   {k: tuple(v) for k, v in data["per_pixel"].items()}, data["samples"])

    @classmethod
    def fallback(cls) -> "TimingModel":
        return cls(FALLBACK["DENOISING"], FALLBACK["OTHER"][0],
                   {phase: FALLBACK["OTHER"] for phase in ("DECODING", "ENCODING")}, 0)

    def phase_seconds(self, spec: ResolvedSpec, model: ModelConfig) -> dict[str, float]:
        tokens, pixels = latent_tokens(spec, model), output_pixels(spec)
        k, c0, c1, c2 = self.denoise
        post = spec.postprocess
        # Every candidate is a whole render; interpolation and upscaling multiply the
        # pixels that post-processing and encoding handle.
        candidates = post.candidates if post else 1
        delivered = delivered_pixels(spec)
        seconds = {"DENOISING": candidates * (k + spec.num_inference_steps * (c0 + c1 * tokens + c2 * tokens**2)),
                   "ENCODING_PROMPT": candidates * self.prompt_seconds}
        for phase, (p0, p1) in self.per_pixel.items():
            # Each candidate is decoded; only the chosen clip is post-processed and encoded.
            seconds[phase] = candidates * (p0 + p1 * pixels) if phase == "DECODING" else p0 + p1 * delivered
        return seconds


def fit_timing_model(samples: Sequence[tuple[ResolvedSpec, list[tuple[str, str, float]]]],
                     model: ModelConfig) -> TimingModel:
    """Fits from (spec, [(phase, device kind, seconds)]) of succeeded renders."""
    if not samples:
        raise ValueError(f"no measured renders of {model.name} to fit a timing model from")
    denoise_seconds, denoise_rows, prompt = [], [], []
    pixel_rows: dict[str, list[tuple[float, float]]] = {}
    for spec, timings in samples:
        phase_totals: dict[str, float] = {}
        for phase, _kind, seconds in timings:
            phase_totals[phase] = phase_totals.get(phase, 0.0) + seconds
        tokens = latent_tokens(spec, model)
        if "DENOISING" in phase_totals:
            steps = spec.num_inference_steps
            denoise_rows.append((1.0, steps, steps * tokens, steps * tokens**2))
            denoise_seconds.append(phase_totals["DENOISING"])
        if "ENCODING_PROMPT" in phase_totals:
            prompt.append(phase_totals["ENCODING_PROMPT"])
        for phase in PER_PIXEL_PHASES:
            if phase in phase_totals:
                pixels = output_pixels(spec) if phase == "DECODING" else delivered_pixels(spec)
                pixel_rows.setdefault(phase, []).append((pixels, phase_totals[phase]))
    denoise = _fit_scaled(np.array(denoise_rows), np.array(denoise_seconds))
    per_pixel = {}
    for phase, rows in pixel_rows.items():
        data = np.array(rows)
        features = np.column_stack([np.ones(len(data)), data[:, 0]])
        per_pixel[phase] = tuple(float(v) for v in _fit_scaled(features, data[:, 1]))
    return TimingModel(tuple(float(v) for v in denoise), float(np.median(prompt)) if prompt else 0.0,
                       per_pixel, len(samples))


def _fit_scaled(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # Estimates must be right in proportion (a budget is a percentage game), so rows
    # are weighted by 1/target: the fit minimises relative, not absolute, error.
    weights = 1.0 / np.maximum(targets, 1e-6)
    features, targets = features * weights[:, None], targets * weights
    # Columns span many orders of magnitude (1, T, T^2): scale them for a stable solve.
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    return _nonnegative_fit(features / scale, targets) / scale


@dataclasses.dataclass(frozen=True)
class Estimate:
    device_seconds: float
    nanodollars: int
    device_kind: str
    phases: dict[str, float]
    calibrated: bool


def estimate_cost(spec: ResolvedSpec, model: ModelConfig, timing: TimingModel | None, device_kind: str,
                  prices: PriceConfig) -> Estimate:
    calibrated = timing is not None
    phases = (timing or TimingModel.fallback()).phase_seconds(spec, model)
    # Priced as the engine meters them: MP4 encoding and writing run on CPU cores.
    dollars = sum(seconds * prices.price_of("CPU" if phase in CPU_PHASES else device_kind)
                  for phase, seconds in phases.items()) / 3600
    return Estimate(sum(phases.values()), round(dollars * 1e9), device_kind, phases, calibrated)
