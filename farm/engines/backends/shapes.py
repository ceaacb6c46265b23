"""Shape buckets: the fixed input shapes an ahead-of-time engine build is made for.

A build serves one (width, height, frames, batch): the ONNX graph and the CUDA graphs
of a compiled transformer have every dimension fixed. Batch is 2 when classifier-free
guidance is on (the conditional and unconditional passes run as one batch) and 1 when
it is off. This module imports neither torch nor diffusers, so a CLI can parse shapes
without loading them.
"""

from __future__ import annotations

import dataclasses
import re

# The pipelines run guidance as one batch of two whenever guidance_scale > 1.
GUIDED_BATCH = 2
UNGUIDED_BATCH = 1

_SHAPE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True, order=True)
class ShapeBucket:
    """The shape one engine build serves: pixels, frames and transformer batch."""

    width: int
    height: int
    num_frames: int
    batch: int = GUIDED_BATCH

    def __post_init__(self) -> None:
        for field in ("width", "height", "num_frames", "batch"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"shape {field} must be a positive integer, got {value!r}")

    @classmethod
    def for_render(cls, width: int, height: int, num_frames: int, guidance_scale: float) -> "ShapeBucket":
        """The bucket a render falls in: guidance above 1 doubles the transformer batch."""
        batch = GUIDED_BATCH if guidance_scale > 1.0 else UNGUIDED_BATCH
        return cls(width, height, num_frames, batch)

    @property
    def spec(self) -> str:
        """WIDTHxHEIGHTxFRAMES, as `parse_shape` reads it."""
        return f"{self.width}x{self.height}x{self.num_frames}"

    @property
    def guided(self) -> bool:
        return self.batch == GUIDED_BATCH

    def describe(self) -> str:
        guidance = "with guidance" if self.guided else "without guidance"
        return f"{self.spec} (batch {self.batch}, {guidance})"

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def parse_shape(text: str, batch: int = GUIDED_BATCH) -> ShapeBucket:
    """Reads WIDTHxHEIGHTxFRAMES (e.g. 768x512x121) into a bucket; batch 2 means guidance on."""
    match = _SHAPE_PATTERN.match(text or "")
    if not match:
        raise ValueError(f"a shape is WIDTHxHEIGHTxFRAMES, e.g. 768x512x121; got {text!r}")
    width, height, frames = (int(group) for group in match.groups())
    if batch not in (GUIDED_BATCH, UNGUIDED_BATCH):
        raise ValueError(f"batch must be {GUIDED_BATCH} (guidance on) or {UNGUIDED_BATCH} (guidance off), got {batch}")
    if 0 in (width, height, frames):
        raise ValueError(f"width, height and frames must be positive; got {text!r}")
    return ShapeBucket(width, height, frames, batch)
