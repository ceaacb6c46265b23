"""Allowed state changes of a render."""

from __future__ import annotations

import pytest

from farm.domain.states import (
    FINAL_STATES,
    IllegalTransition,
    RenderState,
    check_transition,
)


@pytest.mark.parametrize("current,new", [
    (RenderState.QUEUED, RenderState.RUNNING),
    (RenderState.QUEUED, RenderState.CANCELLED),
    (RenderState.RUNNING, RenderState.SUCCEEDED),
    (RenderState.RUNNING, RenderState.FAILED),
    (RenderState.RUNNING, RenderState.CANCELLED),
    (RenderState.RUNNING, RenderState.QUEUED),  # a lost lease
])
def test_allowed(current, new):
    check_transition(current, new)


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
@pytest.mark.parametrize("new", list(RenderState))
def test_final_states_are_final(final, new):
    with pytest.raises(IllegalTransition):
        check_transition(final, new)


def test_queued_cannot_skip_to_succeeded():
    with pytest.raises(IllegalTransition):
        check_transition(RenderState.QUEUED, RenderState.SUCCEEDED)
