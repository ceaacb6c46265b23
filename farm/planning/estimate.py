"""Cost estimates: a per-(model, device kind) timing model fitted from measured renders.

Every phase the meter charges is modelled, each as a sum of terms that the spec
determines, with seconds-per-unit coefficients fitted from the farm's own renders:

- ENCODING_PROMPT: a constant.
- DENOISING: k + steps * (c0 + c1*T + c2*T^2) in the latent token count T (x2 with
  classifier-free guidance, which runs as one batch; the square is attention; k is
  the pipeline's set-up per render, c0 the fixed cost of a step).
- DECODING: a constant plus terms in the decoded frames and pixels (one growing a
  little faster than the pixels, as a large clip's activations outgrow the caches),
  and an extra cost per pixel below a size: CPU convolutions pick their kernel by the
  size of the activations (PyTorch runs oneDNN once batch x channels x frames x height
  passes a bound, and a native kernel 3x slower per pixel below it, whatever the
  width), so the fit also looks for the frames x height where the cost per pixel
  changes, and keeps it only where it fits clearly better.
- POSTPROCESSING (quality scores and whatever the spec asks: interpolation,
  upscaling, color) and ENCODING (H.264 segments and their join) run chunk by chunk
  on the post-processing replicas: a cost per chunk (each is a task, a segment, an
  encoder start) plus terms in the frames and pixels they handle. Quality analysis
  looks at frames shrunk to `ANALYSIS_MAX_SIDE`, and its optical flow (most of its
  cost) sees them padded to at least `MIN_FLOW_SIDE` a side, so it grows with pairs
  times that padded area, not with the full pixels: a 32x704 clip is analysed at
  12x256 but flowed at 32x256. Encoding also costs per row of every frame (colour
  conversion and the encoder work row by row): a tall narrow frame costs a third
  more per pixel than a square one. What a spec's `postprocess` asks has terms of its
  own, zero for a render that does not ask it: interpolation per source pair times
  the area of its two optical flows (frames shrunk to `INTERPOLATION_FLOW_MAX_SIDE`,
  padded to `MIN_FLOW_SIDE`) and per pixel of every frame it makes (the warps);
  upscaling per output pixel; colour matching per pixel of the engine's frames.
  `farm calibrate` renders a few of each, so they are measured, not extrapolated.
- WRITING: a constant plus a term in the delivered pixels.

Fits minimise the relative error (a budget is a percentage game) with non-negative
coefficients, robustly: iteratively reweighted towards least absolute relative
deviations, so that a render slowed down by something else on its machine does not
drag the model; then one factor over every phase puts the median render's total on
its measured total. Estimates are priced as the meter prices: each phase on the device
kind it was measured on (the engine's kind for the engine's phases, the
post-processing replicas' kind for theirs), each (phase, kind) charge rounded to
integer nanodollars."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from farm.config import ModelConfig, PostprocConfig, PriceConfig
from farm.domain.spec import ResolvedSpec
from farm.domain.states import Stage
from farm.families import family_facts
from farm.metering.cost import price_timings
from farm.postproc.chunks import plan_chunks

log = logging.getLogger(__name__)

VERSION = 3
# Versions whose stored models this code reads: 1 (converted), 2 (terms of this module
# without "flowed" and "delivered_rows"), 3.
READABLE_VERSIONS = (1, 2, 3)
# farm.postproc.quality analyses frames shrunk to this longer side (at least 8 px a side).
ANALYSIS_MAX_SIDE = 256
# farm.postproc.interpolate pads images to at least this side for the optical flow,
# and interpolates with flows of frames shrunk to this longer side.
MIN_FLOW_SIDE = 32
INTERPOLATION_FLOW_MAX_SIDE = 512
DEFAULT_CHUNK_FRAMES = PostprocConfig.model_fields["chunk_frames"].default
# Phases that run once per candidate (each candidate is a whole render); the others
# run on the one delivered clip (POSTPROCESSING also scores every candidate).
PER_CANDIDATE_PHASES = (Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING)
# Phases charged on CPU cores when a model does not say where they were measured
# (version 1 models, the fallback).
CPU_PHASES = (Stage.ENCODING, Stage.WRITING, Stage.POSTPROCESSING)


@dataclasses.dataclass(frozen=True)
class Work:
    """What a spec asks of each phase, in the units the terms count."""

    steps: float
    tokens: float
    frames: float
    pixels: float
    """Decoded pixels of one candidate."""
    chunks: float
    """Post-processing chunk tasks: the delivered clip's, and each candidate's scoring."""
    analysed: float
    """Frame pairs the quality measurements analyse, times the analysis area."""
    flowed: float
    """The same pairs times the area their optical flow runs on (padded to MIN_FLOW_SIDE)."""
    delivered_frames: float
    delivered_pixels: float
    delivered_rows: float
    """Rows of every delivered frame (frames x height after upscaling)."""
    interpolation_flowed: float
    """Source frame pairs interpolation computes flows for, times the flows' area (0
    without interpolation)."""
    interpolated_pixels: float
    """Pixels of the frames interpolation makes."""
    upscaled_pixels: float
    """Output pixels of every upscaled frame (0 without upscaling)."""
    colored_pixels: float
    """Pixels colour matching converts (the engine's frames; 0 without a reference)."""
    candidates: int
    frames_height: float
    """Frames x height of the decoded clip: what decides the convolution kernels."""


# Each term: units of work from the spec's Work and the phase's break (a frames x
# height; infinite when the phase has none).
TERMS: dict[str, Callable[[Work, float], float]] = {
    "one": lambda w, b: 1.0,
    "steps": lambda w, b: w.steps,
    "step_tokens": lambda w, b: w.steps * w.tokens,
    "step_tokens2": lambda w, b: w.steps * w.tokens**2,
    "frames": lambda w, b: w.frames,
    "pixels": lambda w, b: w.pixels,
    "pixels_below_break": lambda w, b: w.pixels if w.frames_height < b else 0.0,
    # Cost per pixel that grows slowly with the clip's size (activations outgrowing the
    # caches, fresh memory for them; benchmarks/RESULTS.md has the measurement).
    "pixels_log": lambda w, b: w.pixels * math.log2(1.0 + w.pixels / 1e6),
    "chunks": lambda w, b: w.chunks,
    "analysed": lambda w, b: w.analysed,
    "flowed": lambda w, b: w.flowed,
    "delivered_frames": lambda w, b: w.delivered_frames,
    "delivered_pixels": lambda w, b: w.delivered_pixels,
    "delivered_rows": lambda w, b: w.delivered_rows,
    "interpolation_flowed": lambda w, b: w.interpolation_flowed,
    "interpolated_pixels": lambda w, b: w.interpolated_pixels,
    "upscaled_pixels": lambda w, b: w.upscaled_pixels,
    "colored_pixels": lambda w, b: w.colored_pixels,
}
PHASE_TERMS: dict[str, tuple[str, ...]] = {
    Stage.ENCODING_PROMPT: ("one",),
    Stage.DENOISING: ("one", "steps", "step_tokens", "step_tokens2"),
    Stage.DECODING: ("one", "frames", "pixels", "pixels_below_break", "pixels_log"),
    Stage.POSTPROCESSING: ("one", "chunks", "delivered_frames", "flowed", "delivered_pixels", "interpolation_flowed",
                       "interpolated_pixels", "upscaled_pixels", "colored_pixels"),
    Stage.ENCODING: ("one", "chunks", "delivered_frames", "delivered_pixels", "delivered_rows"),
    Stage.WRITING: ("one", "delivered_pixels"),
}
# Phases whose fit looks for a frames x height where the cost per pixel changes.
BREAK_PHASES = (Stage.DECODING,)
MAX_BREAK_CANDIDATES = 24
# Relative improvement of the fit's loss a break must bring to be kept.
BREAK_GAIN = 0.05
# Relative error per render below which a fit counts as exact (floating-point rounding).
EXACT_FIT_LOSS = 1e-9
# Before any measurement: deliberately pessimistic seconds per unit, so a budget is
# never under-reserved (CPU-scale numbers; GPU pools fit their own model quickly).
FALLBACK: dict[str, dict[str, float]] = {
    Stage.ENCODING_PROMPT: {"one": 0.05},
    Stage.DENOISING: {"one": 0.5, "step_tokens": 2e-4},
    Stage.DECODING: {"one": 0.05, "pixels": 2e-7},
    Stage.ENCODING: {"one": 0.05, "delivered_pixels": 2e-7},
}


def latent_tokens(spec: ResolvedSpec, model: ModelConfig) -> float:
    """Tokens the transformer sees per pass, times the guidance batch."""
    multiple = model.limits.size_multiple
    latent_frames = family_facts(model.family).compression.latent_frames(spec.num_frames)
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


def analysis_size(width: int, height: int, max_side: int = ANALYSIS_MAX_SIDE, min_side: int = 8) -> tuple[int, int]:
    """The (width, height) farm.postproc.quality analyses a frame at (or, with
    max_side and min_side, interpolation takes its flows at)."""
    shrink = min(1.0, max_side / max(width, height))
    return max(min_side, round(width * shrink)), max(min_side, round(height * shrink))


def analysis_area(width: int, height: int) -> float:
    analysed_width, analysed_height = analysis_size(width, height)
    return float(analysed_width * analysed_height)


def flow_area(width: int, height: int, max_side: int = ANALYSIS_MAX_SIDE) -> float:
    """The area an optical flow of a frame shrunk to max_side runs on (padded to MIN_FLOW_SIDE)."""
    flow_width, flow_height = analysis_size(width, height, max_side, min_side=1)
    return float(max(MIN_FLOW_SIDE, flow_width) * max(MIN_FLOW_SIDE, flow_height))


def spec_work(spec: ResolvedSpec, model: ModelConfig, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> Work:
    post = spec.postprocess
    candidates = post.candidates if post else 1
    factor = post.interpolation_factor if post else 1
    frames = spec.num_frames
    chunks = len(plan_chunks(frames, chunk_frames, overlap=1)) if frames > 1 else 1
    # The delivered clip is measured after interpolation; with several candidates each
    # one's engine frames are scored first, to choose.
    scored = candidates if candidates > 1 else 0
    pairs = (frames - 1) * factor + scored * (frames - 1)
    delivered_frames = float(post.output_frames(frames) if post else frames)
    upscale = post.upscale_factor if post else 1
    delivered_height = spec.height * upscale
    source_pixels = float(spec.width * spec.height)
    interpolation_area = flow_area(spec.width, spec.height, INTERPOLATION_FLOW_MAX_SIDE) if factor > 1 else 0.0
    return Work(steps=float(spec.num_inference_steps), tokens=latent_tokens(spec, model), frames=float(frames),
                pixels=output_pixels(spec), chunks=float(chunks * (1 + scored)),
                analysed=pairs * analysis_area(spec.width, spec.height),
                flowed=pairs * flow_area(spec.width, spec.height), delivered_frames=delivered_frames,
                delivered_pixels=delivered_pixels(spec), delivered_rows=delivered_frames * delivered_height,
                interpolation_flowed=(frames - 1) * interpolation_area,
                interpolated_pixels=(frames - 1) * (factor - 1) * source_pixels,
                upscaled_pixels=delivered_pixels(spec) if upscale > 1 else 0.0,
                colored_pixels=frames * source_pixels if post and post.color_reference else 0.0,
                candidates=candidates, frames_height=float(frames * spec.height))


@dataclasses.dataclass(frozen=True)
class TimingModel:
    """Seconds per phase as a function of the spec, for one (model, device kind)."""

    phases: dict[str, dict[str, float]]
    """phase -> term -> seconds per unit of the term (see TERMS, PHASE_TERMS)."""
    kinds: dict[str, dict[str, float]]
    """phase -> device kind it was metered on -> share of the phase's seconds. A phase
    missing here is priced on the estimate's device kind, or on CPU for CPU_PHASES."""
    samples: int
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    """The post-processing chunk size the renders were measured with."""
    breaks: dict[str, float] = dataclasses.field(default_factory=dict)
    """phase -> the frames x height below which its "pixels_below_break" term counts."""

    def to_json(self) -> dict:
        return {"version": VERSION, "phases": self.phases, "kinds": self.kinds, "samples": self.samples,
                "chunk_frames": self.chunk_frames, "breaks": self.breaks}

    @classmethod
    def from_json(cls, data: dict) -> "TimingModel | None":
        """Reads a stored model. Version 1 models (denoise, prompt_seconds, per_pixel)
        are read as the same coefficients in this version's terms, version 2 models as
        they are (their terms are still priced); a model this code cannot read (a newer
        version) is None, as if the pair were not calibrated."""
        version = data.get("version", 1)
        try:
            if version == 1:
                return cls._from_version_1(data)
            if version in READABLE_VERSIONS:
                phases = {phase: {term: float(v) for term, v in terms.items()}
                          for phase, terms in data["phases"].items()}
                for phase, terms in phases.items():
                    unknown = set(terms) - set(TERMS)
                    if unknown:
                        raise ValueError(f"unknown terms {sorted(unknown)} in phase {phase}")
                kinds = {phase: {kind: float(v) for kind, v in shares.items()}
                         for phase, shares in data.get("kinds", {}).items()}
                breaks = {phase: float(v) for phase, v in data.get("breaks", {}).items()}
                return cls(phases, kinds, int(data["samples"]), int(data.get("chunk_frames", DEFAULT_CHUNK_FRAMES)),
                           breaks)
            raise ValueError(f"version {version}")
        except (KeyError, TypeError, ValueError) as error:
            log.warning("stored timing model not readable (%s); treating it as uncalibrated", error)
            return None

    @classmethod
    def _from_version_1(cls, data: dict) -> "TimingModel":
        k, c0, c1, c2 = (float(v) for v in data["denoise"])
        phases = {Stage.DENOISING: {"one": k, "steps": c0, "step_tokens": c1, "step_tokens2": c2},
                  Stage.ENCODING_PROMPT: {"one": float(data["prompt_seconds"])}}
        for phase, (p0, p1) in data["per_pixel"].items():
            phases[phase] = {"one": float(p0), "pixels" if phase == Stage.DECODING else "delivered_pixels": float(p1)}
        return cls(phases, {}, int(data["samples"]))

    @classmethod
    def fallback(cls) -> "TimingModel":
        return cls({phase: dict(terms) for phase, terms in FALLBACK.items()}, {}, 0)

    def phase_seconds(self, spec: ResolvedSpec, model: ModelConfig) -> dict[str, float]:
        work = spec_work(spec, model, self.chunk_frames)
        seconds = {}
        for phase, terms in self.phases.items():
            at = self.breaks.get(phase, math.inf)
            value = sum(coefficient * TERMS[term](work, at) for term, coefficient in terms.items())
            # Every candidate is a whole render; post-processing and encoding count the
            # candidates in their terms (scoring chunks) or handle only the chosen clip.
            seconds[phase] = value * work.candidates if phase in PER_CANDIDATE_PHASES else value
        return seconds

    def kind_shares(self, phase: str, device_kind: str) -> dict[str, float]:
        """Where a phase is metered: {device kind: share of its seconds}."""
        return self.kinds.get(phase) or {"CPU" if phase in CPU_PHASES else device_kind: 1.0}


def _nonnegative_fit(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0."""
    from scipy.optimize import nnls  # only fits need it, not every estimate

    return nnls(features, targets)[0]


def fit_relative(features: np.ndarray, targets: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Non-negative coefficients minimising the absolute relative error |f.c / y - 1|
    (iteratively reweighted least squares from the least-squares relative fit): a
    median-like fit, which renders slowed down by other work on the machine barely move."""
    targets = np.maximum(targets, 1e-6)
    # Rows scaled by 1/target: residuals are relative errors.
    features = features / targets[:, None]
    # Columns span many orders of magnitude (1, T, T^2, pixels): scale them for a stable solve.
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    features = features / scale
    ones = np.ones(len(targets))
    coefficients = _nonnegative_fit(features, ones)
    for _ in range(iterations):
        residuals = np.abs(features @ coefficients - 1.0)
        # L1 by reweighting: weight 1/|r|, floored so that exact fits do not take over.
        weights = 1.0 / np.sqrt(np.maximum(residuals, 0.01))
        updated = _nonnegative_fit(features * weights[:, None], weights)
        if np.allclose(updated, coefficients, rtol=1e-6, atol=1e-12):
            break
        coefficients = updated
    return coefficients / scale


def fit_timing_model(samples: Sequence[tuple[ResolvedSpec, list[tuple[str, str, float]]]],
                     model: ModelConfig, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> TimingModel:
    """Fits from (spec, [(phase, device kind, seconds)]) of succeeded renders."""
    if not samples:
        raise ValueError(f"no measured renders of {model.name} to fit a timing model from")
    rows: dict[str, list[tuple[Work, float]]] = {}
    kind_seconds: dict[str, dict[str, float]] = {}
    for spec, timings in samples:
        work = spec_work(spec, model, chunk_frames)
        totals: dict[str, float] = {}
        for phase, kind, seconds in timings:
            totals[phase] = totals.get(phase, 0.0) + seconds
            shares = kind_seconds.setdefault(phase, {})
            shares[kind] = shares.get(kind, 0.0) + seconds
        for phase, seconds in totals.items():
            if phase not in PHASE_TERMS:
                continue  # a phase this model does not price (LOADING, say): not part of a render's cost
            per = work.candidates if phase in PER_CANDIDATE_PHASES else 1
            rows.setdefault(phase, []).append((work, seconds / per))
    phases, breaks = {}, {}
    for phase, data in rows.items():
        terms = PHASE_TERMS[phase]
        targets = np.array([seconds for _, seconds in data])
        best = None
        for at in _break_candidates([work for work, _ in data]) if phase in BREAK_PHASES else [math.inf]:
            features = np.array([[TERMS[term](work, at) for term in terms] for work, _ in data])
            coefficients = fit_relative(features, targets)
            loss = float(np.sum(np.abs(features @ coefficients / np.maximum(targets, 1e-6) - 1.0)))
            # A break must earn its place: a clearly better fit than none, by more than
            # the solver's rounding when the fit without it is already exact.
            if best is None or best[0] - loss > max(BREAK_GAIN * best[0], EXACT_FIT_LOSS * len(targets)):
                best = (loss, at, coefficients)
        _, at, coefficients = best
        phases[phase] = {term: float(c) for term, c in zip(terms, coefficients)}
        if at != math.inf:
            breaks[phase] = at
        elif "pixels_below_break" in terms:  # no break: the term is just more pixels
            phases[phase]["pixels"] += phases[phase].pop("pixels_below_break")
    # Each phase's fit lands on its median, and a median of a sum of right-skewed parts
    # (a render is slowed, never sped up, by whatever else the machine does) lies above
    # the sum of their medians: one factor over every phase puts the renders' totals,
    # what is charged, on their median too.
    timing = TimingModel(phases, {}, len(samples), chunk_frames, breaks)
    predicted, measured = [], []
    for spec, timings in samples:
        total = sum(seconds for phase, _, seconds in timings if phase in phases)
        if total > 0:
            predicted.append(sum(timing.phase_seconds(spec, model).values()))
            measured.append(total)
    factor = _median_ratio(np.array(measured), np.array(predicted))
    phases = {phase: {term: c * factor for term, c in terms.items()} for phase, terms in phases.items()}
    kinds = {}
    for phase, by_kind in kind_seconds.items():
        total = sum(by_kind.values())
        if phase in phases and total > 0:
            kinds[phase] = {kind: seconds / total for kind, seconds in sorted(by_kind.items())}
    return TimingModel(phases, kinds, len(samples), chunk_frames, breaks)


def _median_ratio(measured: np.ndarray, predicted: np.ndarray) -> float:
    """The median of measured / predicted (1.0 when nothing is predicted): the factor
    that puts the median render's predicted total on its measured total."""
    keep = (predicted > 0) & (measured > 0)
    return float(np.median(measured[keep] / predicted[keep])) if keep.any() else 1.0


def _break_candidates(works: Sequence[Work]) -> list[float]:
    """No break, then midpoints between the measured frames x heights (at most
    MAX_BREAK_CANDIDATES of them, spread evenly), each with measurements on both sides."""
    values = sorted({work.frames_height for work in works})
    midpoints = [(a + b) / 2 for a, b in zip(values, values[1:])]
    if len(midpoints) > MAX_BREAK_CANDIDATES:
        picks = np.linspace(0, len(midpoints) - 1, MAX_BREAK_CANDIDATES).round().astype(int)
        midpoints = [midpoints[i] for i in sorted(set(picks))]
    return [math.inf] + midpoints


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
    timing = timing or TimingModel.fallback()
    phases = timing.phase_seconds(spec, model)
    # Priced as the meter prices a render: each phase on the kind it runs on, each
    # (phase, kind) charge rounded to nanodollars.
    timings = [(phase, kind, seconds * share) for phase, seconds in phases.items()
               for kind, share in timing.kind_shares(phase, device_kind).items()]
    nanodollars = sum(charge.nanodollars for charge in price_timings(prices, timings, spec.surcharge))
    return Estimate(sum(phases.values()), nanodollars, device_kind, phases, calibrated)
