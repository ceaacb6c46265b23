"""Color harmonization in CIE Lab: match a clip's color statistics to a
reference (another scene, a previous clip, a grade), without flicker.

The transform is Reinhard-style: each Lab channel is shifted and scaled so
that its mean and standard deviation over the whole clip become the
reference's. One transform for the whole clip, never one per frame: a
per-frame transform would follow every frame's content (an object walking
in changes the frame's mean) and make the light pump.

Conversions use float32 Lab (L in [0, 100], a and b about [-128, 127]) so
8-bit Lab quantization adds no banding; pixels round to uint8 once, at the end.

Chunk-friendly: ``lab_statistics`` of chunks combine exactly into the
statistics of the clip (``ColorStats.combine``), and ``match_color`` takes
the clip's statistics as ``source``, so every chunk applies the same
transform.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import cv2
import numpy as np

from farm.postproc.encode import check_frames

# Frames converted to float Lab at a time: bounds the float32 copy
# (16 frames of 768x512 are about 75 MB) without per-frame call overhead.
FRAMES_PER_BATCH = 16
# The per-channel scale is clamped to this range: a near-flat clip (a black
# frame, a logo on white) has a tiny std, and dividing by it would blow noise
# up into garish color.
MIN_STD_SCALE = 0.25
MAX_STD_SCALE = 4.0
# Standard deviations below this (Lab units) count as flat.
STD_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class ColorStats:
    """Mean and standard deviation of L, a and b over every pixel of a clip.
    JSON-serialisable through ``to_dict`` / ``from_dict`` (plain floats and ints)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixels: int

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "pixels": self.pixels}

    @classmethod
    def from_dict(cls, data: dict) -> ColorStats:
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"ColorStats needs three means and three stds, got {data!r}")
        return cls(mean=mean, std=std, pixels=int(data.get("pixels", 0)))

    @classmethod
    def combine(cls, parts: Iterable[ColorStats]) -> ColorStats:
        """The statistics of the union of the parts' pixels (pooled mean and
        variance), e.g. of a clip from the statistics of its chunks."""
        parts = [part for part in parts if part.pixels > 0]
        if not parts:
            raise ValueError("cannot combine zero statistics")
        counts = np.array([part.pixels for part in parts], dtype=np.float64)
        means = np.array([part.mean for part in parts], dtype=np.float64)
        variances = np.array([part.std for part in parts], dtype=np.float64) ** 2
        total = counts.sum()
        mean = (counts[:, None] * means).sum(axis=0) / total
        # Law of total variance: within-part variance plus spread of the part means.
        variance = (counts[:, None] * (variances + (means - mean) ** 2)).sum(axis=0) / total
        return cls(mean=_floats(mean), std=_floats(np.sqrt(variance)), pixels=int(total))


def lab_statistics(frames: np.ndarray) -> ColorStats:
    """Per-channel mean and std in CIE Lab over all pixels of all frames."""
    check_frames(frames)
    count, height, width, _ = frames.shape
    if count == 0 or height == 0 or width == 0:
        raise ValueError("cannot take statistics of an empty clip")
    sums = np.zeros(3, dtype=np.float64)
    squares = np.zeros(3, dtype=np.float64)
    for start in range(0, count, FRAMES_PER_BATCH):
        lab = _to_lab(frames[start : start + FRAMES_PER_BATCH])
        # cv2.meanStdDev accumulates in float64 and is ~10x faster than numpy sums here.
        batch_mean, batch_std = (values.ravel() for values in cv2.meanStdDev(lab))
        batch_pixels = lab.shape[0] * lab.shape[1]
        sums += batch_mean * batch_pixels
        squares += (batch_std**2 + batch_mean**2) * batch_pixels
    pixels = count * height * width
    mean = sums / pixels
    variance = np.maximum(squares / pixels - mean**2, 0.0)
    return ColorStats(mean=_floats(mean), std=_floats(np.sqrt(variance)), pixels=pixels)


def color_transform(source: ColorStats, reference: ColorStats, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), each of 3 Lab channels, with lab_out = lab * scale + offset.
    strength 1 moves mean and std all the way to the reference, 0 changes
    nothing, in between moves both part of the way."""
    if not (0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    source_mean, reference_mean = np.array(source.mean), np.array(reference.mean)
    source_std, reference_std = np.array(source.std), np.array(reference.std)
    full_scale = np.where(source_std > STD_FLOOR, reference_std / np.maximum(source_std, STD_FLOOR), 1.0).clip(
        MIN_STD_SCALE, MAX_STD_SCALE
    )
    scale = 1.0 + strength * (full_scale - 1.0)
    target_mean = source_mean + strength * (reference_mean - source_mean)
    # Scale about the source mean, then move the mean to the target.
    offset = target_mean - scale * source_mean
    return scale.astype(np.float32), offset.astype(np.float32)


def match_color(
    frames: np.ndarray,
    reference: ColorStats,
    strength: float = 1.0,
    *,
    source: ColorStats | None = None,
) -> np.ndarray:
    """Applies one Lab transform to every frame so that the clip's Lab mean and
    std move to the reference's (see ``color_transform``). source: the whole
    clip's statistics when ``frames`` is only a chunk of it; by default they
    are taken from ``frames``. Colors that leave the sRGB gamut are clipped."""
    check_frames(frames)
    if frames.shape[0] == 0:
        return frames.copy()
    scale, offset = color_transform(source or lab_statistics(frames), reference, strength)
    # lab * scale + offset per channel, as one 3x4 affine cv2.transform.
    affine = np.concatenate([np.diag(scale), offset[:, None]], axis=1).astype(np.float32)
    output = np.empty_like(frames)
    for start in range(0, frames.shape[0], FRAMES_PER_BATCH):
        batch = frames[start : start + FRAMES_PER_BATCH]
        rgb = cv2.cvtColor(cv2.transform(_to_lab(batch), affine), cv2.COLOR_Lab2RGB)
        # Scale to 0..255 with rounding and saturation (out-of-gamut colors clip) in one
        # step. Scalars are 4-tuples: OpenCV 4.x applies a bare number to channel 0 only.
        output[start : start + FRAMES_PER_BATCH] = cv2.multiply(rgb, (255.0,) * 4, dtype=cv2.CV_8U).reshape(batch.shape)
    return output


def _to_lab(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, H, W, 3) -> float32 Lab (n * H, W, 3): frames stacked into
    one tall image, so one cvtColor call converts them all."""
    count, height, width, _ = frames.shape
    rgb = cv2.multiply(frames.reshape(count * height, width, 3), (1.0 / 255.0,) * 4, dtype=cv2.CV_32F)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)


def _floats(values: np.ndarray) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    if not all(math.isfinite(value) for value in (first, second, third)):
        raise ValueError(f"statistics are not finite: {values!r}")
    return first, second, third
