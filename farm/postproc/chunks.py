"""Planning chunked, parallel post-processing and joining the results.

A clip of F frames is cut into chunks that post-processing replicas handle
independently. Stages that work frame by frame (upscaling, color matching
with the clip's statistics, encoding) need no overlap. Stages that work on
pairs of neighbouring frames (interpolation, quality measurements) need each
seam frame in both chunks beside it, so that every pair lies inside exactly
one chunk: ``plan_chunks(F, n, overlap=1)``. Joining then drops the
duplicated seam frames, and the result is frame-for-frame the result of
processing the clip whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Frames [start, end) of a clip; the first ``leading_overlap`` of them are
    also the last frames of the chunk before."""

    start: int
    end: int
    leading_overlap: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def frames(self) -> slice:
        """The chunk's frames: ``clip[chunk.frames]``."""
        return slice(self.start, self.end)

    def interpolated_start(self, factor: int) -> int:
        """Index, in the interpolated clip, of this chunk's first frame after
        ``join_interpolated`` dropped its seam frames (where its part of the
        joined clip begins, e.g. the ``start_frame`` of its encoded segment)."""
        if self.leading_overlap == 0:
            return self.start * factor
        return (self.start + self.leading_overlap - 1) * factor + 1


def plan_chunks(num_frames: int, chunk_frames: int, overlap: int = 1) -> list[Chunk]:
    """Chunks of at most chunk_frames frames covering [0, num_frames), each
    sharing ``overlap`` frames with the one before it. With overlap=1 every
    pair of neighbouring frames lies in exactly one chunk; overlap=0 is a
    plain partition. The last chunk may be shorter, but always has more than
    ``overlap`` frames (it adds something)."""
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if chunk_frames <= overlap:
        raise ValueError(f"chunk_frames ({chunk_frames}) must exceed the overlap ({overlap})")
    chunks: list[Chunk] = []
    start = 0
    while True:
        end = min(start + chunk_frames, num_frames)
        chunks.append(Chunk(start, end, overlap if chunks else 0))
        if end >= num_frames:
            return chunks if num_frames > 0 else []
        start = end - overlap


def join_interpolated(chunks_outputs: Sequence[np.ndarray], factor: int, overlap: int = 1) -> np.ndarray:
    """Joins the ``interpolate(chunk, factor)`` outputs of consecutive chunks of
    ``plan_chunks(..., overlap)`` into the interpolation of the whole clip.

    A chunk of n frames gives (n - 1) * factor + 1 frames; the first
    (overlap - 1) * factor + 1 of every chunk after the first repeat the end
    of the chunk before (the seam's original frame and whatever lies between
    shared frames), so they are dropped. The seam frames are originals and
    must be identical on both sides: anything else means the outputs are not
    neighbours, and raises ValueError.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if overlap < 1:
        raise ValueError("interpolated chunks must share at least one seam frame (overlap >= 1)")
    if not chunks_outputs:
        raise ValueError("nothing to join")
    repeated = (overlap - 1) * factor + 1
    pieces = [chunks_outputs[0]]
    for position, output in enumerate(chunks_outputs):
        if (len(output) - 1) % factor or len(output) < repeated:
            raise ValueError(
                f"chunk {position} has {len(output)} frames, not (n - 1) * {factor} + 1 for n > {overlap} input frames"
            )
        if position == 0:
            continue
        previous = chunks_outputs[position - 1]
        if not np.array_equal(previous[len(previous) - repeated :], output[:repeated]):
            raise ValueError(f"chunks {position - 1} and {position} do not share their seam frames")
        pieces.append(output[repeated:])
    return np.concatenate(pieces)


def join_frames(chunks_outputs: Sequence[np.ndarray], overlap: int = 0) -> np.ndarray:
    """Joins the outputs of a frame-by-frame stage (upscaling, color, ...) run on
    consecutive chunks; with overlap > 0 (chunks planned for interpolation)
    the first ``overlap`` frames of every chunk after the first are dropped."""
    if not chunks_outputs:
        raise ValueError("nothing to join")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    for position, output in enumerate(chunks_outputs[1:], start=1):
        if len(output) <= overlap:
            raise ValueError(f"chunk {position} has {len(output)} frames, none beyond the overlap of {overlap}")
    return np.concatenate([chunks_outputs[0], *(output[overlap:] for output in chunks_outputs[1:])])
