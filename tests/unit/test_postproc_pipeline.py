"""Frame-parallel post-processing of whole clips (farm.postproc.pipeline) with chunks
run in local threads: chunked output equals unchunked output, frame counts, sizes,
timestamps, encoder settings, metering and the learned-interpolator path. No Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from farm.postproc.color import ColorStats, lab_statistics, match_color
from farm.postproc.encode import encode_mp4, probe_mp4
from farm.postproc.interpolate import LearnedInterpolator, interpolate
from farm.domain.states import Stage
from farm.postproc.pipeline import (
    LocalChunkRunner,
    measure_clip,
    postprocess_clip,
    reference_statistics,
    statistics_of_mp4,
    store_clip,
)
from farm.postproc.quality import quality_scores
from farm.postproc.upscale import upscale
from tests.unit.test_postproc import _linear_positions, _moving_square_clip


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """13 frames of 96x128: a square gliding 3 px right and 2 px down per frame."""
    frames, _ = _moving_square_clip(_linear_positions(13, (3.0, 2.0), start=(20.0, 20.0)), height=96, width=128,
                                    size=32)
    return frames


REFERENCE = ColorStats(mean=(60.0, 12.0, -8.0), std=(18.0, 6.0, 7.0), pixels=1)


def run(frames, chunk_frames, workers=2, **options):
    async def go():
        runner = LocalChunkRunner(workers=workers)
        try:
            stored = await store_clip(frames, runner, chunk_frames)
            return stored, await postprocess_clip(stored, runner, **options)
        finally:
            runner.close()

    return asyncio.run(go())


def test_chunked_output_equals_unchunked_frame_for_frame(clip):
    options = dict(fps=12, interpolation_factor=2, upscale_factor=2, color_reference=REFERENCE, color_strength=0.8,
                   return_frames=True)
    stored, chunked = run(clip, chunk_frames=4, **options)
    assert len(stored.chunks) == 4  # 0-4, 3-7, 6-10, 9-13
    _, whole = run(clip, chunk_frames=len(clip), **options)

    expected = upscale(interpolate(match_color(clip, REFERENCE, 0.8, source=reference_statistics(clip)), 2), 2)
    assert chunked.frames.shape == expected.shape == (25, 192, 256, 3)
    assert np.array_equal(whole.frames, expected)
    assert np.array_equal(chunked.frames, expected)
    # The quality of the chunked clip is that of the whole one, pair for pair.
    assert chunked.quality == whole.quality
    assert len(chunked.quality.measurements.frame_differences) == 24


def test_joined_mp4_has_every_frame_in_order_at_the_right_rate(clip):
    _, result = run(clip, chunk_frames=5, fps=12, interpolation_factor=2, upscale_factor=2, return_frames=True)
    probe = probe_mp4(result.video)
    assert (probe["frames"], probe["width"], probe["height"]) == (25, 256, 192)
    assert (result.num_frames, result.width, result.height, result.fps) == (25, 256, 192, 24)
    assert probe["fps"] == pytest.approx(24.0)
    assert probe["duration_s"] == pytest.approx(25 / 24, abs=1e-3)
    # Up to encoder rounding, the joined segments decode to the frames, as one whole encode does.
    joined_error = np.abs(probe["pixels"].astype(np.int16) - result.frames).mean()
    whole_error = np.abs(probe_mp4(encode_mp4(result.frames, 24))["pixels"].astype(np.int16) - result.frames).mean()
    # (The synthetic texture is noise-like, hard for H.264 at CRF 18: a few levels of error either way.)
    assert joined_error < 6.0 and joined_error < whole_error * 1.15 + 0.2, (joined_error, whole_error)


def test_a_clip_without_post_processing_still_gets_chunked_encoding_and_scores(clip):
    stored, result = run(clip, chunk_frames=4, fps=8, return_frames=True)
    assert np.array_equal(result.frames, clip)
    assert probe_mp4(result.video)["frames"] == 13
    assert result.quality == quality_scores(clip)
    assert result.statistics is not None and result.statistics.mean == pytest.approx(
        reference_statistics(clip).mean, abs=1e-6)


def test_color_harmonization_moves_lab_means_to_the_reference(clip):
    _, result = run(clip, chunk_frames=4, fps=8, color_reference=REFERENCE, return_frames=True)
    means = lab_statistics(result.frames).mean
    assert means == pytest.approx(REFERENCE.mean, abs=1.5)
    # One transform for the whole clip: each frame's brightness follows the original's.
    original = [lab_statistics(clip[i:i + 1]).mean[0] for i in range(len(clip))]
    matched = [lab_statistics(result.frames[i:i + 1]).mean[0] for i in range(len(clip))]
    assert np.ptp(np.array(matched) - np.array(original)) < 1.0


def test_encoder_settings_are_honoured(clip):
    big = np.repeat(np.repeat(clip, 2, axis=1), 2, axis=2)
    sizes = {}
    for name, settings in {"crf10": dict(crf=10), "crf40": dict(crf=40), "100k": dict(bitrate_kbps=100),
                           "3000k": dict(bitrate_kbps=3000)}.items():
        _, result = run(big, chunk_frames=5, fps=8, preset="ultrafast", **settings)
        assert probe_mp4(result.video)["frames"] == 13
        sizes[name] = len(result.video)
    assert sizes["crf40"] < sizes["crf10"] / 2, sizes
    assert sizes["100k"] < sizes["3000k"] / 2, sizes


def test_device_time_is_metered_by_phase(clip):
    _, result = run(clip, chunk_frames=4, fps=8, interpolation_factor=2)
    phases = {(phase, kind): seconds for phase, kind, seconds in result.timings}
    assert set(phases) == {(Stage.POSTPROCESSING, "CPU"), (Stage.ENCODING, "CPU")}
    assert all(seconds > 0 for seconds in phases.values())
    report = result.report
    assert len(report["chunks"]) == 4 and report["retries"] == 0
    assert {"interpolate", "quality", "encode"} <= set(report["stage_seconds"])


def test_measure_clip_scores_like_the_whole_clip(clip):
    async def go():
        runner = LocalChunkRunner(workers=2)
        stored = await store_clip(clip, runner, 4)
        scores, timings, _ = await measure_clip(stored, runner)
        runner.close()
        return scores, timings

    scores, timings = asyncio.run(go())
    assert scores == quality_scores(clip)
    assert timings and timings[0][0] == Stage.POSTPROCESSING


def test_statistics_of_an_mp4_match_its_frames(clip):
    stats = statistics_of_mp4(encode_mp4(clip, 8))
    assert stats.mean == pytest.approx(reference_statistics(clip).mean, abs=1.0)


class _Blend(torch.nn.Module):
    """A stand-in for a RIFE export: the plain blend of its two frames."""

    def forward(self, frame0: torch.Tensor, frame1: torch.Tensor, t: float) -> torch.Tensor:
        return frame0 * (1.0 - t) + frame1 * t


def test_learned_interpolator_loads_torchscript_and_chunks_exactly(clip, tmp_path):
    path = tmp_path / "rife.pt"
    torch.jit.save(torch.jit.script(_Blend()), str(path))
    learned = LearnedInterpolator.from_file(path, device="cpu")
    frames = learned.interpolate(clip[:5, :90, :120], 3)
    assert frames.shape == (13, 90, 120, 3)
    assert np.array_equal(frames[::3], clip[:5, :90, :120])
    blend = np.round(clip[0, :90, :120].astype(np.float32) * 2 / 3 + clip[1, :90, :120] / 3)
    assert np.abs(frames[1].astype(np.float32) - blend).max() <= 1

    async def go():
        runner = LocalChunkRunner(workers=2, interpolator=learned)
        stored = await store_clip(clip, runner, 4)
        result = await postprocess_clip(stored, runner, fps=8, interpolation_factor=3, return_frames=True)
        runner.close()
        return result

    assert np.array_equal(asyncio.run(go()).frames, learned.interpolate(clip, 3))
    with pytest.raises(FileNotFoundError):
        LearnedInterpolator.from_file(tmp_path / "missing.pt")


def test_quality_gate_and_candidate_ranking(clip):
    from farm.config import QualityGate
    from farm.postproc.quality import gate_failures, overall_score

    clean = quality_scores(clip)
    frozen = quality_scores(np.repeat(clip[:1], 8, axis=0))
    flicker = quality_scores(np.clip(clip.astype(np.int16) + np.where(np.arange(len(clip)) % 2, 12, -12)[
        :, None, None, None], 0, 255).astype(np.uint8))
    assert overall_score(clean) > overall_score(flicker) > overall_score(frozen) == 0.0

    gate = QualityGate(action="fail", max_flicker=1.0, min_temporal_consistency=0.5)
    assert gate_failures(clean, gate) == []
    assert any("flicker" in failure for failure in gate_failures(flicker, gate))
    assert any("frozen" in failure for failure in gate_failures(frozen, gate))
    assert gate_failures(frozen, QualityGate(action="off", max_flicker=0.0)) == []
    assert gate_failures(frozen, QualityGate(action="retry", reject_frozen=False)) == []
