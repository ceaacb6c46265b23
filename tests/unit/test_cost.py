"""Cost arithmetic: device-seconds x price, in integer nanodollars; an attempt's charges
from the phases it ran."""

from __future__ import annotations

import pytest

from farm.config import PriceConfig
from farm.domain.events import PhaseTiming, RenderProgress
from farm.domain.states import Stage
from farm.metering.charging import AttemptMeter, charge_timings
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


def test_an_attempt_is_metered_by_its_finished_phases_and_its_steps():
    meter = AttemptMeter("H100")
    meter.record(RenderProgress(Stage.ENCODING_PROMPT, node="n1"))
    # A stage change closes the phase before it; denoising is metered per step on the attempt's device.
    meter.record(RenderProgress(Stage.DENOISING, finished_phases=(PhaseTiming(Stage.ENCODING_PROMPT, "H100", 0.5),)))
    for step in (1, 2):
        meter.record(RenderProgress(Stage.DENOISING, step=step, total_steps=2, step_seconds=0.25))
    assert meter.seconds == 1.0
    metered = meter.charge(PRICES)
    assert metered.timing_rows() == [["ENCODING_PROMPT", "H100", 0.5], ["DENOISING", "H100", 0.25],
                                     ["DENOISING", "H100", 0.25]]
    assert [(c.phase, c.device_kind, c.device_seconds, c.nanodollars) for c in metered.charges] == [
        ("ENCODING_PROMPT", "H100", 0.5, 500_000), ("DENOISING", "H100", 0.5, 500_000)]


def test_an_attempt_is_charged_for_the_phases_its_replica_reports_at_its_end():
    meter = AttemptMeter("H100")
    meter.record(RenderProgress(Stage.DENOISING, step=1, total_steps=4, step_seconds=0.25))
    reported = [PhaseTiming(Stage.DENOISING, "H100", 2.0), PhaseTiming(Stage.ENCODING, "CPU", 1.0)]
    charged = meter.charge(PRICES, reported)
    assert charged.timings == tuple(reported)
    assert sum(c.nanodollars for c in charged.charges) == 2_000_000 + 10_000
    assert meter.charge(PRICES, ()).charges == []  # reported, with nothing in it: nothing is charged
    assert charge_timings(PRICES, [("DENOISING", "H100", 1.0)]).charges == price_timings(PRICES, [
        ("DENOISING", "H100", 1.0)])
    with pytest.raises(KeyError, match="TPU"):
        charge_timings(PRICES, [("DENOISING", "TPU", 1.0)])
