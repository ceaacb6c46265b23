"""Post-processing algorithms on synthetic clips whose truth is known:
interpolation, upscaling, color matching, quality scores, chunk planning and
segment encoding. Fast, CPU only, no model weights."""

from __future__ import annotations

import io
import json
import math

import cv2
import numpy as np
import pytest
import torch

from farm.postproc import quality
from farm.postproc.chunks import Chunk, join_frames, join_interpolated, plan_chunks
from farm.postproc.color import ColorStats, color_transform, lab_statistics, match_color
from farm.postproc.encode import encode_mp4, probe_mp4
from farm.postproc.interpolate import interpolate, interpolate_to_fps
from farm.postproc.quality import PairMeasurements, measure_pairs, quality_scores, score
from farm.postproc.segments import concat_segments, encode_segment
from farm.postproc.upscale import LearnedUpscaler, upscale, upscaled_size

# --------------------------------------------------------------------------- synthetic clips


def _texture(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std color texture with structure at several scales (like
    natural images: coarse-to-fine flow needs something to see at coarse scales)."""
    layers = [
        cv2.GaussianBlur(rng.normal(size=(height, width, 3)).astype(np.float32), (0, 0), scale) * scale**0.8
        for scale in (sigma, 3 * sigma, 8 * sigma)
    ]
    texture = sum(layers)
    return (texture - texture.mean()) / texture.std()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _moving_square_clip(
    positions: list[tuple[float, float]], *, height: int = 192, width: int = 256, size: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a textured square (top-left corner at each of positions,
    sub-pixel allowed) over a static textured background; and the square's
    texture, to find it again."""
    rng = np.random.default_rng(seed)
    background = 110 + 35 * _texture(rng, height, width, 2.0)
    square = 150 + 55 * _texture(rng, size, size, 1.5)
    frames = []
    for left, top in positions:
        shift = np.float32([[1, 0, left], [0, 1, top]])
        placed = cv2.warpAffine(square, shift, (width, height), flags=cv2.INTER_LINEAR)
        coverage = cv2.warpAffine(np.ones((size, size), np.float32), shift, (width, height), flags=cv2.INTER_LINEAR)
        frames.append(_to_uint8(background * (1 - coverage[..., None]) + placed * coverage[..., None]))
    return np.stack(frames), _to_uint8(square)


def _locate(frame: np.ndarray, template: np.ndarray) -> tuple[float, float]:
    """Top-left corner of template in frame, sub-pixel (parabola through the
    normalized cross-correlation peak and its neighbours)."""
    response = cv2.matchTemplate(frame, template, cv2.TM_CCOEFF_NORMED)
    _, _, _, (x, y) = cv2.minMaxLoc(response)

    def refine(before: float, peak: float, after: float) -> float:
        curvature = before - 2 * peak + after
        return 0.0 if curvature == 0 else 0.5 * (before - after) / curvature

    dx = refine(*response[y, x - 1 : x + 2]) if 0 < x < response.shape[1] - 1 else 0.0
    dy = refine(*response[y - 1 : y + 2, x]) if 0 < y < response.shape[0] - 1 else 0.0
    return x + dx, y + dy


def _linear_positions(count: int, step: tuple[float, float], start=(40.0, 50.0)) -> list[tuple[float, float]]:
    return [(start[0] + step[0] * index, start[1] + step[1] * index) for index in range(count)]


@pytest.fixture(scope="module")
def clean_clip() -> np.ndarray:
    """16 frames of a square gliding 4 px right and 2 px down per frame."""
    frames, _ = _moving_square_clip(_linear_positions(16, (4.0, 2.0)))
    return frames


# --------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("step", [(7.0, 3.0), (-5.0, 6.0), (11.0, 0.0)])
def test_interpolated_square_lies_halfway(step):
    positions = _linear_positions(4, step)
    frames, square = _moving_square_clip(positions)
    output = interpolate(frames, 2)
    for pair in range(3):
        found = _locate(output[2 * pair + 1], square)
        (left0, top0), (left1, top1) = positions[pair], positions[pair + 1]
        expected = ((left0 + left1) / 2, (top0 + top1) / 2)
        error = math.hypot(found[0] - expected[0], found[1] - expected[1])
        assert error < 1.5, f"pair {pair}: square at {found}, expected {expected}"


def test_interpolated_square_at_thirds():
    positions = _linear_positions(3, (9.0, -6.0))
    frames, square = _moving_square_clip(positions)
    output = interpolate(frames, 3)
    assert len(output) == 7
    for pair in range(2):
        for step in (1, 2):
            t = step / 3
            found = _locate(output[3 * pair + step], square)
            expected = tuple(a + t * (b - a) for a, b in zip(positions[pair], positions[pair + 1], strict=True))
            assert math.hypot(found[0] - expected[0], found[1] - expected[1]) < 1.5


def test_interpolated_pan_matches_the_true_intermediate_frame():
    # The whole picture moves (a camera pan), 5.5 px right and 1.5 px up per
    # frame; the true frame halfway is rendered from the same texture.
    rng = np.random.default_rng(3)
    world = 120 + 40 * _texture(rng, 260, 340, 2.0)

    def view(left: float, top: float) -> np.ndarray:
        shift = np.float32([[1, 0, -left], [0, 1, -top]])
        return _to_uint8(cv2.warpAffine(world, shift, (256, 192), flags=cv2.INTER_LINEAR))

    frames = np.stack([view(20 + 5.5 * i, 40 - 1.5 * i) for i in range(3)])
    truth = np.stack([view(20 + 5.5 * (i + 0.5), 40 - 1.5 * (i + 0.5)) for i in range(2)])
    middles = interpolate(frames, 2)[1::2]
    interior = (slice(None), slice(8, -8), slice(8, -8))  # content entering at the edges is unknowable
    error = middles[interior].astype(np.float32) - truth[interior]
    psnr = 10 * np.log10(255.0**2 / np.mean(error**2))
    naive = (frames[:-1].astype(np.float32) + frames[1:]) / 2 - truth
    naive_psnr = 10 * np.log10(255.0**2 / np.mean(naive[interior] ** 2))
    assert psnr > 35, f"PSNR {psnr:.1f} dB"
    assert psnr > naive_psnr + 8, f"flow {psnr:.1f} dB vs plain blending {naive_psnr:.1f} dB"


def test_interpolation_frame_count_and_originals_kept(clean_clip):
    frames = clean_clip[:6]
    doubled = interpolate(frames, 2)
    assert doubled.shape == (11, *frames.shape[1:]) and doubled.dtype == np.uint8
    assert np.array_equal(doubled[::2], frames)
    tripled = interpolate(frames, 3)
    assert len(tripled) == 16 and np.array_equal(tripled[::3], frames)
    assert np.array_equal(interpolate(frames, 1), frames)
    assert np.array_equal(interpolate(frames[:1], 4), frames[:1])


def test_tiny_frames_interpolate(clean_clip):
    # Smaller than DIS's patches: the flow image is padded for DIS and cropped back.
    tiny = np.ascontiguousarray(clean_clip[:3, 60:66, 50:60])
    output = interpolate(tiny, 2)
    assert output.shape == (5, 6, 10, 3) and np.array_equal(output[::2], tiny)
    assert quality_scores(tiny).measurements.frame_differences


def test_still_frames_interpolate_to_the_same_frame(clean_clip):
    still = np.repeat(clean_clip[:1], 3, axis=0)
    assert np.array_equal(interpolate(still, 2), np.repeat(clean_clip[:1], 5, axis=0))


@pytest.mark.parametrize("factor", [2, 3])
def test_chunked_interpolation_equals_whole_clip(clean_clip, factor):
    frames = clean_clip[:11]
    whole = interpolate(frames, factor)
    chunks = plan_chunks(len(frames), chunk_frames=4, overlap=1)
    outputs = [interpolate(frames[chunk.frames], factor) for chunk in chunks]
    joined = join_interpolated(outputs, factor)
    assert joined.shape == whole.shape
    assert np.array_equal(joined, whole)
    # Where each chunk's share starts in the joined clip (e.g. for encoding it as a segment).
    for chunk, output in zip(chunks, outputs, strict=True):
        share = output[1:] if chunk.leading_overlap else output
        start = chunk.interpolated_start(factor)
        assert np.array_equal(whole[start : start + len(share)], share)


def test_chunked_interpolation_with_wider_overlap(clean_clip):
    frames = clean_clip[:10]
    chunks = plan_chunks(len(frames), chunk_frames=5, overlap=2)
    joined = join_interpolated([interpolate(frames[chunk.frames], 2) for chunk in chunks], 2, overlap=2)
    assert np.array_equal(joined, interpolate(frames, 2))


def test_interpolate_validates_its_input(clean_clip):
    with pytest.raises(ValueError, match="factor"):
        interpolate(clean_clip[:2], 0)
    with pytest.raises(ValueError, match="factor"):
        interpolate(clean_clip[:2], 1.5)
    with pytest.raises(ValueError, match="uint8"):
        interpolate(clean_clip[:2].astype(np.float32), 2)
    with pytest.raises(ValueError, match="empty"):
        interpolate(clean_clip[:0], 2)


def test_interpolate_to_fps_integer_ratios_only(clean_clip):
    frames = clean_clip[:3]
    assert len(interpolate_to_fps(frames, 24, 48)) == 5
    assert len(interpolate_to_fps(frames, 16, 48)) == 7
    assert len(interpolate_to_fps(frames, 30000 / 1001, 60000 / 1001)) == 5
    assert np.array_equal(interpolate_to_fps(frames, 24, 24), frames)
    with pytest.raises(ValueError, match=r"fps_in=24.*fps_out=30"):
        interpolate_to_fps(frames, 24, 30)
    with pytest.raises(ValueError, match=r"fps_in=48.*fps_out=24"):
        interpolate_to_fps(frames, 48, 24)


# --------------------------------------------------------------------------- upscaling


@pytest.mark.parametrize(
    ("size", "factor", "expected"),
    [
        ((64, 96), 2, (128, 192)),
        ((64, 96), 1.5, (96, 144)),
        ((512, 768), 1.5, (768, 1152)),
        ((70, 90), 1.5, (106, 136)),
    ],
)
def test_upscaled_size_is_exact_and_even(size, factor, expected):
    frames = np.full((2, *size, 3), 77, dtype=np.uint8)
    output = upscale(frames, factor)
    assert output.shape == (2, *expected, 3) and output.dtype == np.uint8
    assert upscaled_size(*size, factor) == expected
    assert np.all(output == 77)  # Lanczos keeps flat areas flat


def test_upscaled_size_rounding():
    # 70 * 1.5 = 105: nearest even is 104 or 106, a tie; halves round up.
    assert upscaled_size(70, 90, 1.5) == (106, 136)
    assert upscaled_size(70, 90, 1.5, even=False) == (105, 135)
    assert upscaled_size(100, 100, 0.5) == (50, 50)
    with pytest.raises(ValueError):
        upscaled_size(10, 10, 0)


def test_lanczos_upscale_is_sharp_and_chunkable(clean_clip):
    frames = clean_clip[:5]
    output = upscale(frames, 2)
    # Shrinking back recovers the original far better than the blur of bilinear would allow.
    back = np.stack([cv2.resize(frame, (256, 192), interpolation=cv2.INTER_AREA) for frame in output])
    assert np.abs(back.astype(np.int16) - frames).mean() < 1.5
    chunks = plan_chunks(len(frames), 2, overlap=0)
    assert np.array_equal(join_frames([upscale(frames[chunk.frames], 2) for chunk in chunks]), output)


class _TinySuperResolution(torch.nn.Module):
    """2x super-resolution net of the Real-ESRGAN interface (image in [0, 1]
    -> image at twice the size) with random weights: two 3x3 convolutions
    before the pixel shuffle, so each output pixel sees 2 input pixels around it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.to_subpixels = torch.nn.Conv2d(8, 3 * 4, 3, padding=1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shuffle(self.to_subpixels(torch.relu(self.features(image)))))


def test_tiled_learned_upscale_equals_untiled():
    model = _TinySuperResolution().eval()
    image = torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        untiled = model(image.unsqueeze(0))[0]
    tiled = LearnedUpscaler(model, 2, tile=16, overlap=4, device="cpu").upscale_image(image)
    assert tiled.shape == untiled.shape == (3, 74, 100)
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=1e-5)
    # Without overlap the tiles see zero padding at their seams: the check above is not vacuous.
    seams_visible = LearnedUpscaler(model, 2, tile=16, overlap=0, device="cpu").upscale_image(image)
    assert (seams_visible - untiled).abs().max() > 1e-3


def test_learned_upscaler_on_frames(clean_clip):
    model = _TinySuperResolution().eval()
    upscaler = LearnedUpscaler(model, 2, tile=64, overlap=4, device="cpu")
    frames = clean_clip[:2, :40, :60]
    output = upscaler.upscale(frames)
    assert output.shape == (2, 80, 120, 3) and output.dtype == np.uint8
    with torch.inference_mode():
        reference = model(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    expected = (reference.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(output.astype(np.int16) - expected).max() <= 1
    assert upscaler.upscale(frames, factor=1.5).shape == (2, 60, 90, 3)


def test_learned_upscaler_from_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        LearnedUpscaler.from_file(tmp_path / "RealESRGAN_x4plus.pth")


def test_learned_upscaler_loads_esrgan_weights_through_spandrel(tmp_path, clean_clip):
    # spandrel is optional (the gpu extra): it needs torchvision, which has no build for
    # the CPU torch 2.13 used here. Where it is installed, the real loading path runs.
    pytest.importorskip("spandrel", reason="spandrel (gpu extra) needs torchvision, absent on CPU-only CI")
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    weights = tmp_path / "tiny_esrgan_x2.pth"
    torch.save(ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2).state_dict(), weights)
    upscaler = LearnedUpscaler.from_file(weights, tile=32, overlap=8, device="cpu")
    assert upscaler.scale == 2
    assert upscaler.upscale(clean_clip[:1, :48, :64]).shape == (1, 96, 128, 3)


# --------------------------------------------------------------------------- color


def _tinted_clip(rng: np.random.Generator, tint: tuple[float, float, float], count: int = 8) -> np.ndarray:
    """A texture panning sideways, tinted per channel: steady light, moving content."""
    world = 120 + 20 * _texture(rng, 96, 128 + 4 * count, 2.0)
    frames = [world[:, 4 * index : 4 * index + 128] * np.asarray(tint, np.float32) for index in range(count)]
    return _to_uint8(np.stack(frames))


def _per_frame_mean_lightness(frames: np.ndarray) -> np.ndarray:
    return np.array([lab_statistics(frame[None]).mean[0] for frame in frames])


def test_color_statistics_serialise_and_combine():
    frames = _tinted_clip(np.random.default_rng(4), (1.1, 0.95, 0.8))
    stats = lab_statistics(frames)
    assert ColorStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert stats.pixels == frames.shape[0] * 96 * 128
    parts = [lab_statistics(frames[chunk.frames]) for chunk in plan_chunks(len(frames), 3, overlap=0)]
    combined = ColorStats.combine(parts)
    np.testing.assert_allclose(combined.mean, stats.mean, rtol=1e-6)
    np.testing.assert_allclose(combined.std, stats.std, rtol=1e-5)
    assert combined.pixels == stats.pixels


def test_match_color_reaches_the_reference_without_flicker():
    rng = np.random.default_rng(5)
    warm = _tinted_clip(rng, (1.15, 0.95, 0.75))
    # Steady light but a slow change of the clip's brightness, which must survive unchanged in shape.
    warm = _to_uint8(warm * np.linspace(0.95, 1.05, len(warm))[:, None, None, None])
    cool = _tinted_clip(rng, (0.8, 0.95, 1.15))
    reference = lab_statistics(cool)
    matched = match_color(warm, reference)

    after = lab_statistics(matched)
    np.testing.assert_allclose(after.mean, reference.mean, atol=1.0)
    np.testing.assert_allclose(after.std, reference.std, atol=1.5)
    # One transform for all frames: per-frame lightness moves by the same affine map.
    scale, offset = color_transform(lab_statistics(warm), reference)
    before_lightness, after_lightness = _per_frame_mean_lightness(warm), _per_frame_mean_lightness(matched)
    np.testing.assert_allclose(after_lightness, before_lightness * scale[0] + offset[0], atol=0.3)
    assert abs(np.ptp(after_lightness) - scale[0] * np.ptp(before_lightness)) < 0.3


def test_match_color_strength_and_chunks():
    rng = np.random.default_rng(6)
    frames = _tinted_clip(rng, (1.1, 1.0, 0.85))
    reference = lab_statistics(_tinted_clip(rng, (0.85, 1.0, 1.1)))
    source = lab_statistics(frames)
    # strength 0: an identity up to the float Lab round trip.
    assert np.abs(match_color(frames, reference, 0.0).astype(np.int16) - frames).max() <= 1
    halfway = lab_statistics(match_color(frames, reference, 0.5)).mean
    np.testing.assert_allclose(halfway, (np.array(source.mean) + reference.mean) / 2, atol=1.0)
    # Chunks given the clip's statistics apply the clip's transform: identical frames.
    chunks = plan_chunks(len(frames), 3, overlap=0)
    joined = join_frames([match_color(frames[chunk.frames], reference, source=source) for chunk in chunks])
    assert np.array_equal(joined, match_color(frames, reference))
    with pytest.raises(ValueError, match="strength"):
        match_color(frames, reference, 1.5)


# --------------------------------------------------------------------------- quality scores


@pytest.fixture(scope="module")
def defective_clips(clean_clip) -> dict[str, np.ndarray]:
    flickering = clean_clip.copy()
    flickering[1::2] = np.clip(flickering[1::2].astype(np.int16) + 12, 0, 255).astype(np.uint8)
    frozen = np.repeat(clean_clip[:1], len(clean_clip), axis=0)
    glitched = clean_clip.copy()
    glitched[8] = np.random.default_rng(7).integers(0, 256, glitched[8].shape, dtype=np.uint8)
    stuttering = clean_clip[np.repeat(np.arange(0, len(clean_clip), 2), 2)]  # every frame shown twice
    return {"flicker": flickering, "frozen": frozen, "glitch": glitched, "stutter": stuttering}


@pytest.fixture(scope="module")
def scores(clean_clip, defective_clips) -> dict[str, quality.QualityScores]:
    clips = {"clean": clean_clip, **defective_clips}
    return {name: quality_scores(clip) for name, clip in clips.items()}


def test_clean_clip_scores_well(scores):
    clean = scores["clean"]
    assert clean.temporal_consistency > 0.9
    assert clean.flicker < 0.3
    assert clean.motion_smoothness > 0.9
    assert not clean.frozen
    assert clean.issues() == []
    assert 3.0 < clean.mean_motion_px < 5.0  # the square moves sqrt(4^2 + 2^2) = 4.5 px per frame


def test_flicker_score_separates_flicker(scores):
    assert scores["flicker"].flicker > quality.MAX_FLICKER_LEVELS
    assert scores["flicker"].flicker > 20 * scores["clean"].flicker
    assert all(scores[name].flicker < quality.MAX_FLICKER_LEVELS for name in ("clean", "frozen", "stutter"))
    assert any("flicker" in issue for issue in scores["flicker"].issues())


def test_frozen_flag_separates_frozen_video(scores):
    assert scores["frozen"].frozen and scores["frozen"].frozen_pair_fraction == 1.0
    assert not any(scores[name].frozen for name in ("clean", "flicker", "glitch", "stutter"))


def test_temporal_consistency_separates_a_glitch_frame(scores):
    assert scores["glitch"].temporal_consistency < quality.MIN_TEMPORAL_CONSISTENCY
    assert scores["clean"].temporal_consistency > 0.9
    # Flicker changes every frame alike: no single frame stands out.
    assert scores["flicker"].temporal_consistency > 0.9


def test_motion_smoothness_separates_stutter_and_glitch(scores):
    assert scores["stutter"].motion_smoothness < quality.MIN_MOTION_SMOOTHNESS
    assert scores["glitch"].motion_smoothness < scores["clean"].motion_smoothness - 0.1
    assert scores["flicker"].motion_smoothness > 0.9  # brightness changes are not motion


def test_steady_fade_is_not_flicker(clean_clip):
    fading = _to_uint8(clean_clip.astype(np.float32) * np.linspace(1.0, 0.6, len(clean_clip))[:, None, None, None])
    assert quality_scores(fading).flicker < 0.3


def test_quality_measured_in_chunks_equals_whole(clean_clip):
    whole = measure_pairs(clean_clip)
    chunks = plan_chunks(len(clean_clip), 6, overlap=1)
    joined = PairMeasurements.concatenate(measure_pairs(clean_clip[chunk.frames]) for chunk in chunks)
    assert joined == whole and len(whole.frame_differences) == len(clean_clip) - 1
    assert score(joined) == score(whole)


def test_quality_scores_serialise_and_handle_tiny_clips(clean_clip):
    scores = quality_scores(clean_clip[:4])
    assert json.loads(json.dumps(scores.to_dict()))["temporal_consistency"] == scores.temporal_consistency
    single = quality_scores(clean_clip[:1])
    assert single.temporal_consistency == 1.0 and single.motion_smoothness == 1.0
    assert single.flicker == 0.0 and not single.frozen


# --------------------------------------------------------------------------- chunk planning


def test_plan_chunks_with_seam_overlap():
    chunks = plan_chunks(121, 32, overlap=1)
    assert [(chunk.start, chunk.end) for chunk in chunks] == [(0, 32), (31, 63), (62, 94), (93, 121)]
    assert [chunk.leading_overlap for chunk in chunks] == [0, 1, 1, 1]
    # Every pair of neighbouring frames lies in exactly one chunk.
    pairs = [pair for chunk in chunks for pair in range(chunk.start, chunk.end - 1)]
    assert pairs == list(range(120))


def test_plan_chunks_partition_and_edges():
    chunks = plan_chunks(10, 4, overlap=0)
    assert [(chunk.start, chunk.end) for chunk in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert plan_chunks(0, 4) == []
    assert plan_chunks(1, 4) == [Chunk(0, 1)]
    assert plan_chunks(5, 4, overlap=1) == [Chunk(0, 4), Chunk(3, 5, 1)]
    with pytest.raises(ValueError):
        plan_chunks(10, 1, overlap=1)
    with pytest.raises(ValueError):
        plan_chunks(-1, 4)


def test_join_refuses_chunks_that_are_not_neighbours(clean_clip):
    first, second = interpolate(clean_clip[0:3], 2), interpolate(clean_clip[3:5], 2)
    with pytest.raises(ValueError, match="seam"):
        join_interpolated([first, second], 2)
    with pytest.raises(ValueError, match="frames"):
        join_interpolated([first, second[:2]], 2)
    assert len(join_frames([clean_clip[0:3], clean_clip[2:5]], overlap=1)) == 5


# --------------------------------------------------------------------------- segments


def _numbered_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Frame i is flat gray level 8 * i + 12, so decoded frames say their index."""
    levels = 8 * np.arange(count) + 12
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).astype(np.uint8)


