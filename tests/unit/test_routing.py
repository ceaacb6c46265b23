"""How the farm's routers rank replicas for a request (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from farm.serve.routing import ChunkRouter, least_assigned_in_turn


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), name=unique_id)


def names(ranks: list[list]) -> list[list[str]]:
    return [[r.name for r in rank] for rank in ranks]


def test_idle_replicas_take_requests_in_turn_whatever_order_serve_lists_them():
    replicas = [replica("b"), replica("c"), replica("a")]
    firsts = [names(least_assigned_in_turn(list(reversed(replicas)) if turn % 2 else replicas, {}, turn))[0]
              for turn in range(6)]
    assert firsts == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]


def test_the_replica_with_the_fewest_outstanding_requests_comes_first_and_the_rest_follow():
    replicas = [replica("a"), replica("b"), replica("c")]
    assert names(least_assigned_in_turn(replicas, {"a": 2, "b": 0, "c": 1}, 0)) == [["b"], ["c", "a"]]
    # Whose turn it is only breaks ties.
    assert names(least_assigned_in_turn(replicas, {"a": 1, "b": 1, "c": 0}, 1)) == [["c"], ["b", "a"]]


def request(request_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(internal_request_id=request_id),
                           future=SimpleNamespace(cancelled=lambda: False))


def test_a_burst_sent_at_once_spreads_and_finished_requests_free_their_replica():
    """Counted when chosen, not when sent: four requests at once go two and two."""
    router = ChunkRouter.__new__(ChunkRouter)  # its state and ranking alone, without Serve
    router.initialize_state()
    replicas = [replica("a"), replica("b")]
    chosen = {rid: router._rank(replicas, request(rid))[0][0].name for rid in ("r1", "r2", "r3", "r4")}
    assert sorted(chosen.values()) == ["a", "a", "b", "b"]

    # A request chosen again (Serve retries it) is counted once, where it goes now.
    router._rank(replicas, request("r4"))
    assert sorted(name for name, _ in router._assigned.values()) == ["a", "a", "b", "b"]

    # Two finish on one replica: the next request goes there.
    for rid in [rid for rid, name in chosen.items() if name == "a"]:
        router.on_request_completed(None, rid)
    assert router._rank(replicas, request("r5"))[0][0].name == "a"


def test_a_request_cancelled_before_it_was_sent_no_longer_counts():
    router = ChunkRouter.__new__(ChunkRouter)
    router.initialize_state()
    replicas = [replica("a"), replica("b")]
    cancelled = SimpleNamespace(metadata=SimpleNamespace(internal_request_id="gone"),
                                future=SimpleNamespace(cancelled=lambda: True))
    router._rank(replicas, cancelled)
    assert list(router._assigned) == ["gone"]  # counted when chosen
    router._rank(replicas, request("next"))
    assert list(router._assigned) == ["next"]  # the cancelled one no longer weighs on its replica


def test_one_replica_or_none():
    assert names(least_assigned_in_turn([replica("a")], {"a": 3}, 7)) == [["a"]]
    assert least_assigned_in_turn([], {}, 3) == []
