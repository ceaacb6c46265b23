"""Cost arithmetic: device-seconds x the price of the device kind.

Money is kept in integer nanodollars so that the render's total, the sum of its
ledger rows and the Prometheus counter agree exactly, whatever order they are summed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from farm.config import PriceConfig

NANODOLLARS_PER_DOLLAR = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class Charge:
    phase: str
    device_kind: str
    device_seconds: float
    nanodollars: int

    @property
    def dollars(self) -> float:
        return self.nanodollars / NANODOLLARS_PER_DOLLAR


def price_phase(prices: PriceConfig, phase: str, device_kind: str, seconds: float, surcharge: float = 0.0) -> Charge:
    """surcharge: the fraction a render's adapters add to its price (`ResolvedSpec.surcharge`)."""
    if seconds < 0:
        raise ValueError(f"phase {phase} has negative duration {seconds}")
    dollars_per_second = prices.price_of(device_kind) / 3600.0 * (1.0 + surcharge)
    return Charge(phase, device_kind, seconds, round(seconds * dollars_per_second * NANODOLLARS_PER_DOLLAR))


def price_timings(prices: PriceConfig, timings: Iterable[tuple[str, str, float]],
                  surcharge: float = 0.0) -> list[Charge]:
    """Prices (phase, device_kind, seconds) triples, merging repeats of one phase on
    one device kind into a single charge."""
    merged: dict[tuple[str, str], float] = {}
    for phase, kind, seconds in timings:
        merged[(phase, kind)] = merged.get((phase, kind), 0.0) + seconds
    return [price_phase(prices, phase, kind, seconds, surcharge) for (phase, kind), seconds in merged.items()]


def to_dollars(nanodollars: int) -> float:
    return nanodollars / NANODOLLARS_PER_DOLLAR
