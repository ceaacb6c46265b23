"""How the farm's routers rank replicas for a request (Serve's router classes, no Ray cluster)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import PendingRequest

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


def pending(internal_id: str) -> PendingRequest:
    """A request waiting for a replica (in a running event loop: it holds a future)."""
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=internal_id,
                                                                       internal_request_id=internal_id))


def real_router() -> ChunkRouter:
    router = ChunkRouter(DeploymentID(name="postproc", app_name="farm"), DeploymentHandleSource.REPLICA)
    router.initialize_state()
    return router


def waiting(router: ChunkRouter, request: PendingRequest) -> PendingRequest:
    router._pending_requests_to_fulfill.append(request)
    router._add_pending_request_to_indices(request)
    return request


def counted(router: ChunkRouter) -> list[str]:
    return sorted(router._replica_of(chosen, request) for chosen, request in router._assigned.values())


def test_a_burst_sent_at_once_spreads_and_finished_requests_free_their_replica():
    """Counted when chosen, not when sent: four requests at once go two and two."""

    async def scenario() -> None:
        router = real_router()
        replicas = {name: replica(name) for name in ("a", "b")}
        requests = {rid: pending(rid) for rid in ("r1", "r2", "r3", "r4")}
        chosen = {rid: router._rank(list(replicas.values()), request)[0][0].name for rid, request in requests.items()}
        assert sorted(chosen.values()) == ["a", "a", "b", "b"]

        # A request chosen again (Serve retries it) is counted once, where it goes now.
        router._rank(list(replicas.values()), requests["r4"])
        assert counted(router) == ["a", "a", "b", "b"]

        # Two are sent and finish on one replica: the next request goes there.
        for rid in [rid for rid, name in chosen.items() if name == "a"]:
            requests[rid].future.set_result(replicas["a"])
            router.on_request_completed(replicas["a"].replica_id, rid)
        assert router._rank(list(replicas.values()), pending("r5"))[0][0].name == "a"

    asyncio.run(scenario())


def test_a_request_cancelled_before_it_was_sent_no_longer_counts():
    async def scenario() -> None:
        router = real_router()
        replicas = [replica("a"), replica("b")]
        gone = pending("gone")
        router._rank(replicas, gone)
        assert counted(router) == ["a"]  # counted when chosen
        gone.future.cancel()
        following = pending("next")
        router._rank(replicas, following)
        # The cancelled one no longer weighs on its replica.
        assert [request for _, request in router._assigned.values()] == [following]

    asyncio.run(scenario())


def test_requests_sharing_an_id_handed_replicas_first_in_first_out_still_spread():
    """The requests a replica makes while serving one (a clip's chunks) share its internal
    id, and Serve hands the replica found for the second to the first (FIFOMixin): each
    is counted where it was sent, so the second's next look goes to the other replica,
    and a finished one frees the replica it ran on."""

    async def scenario() -> None:
        router = real_router()
        replicas = {name: replica(name) for name in ("a", "b")}
        first, second = waiting(router, pending("render")), waiting(router, pending("render"))
        assert router._rank(list(replicas.values()), first)[0][0].name == "a"
        found = router._rank(list(replicas.values()), second)[0][0]
        assert found.name == "b"
        router._fulfill_next_pending_request(found, second.metadata)
        assert first.future.result() is replicas["b"] and not second.future.done()

        # Serve looks again for the second: the first is counted on b, where it went.
        again = router._rank(list(replicas.values()), second)[0][0]
        assert again.name == "a"
        router._fulfill_next_pending_request(again, second.metadata)
        assert second.future.result() is replicas["a"]
        assert counted(router) == ["a", "b"]

        router.on_request_completed(replicas["b"].replica_id, "render")
        assert counted(router) == ["a"]

    asyncio.run(scenario())


def test_one_replica_or_none():
    assert names(least_assigned_in_turn([replica("a")], {"a": 3}, 7)) == [["a"]]
    assert least_assigned_in_turn([], {}, 3) == []


def on_node(unique_id: str, node_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), name=unique_id, node_id=node_id)


def test_a_retried_render_goes_to_a_node_it_has_not_failed_on_and_never_waits_for_one():
    """The engine router ranks replicas on the nodes where the render failed (its request's
    `avoid_nodes`, as the engine names nodes: host/<Ray node id prefix>) after all others;
    with no replica elsewhere it takes them rather than wait."""
    from farm.config import Task
    from farm.domain.engine import EngineRequest
    from farm.serve.routing import EngineRouter

    good, bad = "1f2e3d4c5b6a" + "0" * 44, "a3f0c2d1e4b5" + "9" * 44
    replicas = [on_node("on-bad", bad), on_node("on-good", good)]

    def request(*avoid: str) -> PendingRequest:
        engine_request = EngineRequest(render_id="r1", attempt=2, task=Task.TEXT_TO_VIDEO, prompt="x",
                                       negative_prompt="", image=None, width=32, height=32, num_frames=9, fps=8,
                                       num_inference_steps=2, guidance_scale=3.0, seed=1, avoid_nodes=avoid)
        return PendingRequest(args=[engine_request], kwargs={},
                              metadata=RequestMetadata(request_id="r1", internal_request_id="r1"))

    async def scenario() -> None:
        router = EngineRouter(DeploymentID(name="engine", app_name="farm"), DeploymentHandleSource.REPLICA)
        router.initialize_state()
        router._current_fence = lambda: {}
        for _ in range(3):  # whoever's turn it is
            ranks = await router.choose_replicas(replicas, request(f"gpu-7/{bad[:12]}"))
            assert names(ranks) == [["on-good"], ["on-bad"]]
            router._assigned.clear()
        # Failed on every node the pool has: it runs on one of them at once.
        ranks = await router.choose_replicas(replicas, request(f"gpu-7/{bad[:12]}", f"gpu-8/{good[:12]}"))
        assert sorted(sum(names(ranks), [])) == ["on-bad", "on-good"]
        # A first attempt, or a request without an engine request, ranks all replicas alike.
        assert sorted(sum(names(await router.choose_replicas(replicas, request())), [])) == ["on-bad", "on-good"]
        assert len(sum(names(await router.choose_replicas(replicas, None)), [])) == 2
        # A quarantined node stays out whatever the render avoids.
        router._current_fence = lambda: {good[:12]: 2e9}
        assert names(await router.choose_replicas(replicas, request(f"gpu-7/{bad[:12]}"))) == [["on-bad"]]

    asyncio.run(scenario())
