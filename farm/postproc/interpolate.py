"""Frame interpolation with bidirectional optical flow (no learned model).

For every pair of neighbouring frames (I0, I1) the method

1. computes dense optical flow both ways, F01 and F10, with OpenCV's DIS
   optical flow on grayscale, at a reduced resolution for speed;
2. checks forward-backward consistency: a pixel of I0 whose flow lands on a
   pixel of I1 that flows back to it is visible in both frames; one that does
   not is about to be occluded (or leaves the picture), and likewise for I1;
3. for each intermediate time t, splats the motion of both frames forward to
   time t (pixels of I0 travel t of their flow, pixels of I1 travel 1 - t of
   theirs, consistent pixels outweigh inconsistent ones so that a foreground
   object wins over the background it covers), which gives the motion field
   at time t where the interpolated frame lives; holes are filled from nearby
   motion;
4. warps both neighbours to time t (backward warping with cv2.remap) and
   blends them, weighting each by temporal closeness and by occlusion: where
   I0's content has no counterpart in I1, I1's warp shows the wrong thing and
   I0 is used, and the other way round.

Everything is computed from one pair at a time: there is no state that
crosses pairs, so interpolating a clip chunk by chunk (chunks sharing one
seam frame, see ``farm.postproc.chunks``) gives exactly the frames of
interpolating it whole.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from farm.postproc.encode import check_frames

# The flow is computed on grayscale downscaled so that its longer side is at
# most this many pixels: DIS cost grows with area, while motion of AI video
# is smooth enough that a 2/3-scale field, upscaled, is as good for warping.
FLOW_MAX_SIDE = 512
# DIS preset: MEDIUM refines to half of the flow image's resolution with a
# variational step; FAST/ULTRAFAST skip most of that and blur object edges.
FLOW_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM

# DIS refuses images much smaller than its patches; smaller flow images are
# padded (edge pixels repeated) to this many pixels a side.
MIN_FLOW_SIDE = 32
# Forward-backward consistency, as in Sundaram et al. (ECCV 2010): a flow
# vector w and the flow w' found where it lands are consistent when
# |w + w'|^2 is small next to 0.01 (|w|^2 + |w'|^2) + 0.5 (flow-image pixels^2).
# We use the soft version exp(-|w + w'|^2 / tolerance) as a reliability in [0, 1].
CONSISTENCY_RELATIVE_TOLERANCE = 0.01
CONSISTENCY_ABSOLUTE_TOLERANCE_PX2 = 0.5
# Inconsistent pixels still splat with this small weight, so that motion
# nobody else claims (e.g. an occluded region) is not left as a hole.
SPLAT_WEIGHT_FLOOR = 1e-3
# Where a neighbour's warp is unreliable its blend weight drops to about this
# fraction; where both are unreliable the plain temporal blend remains. Not
# lower: DIS blurs flow across object edges, so the occlusion maps are soft.
OCCLUSION_WEIGHT_FLOOR = 0.1
# Smoothing of the splatted motion (flow-image pixels): closes the gaps that
# nearest-pixel splatting leaves where motion stretches.
SPLAT_SMOOTHING_SIGMA = 1.0
# Below this accumulated weight a pixel is a hole, filled from coarser levels.
HOLE_WEIGHT = 1e-4


def interpolation_output(frames: np.ndarray, factor: int) -> tuple[np.ndarray, int]:
    """Checks the input of an interpolation and allocates its output, with the given
    frames already in place at every factor-th position."""
    check_frames(frames)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    count, height, width, _ = frames.shape
    if count == 0:
        raise ValueError("cannot interpolate an empty clip")
    output = np.empty(((count - 1) * factor + 1, height, width, 3), dtype=np.uint8)
    output[::factor] = frames
    return output, factor


def interpolate(frames: np.ndarray, factor: int, *, flow_max_side: int = FLOW_MAX_SIDE) -> np.ndarray:
    """Returns (F - 1) * factor + 1 frames: the originals at positions 0,
    factor, 2 * factor, ... (bit-identical) and factor - 1 flow-interpolated
    frames between each pair, at times 1/factor, 2/factor, ...

    frames: uint8 (F, H, W, 3) RGB, F >= 1. factor: integer >= 1.
    flow_max_side: the longer side of the image the flow is computed on.
    """
    output, factor = interpolation_output(frames, factor)
    count, height, width, _ = frames.shape
    if factor == 1 or count == 1:
        return output
    interpolator = _PairInterpolator(height, width, flow_max_side)
    times = [step / factor for step in range(1, factor)]
    for index in range(count - 1):
        middles = interpolator.between(frames[index], frames[index + 1], times)
        output[index * factor + 1 : (index + 1) * factor] = middles
    return output


def interpolate_to_fps(
    frames: np.ndarray, fps_in: float, fps_out: float, *, flow_max_side: int = FLOW_MAX_SIDE
) -> np.ndarray:
    """Raises the frame rate from fps_in to fps_out, which must be an integer
    multiple of it (24 -> 48, 16 -> 48, 30000/1001 -> 60000/1001). Returns
    (F - 1) * k + 1 frames for k = fps_out / fps_in: the first and last frames
    keep their times, so the clip is shorter than F / fps_in by (k - 1) / fps_out
    (the time the last original frame was shown for beyond the new spacing).
    Non-integer ratios (24 -> 30) and lowering the rate raise ValueError."""
    if not (fps_in > 0 and fps_out > 0 and math.isfinite(fps_in) and math.isfinite(fps_out)):
        raise ValueError(f"frame rates must be positive and finite, got fps_in={fps_in!r}, fps_out={fps_out!r}")
    ratio = fps_out / fps_in
    factor = round(ratio)
    # Relative tolerance: NTSC rates given as floats are not exact binary fractions.
    if factor < 1 or abs(ratio - factor) > 1e-9 * ratio:
        raise ValueError(
            f"fps_out / fps_in must be an integer >= 1 for flow interpolation, "
            f"got fps_in={fps_in!r}, fps_out={fps_out!r} (ratio {ratio:.6g})"
        )
    return interpolate(frames, factor, flow_max_side=flow_max_side)


class _PairInterpolator:
    """Interpolates between two frames of one size. Holds only buffers that
    depend on the size (pixel grids), never anything computed from a frame."""

    def __init__(self, height: int, width: int, flow_max_side: int) -> None:
        if flow_max_side < 8:
            raise ValueError(f"flow_max_side must be >= 8, got {flow_max_side}")
        self.height, self.width = height, width
        shrink = min(1.0, flow_max_side / max(height, width))
        self.flow_height = max(1, round(height * shrink))
        self.flow_width = max(1, round(width * shrink))
        # Per-axis factors from flow-image pixels to frame pixels.
        self.scale_x = width / self.flow_width
        self.scale_y = height / self.flow_height
        self.flow_grid = _pixel_grid(self.flow_height, self.flow_width)
        self.frame_grid = _pixel_grid(height, width)
        self.dis = cv2.DISOpticalFlow.create(FLOW_PRESET)

    def between(self, frame0: np.ndarray, frame1: np.ndarray, times: list[float]) -> np.ndarray:
        """The frames at each time t in (0, 1) between frame0 (t = 0) and frame1 (t = 1)."""
        frame0, frame1 = np.ascontiguousarray(frame0), np.ascontiguousarray(frame1)
        gray0, gray1 = self._flow_image(frame0), self._flow_image(frame1)
        # No initial flow is passed: each pair's flow depends on that pair alone.
        flow01 = dense_flow(self.dis, gray0, gray1)
        flow10 = dense_flow(self.dis, gray1, gray0)
        reliable0 = self._consistency(flow01, flow10)
        reliable1 = self._consistency(flow10, flow01)
        middles = np.empty((len(times), self.height, self.width, 3), dtype=np.uint8)
        for slot, t in enumerate(times):
            middles[slot] = self._at_time(frame0, frame1, flow01, flow10, reliable0, reliable1, t)
        return middles

    def _flow_image(self, frame: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if (self.flow_height, self.flow_width) == (self.height, self.width):
            return gray
        return cv2.resize(gray, (self.flow_width, self.flow_height), interpolation=cv2.INTER_AREA)

    def _consistency(self, flow: np.ndarray, back_flow: np.ndarray) -> np.ndarray:
        """Reliability in [0, 1] of each pixel's flow: 1 where following the flow
        and then the reverse flow returns home, 0 where it lands elsewhere or
        outside the picture (content that leaves or gets covered)."""
        landing = self.flow_grid + flow
        returned = self._sample(back_flow, landing)
        mismatch = _squared_length(flow + returned)
        tolerance = (
            CONSISTENCY_RELATIVE_TOLERANCE * (_squared_length(flow) + _squared_length(returned))
            + CONSISTENCY_ABSOLUTE_TOLERANCE_PX2
        )
        reliability = np.exp(-mismatch / tolerance)
        # Half a pixel of slack: border pixels whose flow grazes the edge stay in.
        outside = (
            (landing[..., 0] < -0.5)
            | (landing[..., 0] > self.flow_width - 0.5)
            | (landing[..., 1] < -0.5)
            | (landing[..., 1] > self.flow_height - 0.5)
        )
        reliability[outside] = 0.0
        return reliability.astype(np.float32)

    def _at_time(self, frame0, frame1, flow01, flow10, reliable0, reliable1, t: float) -> np.ndarray:
        # Motion at time t, in flow-image pixels per whole frame interval:
        # frame-0 pixels carry F01, frame-1 pixels carry -F10.
        motion = self._splat_motion(
            [
                (cv2.scaleAdd(flow01, t, self.flow_grid), flow01, (1.0 - t) * (reliable0 + SPLAT_WEIGHT_FLOOR)),
                (cv2.scaleAdd(flow10, 1.0 - t, self.flow_grid), -flow10, t * (reliable1 + SPLAT_WEIGHT_FLOOR)),
            ]
        )
        # Backward flows from time t to each neighbour are -t * motion and (1 - t) * motion.
        # Is the content we would fetch from each neighbour visible in the other one?
        seen0 = self._sample(reliable0, cv2.scaleAdd(motion, -t, self.flow_grid))
        seen1 = self._sample(reliable1, cv2.scaleAdd(motion, 1.0 - t, self.flow_grid))
        # Where frame 1's content has no counterpart in frame 0 (seen1 low), frame 0's
        # warp shows the wrong thing, and the other way round.
        weight0 = self._to_frame_size((1.0 - t) * (seen1 + OCCLUSION_WEIGHT_FLOOR))
        weight1 = self._to_frame_size(t * (seen0 + OCCLUSION_WEIGHT_FLOOR))

        motion_full = self._to_frame_size(motion)
        warped0 = self._sample(frame0, self._frame_positions(motion_full, -t))
        warped1 = self._sample(frame1, self._frame_positions(motion_full, 1.0 - t))
        # (weight0 * warped0 + weight1 * warped1) / (weight0 + weight1), rounded to uint8.
        return cv2.blendLinear(warped0, warped1, weight0, weight1)

    def _splat_motion(self, sources) -> np.ndarray:
        """Forward-splats motion vectors to where each pixel is at time t (nearest
        pixel) and averages overlapping contributions by weight; a small
        normalized convolution smooths the result and closes the one-pixel
        gaps of nearest splatting, and a pyramid fills the larger holes."""
        height, width = self.flow_height, self.flow_width
        size = height * width
        weight_sum = np.zeros(size, dtype=np.float64)
        motion_x_sum = np.zeros(size, dtype=np.float64)
        motion_y_sum = np.zeros(size, dtype=np.float64)
        for positions, motion, weight in sources:
            column = np.rint(positions[..., 0]).astype(np.int32)
            row = np.rint(positions[..., 1]).astype(np.int32)
            inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
            # Pixels that leave the picture go to index 0 with weight 0 (cheaper than masking).
            index = np.where(inside, row * width + column, 0).ravel()
            weight = np.where(inside, weight, 0.0).ravel()
            weight_sum += np.bincount(index, weight, minlength=size)
            motion_x_sum += np.bincount(index, weight * motion[..., 0].ravel(), minlength=size)
            motion_y_sum += np.bincount(index, weight * motion[..., 1].ravel(), minlength=size)
        weights = weight_sum.reshape(height, width).astype(np.float32)
        sums = np.stack([motion_x_sum, motion_y_sum], axis=-1).reshape(height, width, 2).astype(np.float32)
        # Normalized convolution: blurring numerator and denominator alike makes
        # each pixel the weighted average of the motion splatted around it.
        weights = cv2.GaussianBlur(weights, (0, 0), SPLAT_SMOOTHING_SIGMA)
        sums = cv2.GaussianBlur(sums, (0, 0), SPLAT_SMOOTHING_SIGMA)
        return _fill_by_pyramid(weights, sums)

    def _sample(self, image: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """image at (x, y) positions (H, W, 2), bilinear; outside, the nearest edge."""
        return cv2.remap(image, positions, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _to_frame_size(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (self.height, self.width):
            return image
        return cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_LINEAR)

    def _frame_positions(self, motion_full: np.ndarray, amount: float) -> np.ndarray:
        """Frame pixel grid + amount * motion, the motion (flow-image pixels,
        resized to the frame) converted to frame pixels per axis."""
        to_frame = np.float32([[amount * self.scale_x, 0.0], [0.0, amount * self.scale_y]])
        return cv2.add(self.frame_grid, cv2.transform(motion_full, to_frame))


def dense_flow(dis: cv2.DISOpticalFlow, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """DIS flow (H, W, 2) from grayscale source to target: source(x) ~ target(x + flow(x)).
    Works for any image size (tiny ones are padded for DIS and cropped back)."""
    height, width = source.shape
    pad_bottom, pad_right = max(0, MIN_FLOW_SIDE - height), max(0, MIN_FLOW_SIDE - width)
    if not (pad_bottom or pad_right):
        return dis.calc(source, target, None)
    padded = [
        cv2.copyMakeBorder(image, 0, pad_bottom, 0, pad_right, cv2.BORDER_REPLICATE) for image in (source, target)
    ]
    return np.ascontiguousarray(dis.calc(padded[0], padded[1], None)[:height, :width])


def _pixel_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 of (x, y) pixel coordinates, the identity map for cv2.remap."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.stack([xs, ys], axis=-1)


def _squared_length(vectors: np.ndarray) -> np.ndarray:
    # Channel arithmetic: numpy reductions over a last axis of 2 are slow.
    return vectors[..., 0] ** 2 + vectors[..., 1] ** 2


def _fill_by_pyramid(weights: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Motion = sums / weights where weights are large enough; holes take the
    value of the next coarser level (pull-push: weights and weighted sums are
    averaged down together, so each hole gets the weighted mean motion of the
    nearest region that has any), which costs O(pixels) for holes of any size."""
    has_motion = weights > HOLE_WEIGHT
    if not has_motion.any():
        return np.zeros_like(sums)
    motion = sums / np.maximum(weights, HOLE_WEIGHT)[..., None]
    if has_motion.all():
        return motion
    height, width = weights.shape
    coarse_size = (max(1, (width + 1) // 2), max(1, (height + 1) // 2))
    if coarse_size == (width, height):
        return np.where(has_motion[..., None], motion, 0.0).astype(np.float32)
    coarse = _fill_by_pyramid(
        cv2.resize(weights, coarse_size, interpolation=cv2.INTER_AREA),
        cv2.resize(sums, coarse_size, interpolation=cv2.INTER_AREA),
    )
    upsampled = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.where(has_motion[..., None], motion, upsampled)


class LearnedInterpolator:
    """A learned frame interpolator (RIFE family) with the same contract as
    ``interpolate``: (F - 1) * factor + 1 frames, originals kept bit-identical.

    The model is any callable ``model(frame0, frame1, t)`` taking float tensors
    (1, 3, H, W) in [0, 1] and a float time t in (0, 1), returning the frame at
    t as (1, 3, H, W). ``from_file`` loads a TorchScript export (``torch.jit.save``
    of a module with that forward), which needs no model code at load time. Frames
    are padded (edge pixels repeated) to a multiple of ``pad_multiple`` for the
    model's pyramid and cropped back. Pairs are independent, so chunked
    interpolation equals whole-clip interpolation as with optical flow.
    """

    def __init__(self, model, *, device: str | None = None, pad_multiple: int = 32) -> None:
        import torch

        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.model = model
        self.pad_multiple = pad_multiple
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_file(cls, path, *, device: str | None = None, pad_multiple: int = 32) -> "LearnedInterpolator":
        from pathlib import Path

        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no interpolator weights at {path}")
        target = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = torch.jit.load(str(path), map_location=target).eval()
        return cls(model, device=target, pad_multiple=pad_multiple)

    def interpolate(self, frames: np.ndarray, factor: int) -> np.ndarray:
        import torch
        import torch.nn.functional as functional

        output, factor = interpolation_output(frames, factor)
        count, height, width, _ = frames.shape
        if factor == 1 or count == 1:
            return output
        pad_bottom = -height % self.pad_multiple
        pad_right = -width % self.pad_multiple

        def tensor(frame: np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].to(self.device)
            image = image.to(torch.float32).div_(255.0)
            return functional.pad(image, (0, pad_right, 0, pad_bottom), mode="replicate") if pad_bottom or pad_right else image

        with torch.inference_mode():
            previous = tensor(frames[0])
            for index in range(count - 1):
                following = tensor(frames[index + 1])
                for step in range(1, factor):
                    middle = self.model(previous, following, step / factor)[0, :, :height, :width]
                    pixels = middle.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
                    output[index * factor + step] = pixels.permute(1, 2, 0).cpu().numpy()
                previous = following
        return output
