"""How a clip's chunks are spread over the post-processing replicas (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from farm.serve.routing import in_turn


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), name=unique_id)


def names(ranks: list[list]) -> list[list[str]]:
    return [[r.name for r in rank] for rank in ranks]


def test_consecutive_chunks_go_to_each_replica_in_turn_whatever_order_serve_lists_them():
    replicas = [replica("b"), replica("c"), replica("a")]
    firsts = [names(in_turn(list(reversed(replicas)) if turn % 2 else replicas, turn))[0] for turn in range(6)]
    assert firsts == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]


def test_the_other_replicas_follow_as_the_fallback_rank():
    # A replica whose queue is full is skipped: Serve then takes the least loaded of the next rank.
    assert names(in_turn([replica("a"), replica("b"), replica("c")], 1)) == [["b"], ["c", "a"]]


def test_one_replica_or_none():
    assert names(in_turn([replica("a")], 7)) == [["a"]]
    assert in_turn([], 3) == []