def _decoded_indices(pixels: np.ndarray) -> list[int]:
    return [int(round((float(frame.mean()) - 12) / 8)) for frame in pixels]


def test_concatenated_segments_have_every_frame_in_order():
    frames = _numbered_frames(23)
    bounds = [(0, 8), (8, 13), (13, 23)]
    segments = [encode_segment(frames[start:end], 24, start) for start, end in bounds]
    joined = concat_segments(segments, 24)
    probe = probe_mp4(joined)
    assert probe["codec"] == "h264"
    assert (probe["width"], probe["height"]) == (96, 64)
    assert probe["frames"] == 23
    assert probe["fps"] == pytest.approx(24.0)
    assert probe["duration_s"] == pytest.approx(23 / 24, abs=1e-3)
    assert _decoded_indices(probe["pixels"]) == list(range(23))
    # Same result as encoding the clip in one go.
    whole = probe_mp4(encode_mp4(frames, 24))
    assert (whole["frames"], whole["duration_s"]) == (probe["frames"], probe["duration_s"])


def test_segment_timestamps_start_at_its_first_frame():
    import av

    segment = encode_segment(_numbered_frames(4), 24, start_frame=40)
    with av.open(io.BytesIO(segment)) as container:
        stream = container.streams.video[0]
        packets = [packet for packet in container.demux(stream) if packet.size]
        first_frame = packets[0].pts * stream.time_base * 24
    assert packets[0].is_keyframe
    assert first_frame == pytest.approx(40, abs=0.05)  # the MP4 edit list keeps it to the millisecond
    assert probe_mp4(segment)["frames"] == 4


def test_concat_segments_at_ntsc_rate():
    frames = _numbered_frames(9)
    fps = 30000 / 1001
    joined = concat_segments([encode_segment(frames[:4], fps, 0), encode_segment(frames[4:], fps, 4)], fps)
    probe = probe_mp4(joined)
    assert probe["frames"] == 9 and probe["fps"] == pytest.approx(fps, rel=1e-6)
    assert probe["duration_s"] == pytest.approx(9 / fps, abs=1e-3)


def test_concat_refuses_segments_that_differ():
    small, large = _numbered_frames(3), _numbered_frames(3, height=32, width=48)
    with pytest.raises(ValueError, match="parameters"):
        concat_segments([encode_segment(small, 24, 0), encode_segment(large, 24, 3)], 24)
    with pytest.raises(ValueError):
        concat_segments([], 24)
