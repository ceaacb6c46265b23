"""Spatial upscaling: Lanczos (always available) and a learned super-resolution
model (Real-ESRGAN family, loaded through spandrel) when weights are given.

Output sizes are exact and even, because H.264 in yuv420p needs even sizes:
each side is ``factor * side`` rounded to the nearest even integer, halves
rounding up (``upscaled_size``). For the usual cases, even inputs and factors
2, 3, 4 or 1.5 on sides divisible by 4, that is exactly ``round(side * factor)``.

Both upscalers work frame by frame, so any chunking of a clip (no overlap
needed) gives the same frames as upscaling it whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from farm.postproc.encode import check_frames

# The learned upscaler processes each frame in tiles of this many input pixels
# a side, each read with this much extra context on every side; a model whose
# receptive field reaches no further than the overlap gives exactly the
# untiled result, and memory stays bounded by the tile size.
DEFAULT_TILE = 256
DEFAULT_TILE_OVERLAP = 16


def upscaled_size(height: int, width: int, factor: float, *, even: bool = True) -> tuple[int, int]:
    """(height, width) after scaling by factor: the nearest integers, halves up,
    or with even=True the nearest even integers (halves up), at least 2."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"scale factor must be positive and finite, got {factor!r}")

    def side(length: int) -> int:
        if even:
            return max(2, 2 * math.floor(length * factor / 2 + 0.5))
        return max(1, math.floor(length * factor + 0.5))

    return side(height), side(width)


def upscale(frames: np.ndarray, factor: int | float, *, even: bool = True) -> np.ndarray:
    """Resizes uint8 frames (F, H, W, 3) by factor with Lanczos (8x8 kernel) to
    exactly ``upscaled_size(H, W, factor)``. Factors below 1 use area
    averaging instead, which does not alias when shrinking."""
    check_frames(frames)
    count, height, width, channels = frames.shape
    out_height, out_width = upscaled_size(height, width, factor, even=even)
    interpolation = cv2.INTER_LANCZOS4 if factor >= 1 else cv2.INTER_AREA
    output = np.empty((count, out_height, out_width, channels), dtype=np.uint8)
    for index in range(count):
        cv2.resize(frames[index], (out_width, out_height), dst=output[index], interpolation=interpolation)
    return output


class LearnedUpscaler:
    """A super-resolution network applied tile by tile.

    ``from_file`` loads Real-ESRGAN, ESRGAN, SwinIR, ... weights (.pth or
    .safetensors) with spandrel, which detects the architecture from the
    state dict. The constructor takes any callable with spandrel's image
    interface: a float tensor (1, 3, h, w) in [0, 1] in, (1, 3, h * scale,
    w * scale) out, on the same device and dtype; the model must already be
    on ``device`` in ``dtype`` (``from_file`` sees to that). Tiles go to the
    device one at a time and come back, so device memory holds one tile's
    activations whatever the frame size.

    Exactness: a model whose receptive field reaches no further than
    ``overlap`` input pixels gives exactly the untiled output. Deep networks
    (Real-ESRGAN x4plus: 23 RRDB blocks) see further; for them the overlap
    only needs to hide the seams, as Real-ESRGAN's own tile padding of 10 does.

    Tiling: the frame is cut into tiles of ``tile`` pixels a side; each tile is
    run with ``overlap`` pixels of its neighbours around it (clipped at the
    frame border, where the model then sees the same border it would see on
    the whole frame), and only the tile's own part of the output is kept.
    """

    def __init__(
        self,
        model: Callable,
        scale: int,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_TILE_OVERLAP,
        device: str | None = None,
        dtype=None,
    ) -> None:
        import torch

        if scale < 1 or int(scale) != scale:
            raise ValueError(f"model scale must be an integer >= 1, got {scale!r}")
        if tile < 1 or overlap < 0:
            raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
        self.model = model
        self.scale = int(scale)
        self.tile = tile
        self.overlap = overlap
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_TILE_OVERLAP,
        device: str | None = None,
        half: bool | None = None,
    ) -> LearnedUpscaler:
        """Loads super-resolution weights from a local file with spandrel.
        half: fp16 weights and activations; by default on CUDA only, and only
        for architectures spandrel says support it."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no upscaler weights at {path}")
        try:
            import spandrel
        except ImportError as error:  # an optional dependency: Lanczos needs none
            raise RuntimeError(
                "LearnedUpscaler.from_file needs the 'spandrel' package: pip install spandrel"
            ) from error
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        descriptor = spandrel.ModelLoader(device=target).load_from_file(path)
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
            raise ValueError(f"{path} is not an RGB image-to-image model ({type(descriptor).__name__})")
        use_half = (target.type == "cuda" if half is None else half) and descriptor.supports_half
        dtype = torch.float16 if use_half else torch.float32
        descriptor = descriptor.to(dtype).eval()
        return cls(descriptor, descriptor.scale, tile=tile, overlap=overlap, device=str(target), dtype=dtype)

    def upscale_image(self, image):
        """One image, float tensor (3, H, W) in [0, 1] -> (3, H * scale, W * scale),
        computed tile by tile."""
        import torch

        channels, height, width = image.shape
        scale, tile, overlap = self.scale, self.tile, self.overlap
        output = torch.empty((channels, height * scale, width * scale), dtype=image.dtype, device=image.device)
        with torch.inference_mode():
            for top in range(0, height, tile):
                bottom = min(top + tile, height)
                for left in range(0, width, tile):
                    right = min(left + tile, width)
                    # The tile with its context, clipped to the frame.
                    context_top, context_left = max(top - overlap, 0), max(left - overlap, 0)
                    context_bottom, context_right = min(bottom + overlap, height), min(right + overlap, width)
                    patch = image[:, context_top:context_bottom, context_left:context_right]
                    result = self.model(patch.unsqueeze(0).to(self.device, self.dtype))[0]
                    # Keep only the part of the output that belongs to the tile itself.
                    inner_top, inner_left = (top - context_top) * scale, (left - context_left) * scale
                    output[:, top * scale : bottom * scale, left * scale : right * scale] = result[
                        :,
                        inner_top : inner_top + (bottom - top) * scale,
                        inner_left : inner_left + (right - left) * scale,
                    ].to(output.device, output.dtype)
        return output

    def upscale(self, frames: np.ndarray, factor: int | float | None = None, *, even: bool = True) -> np.ndarray:
        """uint8 frames (F, H, W, 3) -> uint8 frames upscaled by the model's scale,
        or, given factor, resized (Lanczos, or area when shrinking) from the
        model's output to exactly ``upscaled_size(H, W, factor)``."""
        import torch

        check_frames(frames)
        count, height, width, _ = frames.shape
        if factor is None:
            out_height, out_width = height * self.scale, width * self.scale
        else:
            out_height, out_width = upscaled_size(height, width, factor, even=even)
        output = np.empty((count, out_height, out_width, 3), dtype=np.uint8)
        for index in range(count):
            image = torch.from_numpy(frames[index]).permute(2, 0, 1).to(torch.float32).div_(255.0)
            result = self.upscale_image(image)
            # Round once, at the end; the model's output is clamped to [0, 1] first.
            pixels = result.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            if pixels.shape[:2] != (out_height, out_width):
                shrinking = out_height < pixels.shape[0]
                pixels = cv2.resize(
                    pixels,
                    (out_width, out_height),
                    interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4,
                )
            output[index] = pixels
        return output
