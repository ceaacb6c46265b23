"""Automatic quality scores of a clip: temporal consistency, flicker, motion
smoothness and frozen video, the failure modes of generated video that a
person spots at once and a loss curve does not.

Everything is measured on pairs of consecutive frames, on grayscale
downscaled to ``ANALYSIS_MAX_SIDE`` (luminance levels 0..255, BT.601 luma),
with one DIS optical flow per pair:

- frame difference: mean |I[i+1] - I[i]|;
- luminance residual: mean of I[i+1] - I[i] warped onto I[i+1] by the flow,
  i.e. the change of brightness that motion does not explain;
- flow magnitude: mean flow length over the pixels that move, in pixels of
  the original frame size.

Pairs are independent, so a clip can be measured chunk by chunk (chunks that
share one seam frame, ``plan_chunks(..., overlap=1)``): concatenating the
chunks' ``PairMeasurements`` gives exactly the clip's, and ``score`` turns
them into the scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import cv2
import numpy as np

from farm.postproc.encode import check_frames
from farm.postproc.interpolate import dense_flow

# Frames are analysed at this size (longer side, pixels): scores describe the
# whole picture, and a small image keeps scoring cheap next to generating.
ANALYSIS_MAX_SIDE = 256
ANALYSIS_FLOW_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM

# Temporal consistency. The largest frame difference may exceed the median by
# this multiple of (median + floor) before the score drops below 1; the floor
# (luminance levels) keeps a nearly static clip's tiny differences from
# making any small change look like an outlier.
TEMPORAL_OUTLIER_TOLERANCE = 1.0
DIFFERENCE_FLOOR_LEVELS = 1.0
# Motion smoothness. A pixel moves if its flow is longer than this (original
# pixels); a pair has motion if at least this fraction of its pixels move;
# the floor keeps jitter of almost-still clips from counting as jerky.
MOVING_PIXEL_PX = 0.5
MOVING_FRACTION_MIN = 0.002
MOTION_FLOOR_PX = 0.5
# Frozen. A pair is frozen if its frame difference is below this many
# luminance levels; a clip is frozen if this fraction of its pairs are.
FROZEN_DIFFERENCE_LEVELS = 0.5
FROZEN_PAIR_FRACTION = 0.9

# What ``QualityScores.issues`` reports as a problem.
MIN_TEMPORAL_CONSISTENCY = 0.5
MAX_FLICKER_LEVELS = 1.0
MIN_MOTION_SMOOTHNESS = 0.6


@dataclasses.dataclass(frozen=True)
class PairMeasurements:
    """Raw per-pair measurements (one entry per consecutive frame pair)."""

    frame_differences: tuple[float, ...]
    luminance_residuals: tuple[float, ...]
    flow_magnitudes: tuple[float, ...]

    @classmethod
    def concatenate(cls, parts: Iterable[PairMeasurements]) -> PairMeasurements:
        """The measurements of a clip from those of its chunks, in order
        (chunks sharing one seam frame, so each pair is measured once)."""
        parts = list(parts)
        return cls(
            frame_differences=tuple(value for part in parts for value in part.frame_differences),
            luminance_residuals=tuple(value for part in parts for value in part.luminance_residuals),
            flow_magnitudes=tuple(value for part in parts for value in part.flow_magnitudes),
        )


@dataclasses.dataclass(frozen=True)
class QualityScores:
    """Scores of one clip; ``to_dict`` gives a JSON-serialisable dict.

    temporal_consistency: in (0, 1]. 1 when no frame-to-frame change stands
        out: the largest frame difference is within (1 + TEMPORAL_OUTLIER_TOLERANCE)
        times the median (plus a floor of DIFFERENCE_FLOOR_LEVELS). A glitch
        frame, a jump cut or a dropped run of frames pulls it towards 0:
        1 / (1 + excess), excess = (max - median) / (median + floor) - tolerance.
    flicker: in [0, 255], luminance levels. The mean absolute change of
        brightness between frames that motion does not explain (the luminance
        residual), measured from its median so a steady fade counts as 0.
        0 for steady light; around 1 becomes visible; brightness alternating
        by d levels from frame to frame gives about d.
    motion_smoothness: in (0, 1]. 1 when the amount of motion (mean flow
        length of the moving pixels) is the same from pair to pair; stutter
        (alternating still and double-speed pairs) or sudden jumps pull it
        towards 0: 1 / (1 + mean |m[i+1] - m[i]| / (mean m + MOTION_FLOOR_PX)).
    frozen: True when at least FROZEN_PAIR_FRACTION of the consecutive pairs
        differ by less than FROZEN_DIFFERENCE_LEVELS, i.e. the video stands still.

    Raw numbers: median_difference and max_difference (levels),
    frozen_pair_fraction, mean_motion_px and motion_variation (the relative
    variation behind motion_smoothness), and the per-pair measurements.
    A clip of fewer than 2 frames has no pairs: scores 1, 0, 1 and not frozen.
    """

    temporal_consistency: float
    flicker: float
    motion_smoothness: float
    frozen: bool
    median_difference: float
    max_difference: float
    frozen_pair_fraction: float
    mean_motion_px: float
    motion_variation: float
    measurements: PairMeasurements

    def issues(self) -> list[str]:
        """Human-readable problems, by the MIN_/MAX_ thresholds of this module."""
        found = []
        if self.frozen:
            found.append(f"frozen: {self.frozen_pair_fraction:.0%} of consecutive frames are identical")
        if self.temporal_consistency < MIN_TEMPORAL_CONSISTENCY:
            found.append(
                f"temporal glitch: largest frame change {self.max_difference:.1f} vs median "
                f"{self.median_difference:.1f} levels (consistency {self.temporal_consistency:.2f})"
            )
        if self.flicker > MAX_FLICKER_LEVELS:
            found.append(f"flicker: {self.flicker:.2f} luminance levels frame to frame")
        if self.motion_smoothness < MIN_MOTION_SMOOTHNESS:
            found.append(f"jerky motion: smoothness {self.motion_smoothness:.2f}")
        return found

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_pairs(frames: np.ndarray) -> PairMeasurements:
    """Per-pair measurements of a clip (or of a chunk of one)."""
    check_frames(frames)
    count, height, width, _ = frames.shape
    if count < 2:
        return PairMeasurements((), (), ())
    shrink = min(1.0, ANALYSIS_MAX_SIDE / max(height, width))
    size = (max(8, round(width * shrink)), max(8, round(height * shrink)))
    to_original_px = np.float32(width / size[0]), np.float32(height / size[1])
    grid_x, grid_y = np.meshgrid(np.arange(size[0], dtype=np.float32), np.arange(size[1], dtype=np.float32))
    dis = cv2.DISOpticalFlow.create(ANALYSIS_FLOW_PRESET)

    def luma(frame: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        return cv2.resize(gray, size, interpolation=cv2.INTER_AREA) if size != (width, height) else gray

    differences, residuals, magnitudes = [], [], []
    previous = luma(frames[0])
    for index in range(1, count):
        current = luma(frames[index])
        differences.append(float(cv2.absdiff(current, previous).mean()))
        # Flow from the current frame back to the previous one: where each
        # current pixel came from, so the previous frame can be warped onto it.
        flow = dense_flow(dis, current, previous)
        source_x, source_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
        warped = cv2.remap(previous.astype(np.float32), source_x, source_y, cv2.INTER_LINEAR)
        # Pixels whose source lies outside the previous frame (content entering) say nothing.
        valid = (source_x >= 0) & (source_x <= size[0] - 1) & (source_y >= 0) & (source_y <= size[1] - 1)
        residuals.append(float((current.astype(np.float32) - warped)[valid].mean()) if valid.any() else 0.0)
        length = np.hypot(flow[..., 0] * to_original_px[0], flow[..., 1] * to_original_px[1])
        moving = length > MOVING_PIXEL_PX
        magnitudes.append(float(length[moving].mean()) if moving.mean() >= MOVING_FRACTION_MIN else 0.0)
        previous = current
    return PairMeasurements(tuple(differences), tuple(residuals), tuple(magnitudes))


def score(measurements: PairMeasurements) -> QualityScores:
    """Turns per-pair measurements into scores (see QualityScores)."""
    differences = np.asarray(measurements.frame_differences, dtype=np.float64)
    residuals = np.asarray(measurements.luminance_residuals, dtype=np.float64)
    magnitudes = np.asarray(measurements.flow_magnitudes, dtype=np.float64)
    if differences.size == 0:
        return QualityScores(1.0, 0.0, 1.0, False, 0.0, 0.0, 0.0, 0.0, 0.0, measurements)

    median_difference, max_difference = float(np.median(differences)), float(differences.max())
    outlier = (max_difference - median_difference) / (median_difference + DIFFERENCE_FLOOR_LEVELS)
    temporal_consistency = 1.0 / (1.0 + max(0.0, outlier - TEMPORAL_OUTLIER_TOLERANCE))

    flicker = float(np.abs(residuals - np.median(residuals)).mean())

    mean_motion = float(magnitudes.mean())
    if magnitudes.size >= 2:
        motion_variation = float(np.abs(np.diff(magnitudes)).mean() / (mean_motion + MOTION_FLOOR_PX))
    else:
        motion_variation = 0.0
    motion_smoothness = 1.0 / (1.0 + motion_variation)

    frozen_pair_fraction = float((differences < FROZEN_DIFFERENCE_LEVELS).mean())
    return QualityScores(
        temporal_consistency=float(temporal_consistency),
        flicker=flicker,
        motion_smoothness=float(motion_smoothness),
        frozen=bool(frozen_pair_fraction >= FROZEN_PAIR_FRACTION),
        median_difference=median_difference,
        max_difference=max_difference,
        frozen_pair_fraction=frozen_pair_fraction,
        mean_motion_px=mean_motion,
        motion_variation=motion_variation,
        measurements=measurements,
    )


def quality_scores(frames: np.ndarray) -> QualityScores:
    """Scores uint8 frames (F, H, W, 3); see QualityScores for each score's
    range and meaning."""
    return score(measure_pairs(frames))


def overall_score(scores: QualityScores) -> float:
    """One number to rank candidates by, in [0, 1], higher is better: the mean of
    temporal consistency, motion smoothness and a flicker term 1 / (1 + flicker),
    and 0 for a frozen clip."""
    if scores.frozen:
        return 0.0
    return (scores.temporal_consistency + scores.motion_smoothness + 1.0 / (1.0 + scores.flicker)) / 3.0


def summary(scores: QualityScores) -> dict:
    """The scores a render reports (QualityReport in the API): no per-pair numbers."""
    return {
        "temporal_consistency": scores.temporal_consistency,
        "flicker": scores.flicker,
        "motion_smoothness": scores.motion_smoothness,
        "frozen": scores.frozen,
        "issues": scores.issues(),
    }


def gate_failures(scores: QualityScores, gate) -> list[str]:
    """What in the scores crosses a quality gate's thresholds (`farm.config.QualityGate`;
    nothing when its action is off)."""
    if gate.action == "off":
        return []
    found = []
    if gate.reject_frozen and scores.frozen:
        found.append(f"frozen ({scores.frozen_pair_fraction:.0%} of consecutive frames identical)")
    if gate.min_temporal_consistency is not None and scores.temporal_consistency < gate.min_temporal_consistency:
        found.append(f"temporal consistency {scores.temporal_consistency:.3f} < {gate.min_temporal_consistency}")
    if gate.max_flicker is not None and scores.flicker > gate.max_flicker:
        found.append(f"flicker {scores.flicker:.3f} > {gate.max_flicker}")
    if gate.min_motion_smoothness is not None and scores.motion_smoothness < gate.min_motion_smoothness:
        found.append(f"motion smoothness {scores.motion_smoothness:.3f} < {gate.min_motion_smoothness}")
    return found
