"""The timing model: fitted on recorded timings (not live ones), it predicts them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.config import PriceConfig, Task
from farm.jobs.spec import RenderSpec, ResolvedSpec, resolve_spec
from farm.metering.estimate import TimingModel, estimate_cost, fit_timing_model, latent_tokens
from tests.conftest import sample_models

MODEL = sample_models()["ltx"]
PRICES = PriceConfig()


def spec(width, height, frames, steps, guidance=3.0):
    return resolve_spec(RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="x", width=width, height=height,
                                   num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                                   seed=1), {"ltx": MODEL})


# Timings of real tiny LTX-Video renders on this 2-core machine, recorded by
# `benchmarks/estimates.py --save-samples` (calibration grid over the allowed range).
RECORDED = Path(__file__).parents[1] / "data" / "ltx_tiny_timings.json"


def recorded_samples():
    return [(ResolvedSpec.from_json(json.dumps(item["spec"])), [tuple(t) for t in item["timings"]])
            for item in json.loads(RECORDED.read_text())]


KNOWN = TimingModel(denoise=(0.05, 0.004, 2e-6, 1e-9), prompt_seconds=0.01,
                    per_pixel={"DECODING": (0.01, 1e-7), "ENCODING": (0.005, 2e-7)}, samples=0)
GRID = [(w, h, f, s) for w in (128, 384, 768) for h in (96, 512) for f in (9, 57, 121) for s in (2, 20, 40)]


def samples():
    """Timings that follow KNOWN exactly, to check the fitter itself."""
    return [(spec(*shape), [(phase, "CPU", seconds) for phase, seconds in KNOWN.phase_seconds(spec(*shape),
                                                                                               MODEL).items()])
            for shape in GRID]


def test_latent_tokens_follow_the_vae_compression():
    # LTX: 32x spatial, 8x temporal; guidance doubles the batch.
    assert latent_tokens(spec(768, 512, 121, 1), MODEL) == 16 * 24 * 16 * 2
    assert latent_tokens(spec(768, 512, 121, 1, guidance=1.0), MODEL) == 16 * 24 * 16


def test_fit_recovers_known_coefficients():
    timing = fit_timing_model(samples(), MODEL)
    assert timing.denoise == pytest.approx(KNOWN.denoise, rel=1e-6)
    assert timing.per_pixel["DECODING"] == pytest.approx(KNOWN.per_pixel["DECODING"], rel=1e-6)
    assert timing.prompt_seconds == pytest.approx(KNOWN.prompt_seconds)


def test_fit_on_recorded_timings_predicts_them_back():
    recorded = recorded_samples()
    assert len(recorded) >= 16
    timing = fit_timing_model(recorded, MODEL)
    assert all(c >= 0 for c in timing.denoise)
    errors = sorted(abs(sum(timing.phase_seconds(s, MODEL).values()) - sum(t[2] for t in timings))
                    / sum(t[2] for t in timings) for s, timings in recorded)
    assert errors[len(errors) // 2] < 0.25, f"median relative error {errors[len(errors) // 2]:.1%}"


def test_fit_round_trips_through_json():
    timing = fit_timing_model(samples(), MODEL)
    assert TimingModel.from_json(timing.to_json()) == timing


def test_estimate_grows_with_work_and_prices_by_device():
    timing = fit_timing_model(samples(), MODEL)
    small = estimate_cost(spec(256, 256, 17, 8), MODEL, timing, "CPU", PRICES)
    large = estimate_cost(spec(768, 512, 65, 30), MODEL, timing, "CPU", PRICES)
    assert 0 < small.nanodollars < large.nanodollars and small.calibrated
    on_h100 = estimate_cost(spec(256, 256, 17, 8), MODEL, timing, "H100", PRICES)
    assert on_h100.nanodollars > small.nanodollars


def test_uncalibrated_estimate_is_pessimistic():
    timing = fit_timing_model(samples(), MODEL)
    for shape in GRID:
        fallback = estimate_cost(spec(*shape), MODEL, None, "CPU", PRICES)
        fitted = estimate_cost(spec(*shape), MODEL, timing, "CPU", PRICES)
        assert not fallback.calibrated and fallback.nanodollars >= fitted.nanodollars


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no measured renders"):
        fit_timing_model([], MODEL)


def test_estimates_count_every_candidate_and_the_delivered_pixels():
    from farm.config import Task
    from farm.jobs.spec import PostprocessSpec, RenderSpec, resolve_spec
    from farm.metering.estimate import TimingModel
    from tests.conftest import sample_models

    models = sample_models()
    model = models["ltx"]
    timing = TimingModel.fallback()

    def phases(**post):
        request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="x", width=256, height=256, num_frames=33,
                             postprocess=PostprocessSpec(**post) if post else None)
        return timing.phase_seconds(resolve_spec(request, models), model)

    plain, three = phases(), phases(candidates=3)
    assert three["DENOISING"] == pytest.approx(3 * plain["DENOISING"])
    assert three["DECODING"] == pytest.approx(3 * plain["DECODING"])
    assert three["ENCODING"] == pytest.approx(plain["ENCODING"])  # one clip is delivered
    doubled = phases(interpolation_factor=2, upscale_factor=2)
    # 65 frames of 512x512 delivered instead of 33 of 256x256: encoding grows with them.
    assert doubled["ENCODING"] > 7 * (plain["ENCODING"] - 0.05)
    assert doubled["DENOISING"] == pytest.approx(plain["DENOISING"])
