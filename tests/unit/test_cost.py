"""Cost arithmetic: device-seconds x price, in integer nanodollars."""

from __future__ import annotations

import pytest

from farm.config import PriceConfig
from farm.metering.cost import NANODOLLARS_PER_DOLLAR, price_phase, price_timings

PRICES = PriceConfig(dollars_per_device_hour={"H100": 3.6, "A100": 1.8, "CPU": 0.036})


def test_an_hour_costs_the_hourly_price():
    assert price_phase(PRICES, "DENOISING", "H100", 3600).nanodollars == 3.6 * NANODOLLARS_PER_DOLLAR
    assert price_phase(PRICES, "DENOISING", "A100", 1800).dollars == pytest.approx(0.9)


def test_one_second_on_each_device():
    assert price_phase(PRICES, "DECODING", "H100", 1).nanodollars == 1_000_000  # $0.001
    assert price_phase(PRICES, "ENCODING", "CPU", 1).nanodollars == 10_000


def test_repeated_phases_merge_and_totals_are_exact():
    charges = price_timings(PRICES, [("DENOISING", "H100", 0.25)] * 8 + [("DECODING", "H100", 0.5),
                                                                         ("ENCODING", "CPU", 2.0)])
    by_phase = {(c.phase, c.device_kind): c for c in charges}
    assert by_phase[("DENOISING", "H100")].device_seconds == 2.0
    assert by_phase[("DENOISING", "H100")].nanodollars == 2_000_000
    assert sum(c.nanodollars for c in charges) == 2_000_000 + 500_000 + 20_000


def test_unknown_device_kind_is_an_error_not_a_zero_price():
    with pytest.raises(KeyError, match="TPU"):
        price_phase(PRICES, "DENOISING", "TPU", 1.0)


def test_negative_duration_is_refused():
    with pytest.raises(ValueError):
        price_phase(PRICES, "DENOISING", "H100", -1)


def test_absurd_prices_are_refused_at_load():
    with pytest.raises(ValueError, match="dollars_per_device_hour"):
        PriceConfig(dollars_per_device_hour={"H100": -3})
