"""What an attempt is charged: the phases it ran, each timed on the device that ran it,
priced by `farm.metering.cost`.

While an attempt runs, its `AttemptMeter` collects what its progress reports finish: a
stage change closes the phase before it, and denoising is metered step by step on the
attempt's device. When the attempt ends it is charged for the phases the replica reported
with its ending when it reported them (`Done` and `Preempted` carry every phase), else
for those metered so far (a cancel, a failure, a lost replica)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from farm.config import PriceConfig
from farm.domain.events import PhaseTiming, RenderProgress
from farm.domain.states import Stage
from farm.metering.cost import Charge, price_timings


@dataclasses.dataclass(frozen=True)
class AttemptCharges:
    """An attempt's timed phases and the charges they come to (repeats of a phase on one
    device kind merged into one charge)."""

    timings: tuple[PhaseTiming, ...]
    charges: list[Charge]

    def timing_rows(self) -> list[list]:
        """The timings as the store keeps them with the attempt: [phase, device kind, seconds]."""
        return [list(timing) for timing in self.timings]


def charge_timings(prices: PriceConfig, timings: Iterable[tuple[str, str, float]],
                   surcharge: float = 0.0) -> AttemptCharges:
    """Prices (phase, device kind, seconds) triples; an unknown device kind is an error, never free."""
    phases = tuple(PhaseTiming(*timing) for timing in timings)
    return AttemptCharges(phases, price_timings(prices, phases, surcharge))


class AttemptMeter:
    """The phases one attempt has finished so far, on a pool of `device_kind`."""

    def __init__(self, device_kind: str, surcharge: float = 0.0):
        self.device_kind = device_kind
        self.surcharge = surcharge
        self.timings: list[PhaseTiming] = []

    def record(self, progress: RenderProgress) -> None:
        self.timings.extend(PhaseTiming(*timing) for timing in progress.finished_phases)
        if progress.step_seconds:
            self.timings.append(PhaseTiming(Stage.DENOISING, self.device_kind, progress.step_seconds))

    @property
    def seconds(self) -> float:
        """Device-seconds metered so far."""
        return sum(timing.seconds for timing in self.timings)

    def charge(self, prices: PriceConfig, reported: Iterable[tuple[str, str, float]] | None = None) -> AttemptCharges:
        """The attempt's charges: for the phases its replica `reported` with its ending,
        or (None) for those metered so far."""
        return charge_timings(prices, self.timings if reported is None else reported, self.surcharge)
