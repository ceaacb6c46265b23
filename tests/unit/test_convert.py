"""What ListModels tells a client of a model's limits is every limit the model has."""

from __future__ import annotations

import pytest

from farm.api.convert import model_to_pb
from farm.config import FarmConfig


@pytest.mark.parametrize("model", FarmConfig().served_models(), ids=lambda m: m.name)
def test_every_limit_of_the_contract_is_the_model_s_own(model):
    info = model_to_pb(model, ready=True, device_kinds=["CPU"])
    for field in info.limits.DESCRIPTOR.fields:
        expected = getattr(model.limits, field.name)
        assert getattr(info.limits, field.name) == pytest.approx(expected), field.name
    assert info.limits.min_steps == model.limits.min_steps >= 1
