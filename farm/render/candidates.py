"""The candidates of one render: candidate `index` renders seed + index; with several,
each one is scored on quality (its chunks measured through the chunk runner) while the
next one renders, and the best score is delivered."""

from __future__ import annotations

import asyncio
import dataclasses

from farm.domain.engine import Candidate, RenderOutput
from farm.domain.events import PhaseTiming
from farm.domain.spec import MAX_SEED
from farm.domain.states import Stage
from farm.postproc.pipeline import ChunkRunner, StoredClip, measure_clip, store_clip
from farm.postproc.quality import QualityScores, overall_score, summary


def candidate_seed(seed: int, index: int) -> int:
    """Candidate `index` of a render renders seed + index (wrapping within the seed range)."""
    return (seed + index) % (MAX_SEED + 1)


@dataclasses.dataclass(frozen=True)
class Scoring:
    """A candidate's frames stored for post-processing (the one delivered is not stored
    twice), its quality scores, and what scoring cost."""

    stored: StoredClip
    scores: QualityScores
    timings: list[PhaseTiming]


@dataclasses.dataclass
class Contender:
    """A rendered candidate and, when several compete, its scoring (started as it arrives)."""

    candidate: Candidate
    scoring: asyncio.Task[Scoring] | None = None

    @property
    def seed(self) -> int:
        return self.candidate.seed

    @property
    def output(self) -> RenderOutput:
        return self.candidate.output


async def score(output: RenderOutput, chunks: ChunkRunner, chunk_frames: int) -> Scoring:
    stored = await store_clip(output.frames, chunks, chunk_frames)
    scores, timings, _ = await measure_clip(stored, chunks)
    return Scoring(stored, scores, [PhaseTiming(Stage(phase), kind, seconds) for phase, kind, seconds in timings])


async def choose(contenders: list[Contender]) -> tuple[Contender, list[tuple[QualityScores, float]]]:
    """The best-scoring contender (the first one when there is only one) and every
    contender's (scores, score)."""
    if len(contenders) == 1:
        return contenders[0], []
    scored = []
    for contender in contenders:
        scoring = await contender.scoring
        scored.append((scoring.scores, overall_score(scoring.scores)))
    best = max(range(len(contenders)), key=lambda index: scored[index][1])
    return contenders[best], scored


def report(contenders: list[Contender], scored: list[tuple[QualityScores, float]],
           chosen: Contender) -> list[dict] | None:
    """Each scored candidate's seed, quality and score, and which one was delivered
    (None when only one was rendered: nothing was chosen)."""
    return [
        {"seed": contender.seed, "quality": summary(scores), "score": value, "chosen": contender is chosen}
        for contender, (scores, value) in zip(contenders, scored)
    ] or None
