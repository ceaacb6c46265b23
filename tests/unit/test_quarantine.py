"""Keeping a failing node out of its pools: the counting (no Ray); the routing side
runs in tests/cluster."""

from __future__ import annotations

import pytest

from farm.config import SchedulerConfig
from farm.jobs.scheduler.quarantine import NodeQuarantine
from farm.serve.flags import node_id_prefix, on_fenced_node


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_node_is_quarantined_at_the_nth_failure_within_the_window_and_released_after():
    clock = Clock()
    quarantine = NodeQuarantine(failures=3, window_s=60, duration_s=120, clock=clock)
    assert quarantine.record_failure("host/aaaa") is None
    clock.now += 10
    assert quarantine.record_failure("host/aaaa") is None
    assert quarantine.record_failure("host/bbbb") is None  # another node's failures do not count
    clock.now += 10
    assert quarantine.record_failure("host/aaaa") == pytest.approx(clock.now + 120)
    assert quarantine.active() == {"host/aaaa": pytest.approx(clock.now + 120)}
    # Failures during the quarantine neither extend it nor count towards the next one.
    assert quarantine.record_failure("host/aaaa") is None
    clock.now += 121
    assert quarantine.active() == {}
    assert quarantine.record_failure("host/aaaa") is None


def test_failures_spread_wider_than_the_window_never_quarantine():
    clock = Clock()
    quarantine = NodeQuarantine(failures=2, window_s=60, duration_s=120, clock=clock)
    for _ in range(5):
        assert quarantine.record_failure("host/aaaa") is None
        clock.now += 61
    assert quarantine.active() == {}


def test_one_render_failing_again_and_again_on_a_node_counts_once():
    """A render that fails wherever it runs, retried on a farm's only node, must not close
    that node to every other render (it used to: three failures of one render did)."""
    clock = Clock()
    quarantine = NodeQuarantine(failures=3, window_s=60, duration_s=120, clock=clock)
    for _ in range(5):
        assert quarantine.record_failure("host/aaaa", "r-bad") is None
        clock.now += 1
    assert quarantine.active() == {}
    # Renders of their own still count, the bad one once among them.
    assert quarantine.record_failure("host/aaaa", "r-2") is None
    assert quarantine.record_failure("host/aaaa", "r-3") == pytest.approx(clock.now + 120)
    # Once its failure has left the window, the same render counts again.
    clock.now += 200
    assert quarantine.record_failure("host/aaaa", "r-bad") is None
    clock.now += 61
    assert quarantine.record_failure("host/aaaa", "r-bad") is None
    assert quarantine.record_failure("host/aaaa", "r-4") is None
    assert quarantine.record_failure("host/aaaa", "r-5") == pytest.approx(clock.now + 120)


def test_zero_failures_turns_quarantine_off():
    quarantine = NodeQuarantine(failures=0, window_s=60, duration_s=120)
    assert all(quarantine.record_failure("host/aaaa") is None for _ in range(50))
    assert quarantine.active() == {}


def test_replicas_are_matched_to_quarantined_nodes_by_their_ray_node_id():
    node_id = "a3f0c2d1e4b5" + "9" * 44
    fenced = {node_id_prefix("gpu-7/a3f0c2d1e4b5"): 2e9}
    assert on_fenced_node(node_id, fenced)
    assert not on_fenced_node("b" * 56, fenced)
    assert not on_fenced_node(None, fenced)  # a replica whose node is not known yet is used


@pytest.mark.parametrize("field, value", [("quarantine_after_failures", -1), ("quarantine_s", 0),
                                          ("quarantine_window_s", 10**6)])
def test_quarantine_settings_out_of_range_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})
