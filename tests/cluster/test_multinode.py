"""The farm on a several-node Ray cluster: placement by accelerator kind, scaling
with the backlog, preemption with resume from a checkpoint, and nodes removed in the
middle of renders. Every render finishes exactly once and is charged exactly once."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import sqlalchemy

from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.records import RenderRecord
from farm.serve.flags import hold_next_render, release
from farm.storage.artifacts import ArtifactStore
from tests.cluster.conftest import TIMEOUT_S
from tests.cluster.sim import wait_for
from tests.holds import wait_held

# The first test also starts the cluster (its own bounded waits, up to 300 s for the
# pools); pytest's per-test timeout counts set-up too, and the default 300 s is too tight
# on a loaded 2-core machine. Every wait inside has its own bound.
pytestmark = pytest.mark.timeout(1200)


def submit(farm, tenant, **fields) -> RenderRecord:
    return farm.submit(tenant.id, "ltx", **fields)


def final(farm, render_id: str, timeout: float = TIMEOUT_S) -> RenderRecord:
    return wait_for(lambda: (r := farm.store.get(None, render_id)).state.is_final and r, timeout,
                    what=f"render {render_id} to finish")


def attempts(farm, render_id: str) -> list:
    with farm.store._read() as session:
        return list(session.execute(
            sqlalchemy.select(t.Attempt.number, t.Attempt.outcome, t.Attempt.node, t.Attempt.device_kind)
            .where(t.Attempt.render_id == render_id).order_by(t.Attempt.number)).all())


def frames_of(farm, record: RenderRecord) -> np.ndarray:
    store = ArtifactStore(farm.config.artifacts_url)
    data = b"".join(chunk for _, chunk in store.read_chunks(record.artifact_uri, 1 << 20))
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def node_id(farm, name: str) -> str:
    return farm.nodes[name].node_id[:12]


def test_renders_run_on_the_kind_they_require(cluster_farm, tenant):
    farm = cluster_farm
    on_a100 = submit(farm, tenant, require_device_kind="A100")
    # The H100 pool starts at zero replicas: its backlog wakes it (a cold start).
    on_h100 = submit(farm, tenant, require_device_kind="H100")
    for render, kind, nodes in ((on_a100, "A100", ["a100-a"]), (on_h100, "H100", ["h100-a", "h100-b"])):
        record = final(farm, render.id)
        assert record.state is RenderState.SUCCEEDED, record.error
        assert record.device_kind == kind
        [(number, outcome, node, device_kind)] = attempts(farm, render.id)
        assert device_kind == kind and any(node.endswith(node_id(farm, n)) for n in nodes), node


def test_the_backlog_scales_a_pool_up_and_idleness_back_to_zero(cluster_farm, tenant, holds):
    farm = cluster_farm
    # The first render holds its replica until the pool has grown, so the backlog stays
    # queued however fast the machine renders.
    hold_next_render("ltx", step=1, device_kind="H100")
    renders = [submit(farm, tenant, require_device_kind="H100", num_inference_steps=4, seed=i) for i in range(8)]
    first, _ = wait_held()
    wait_for(lambda: farm.running_replicas("ltx", "H100") == 2, TIMEOUT_S, what="the H100 pool to reach its maximum")
    release(first)
    records = [final(farm, r.id) for r in renders]
    assert all(r.state is RenderState.SUCCEEDED for r in records), [r.error for r in records]
    # Scaling down drains: no render lost an attempt to it.
    assert all(r.attempt == 1 for r in records)
    wait_for(lambda: farm.running_replicas("ltx", "H100") == 0, TIMEOUT_S, what="the idle H100 pool to scale to zero")
    pools = {p.device_kind: p for p in farm.store.pools()}
    assert pools["H100"].min_replicas == 0 and pools["H100"].max_replicas == 2


def test_an_urgent_render_preempts_and_the_preempted_render_resumes_identically(cluster_farm, tenant, holds):
    farm = cluster_farm
    spec = dict(require_device_kind="A100", num_inference_steps=8, num_frames=17, width=128, height=128, seed=11,
                priority=10)
    reference = final(farm, submit(farm, tenant, **spec).id)
    assert reference.state is RenderState.SUCCEEDED, reference.error

    # The victim waits after step 3 until the preemption reaches it: it is denoising when
    # the urgent render comes, however fast the machine.
    hold_next_render("ltx", step=3, device_kind="A100")
    victim = submit(farm, tenant, **spec)
    assert wait_held()[0] == victim.id
    urgent = submit(farm, tenant, require_device_kind="A100", priority=90, num_inference_steps=4, seed=1)
    urgent_done, victim_done = final(farm, urgent.id), final(farm, victim.id)
    assert urgent_done.state is RenderState.SUCCEEDED and victim_done.state is RenderState.SUCCEEDED
    events = farm.store.events_after(victim.id, 0)
    told = [(who, e.time.isoformat()[11:], e.attempt, e.stage.value, e.step, e.message)
            for who, rid in (("victim", victim.id), ("urgent", urgent.id))
            for e in farm.store.events_after(rid, 0) if e.message or e.step < 4]
    assert urgent_done.finished_at < victim_done.finished_at, (urgent_done.finished_at, told)
    assert victim_done.preemptions == 1, told

    [preempted] = [e for e in events if "preempted at step" in e.message]
    step = int(preempted.message.split("preempted at step ")[1].split(";")[0])
    assert step == 3, "the preemption ended the hold, so the engine stops right after the held step"
    resumed_steps = [e.step for e in events if e.attempt == 2 and e.step]
    assert resumed_steps and min(resumed_steps) == step + 1, "the resumed attempt did not start at its checkpoint"
    # The same video as if it had never been interrupted (same seed).
    np.testing.assert_array_equal(frames_of(farm, victim_done), frames_of(farm, reference))
    checkpoints = ArtifactStore(farm.config.artifacts_url)
    assert not checkpoints.fs.exists(checkpoints.checkpoint_prefix(victim.id)), "checkpoints left after the render"
    # It paid for each step once: the preempted attempt's steps plus the rest.
    charged = {c.attempt for c in victim_done.charges if c.phase == "DENOISING"}
    assert charged == {1, 2}


def test_nodes_removed_mid_render_lose_nothing_and_charge_nothing_twice(cluster_farm, tenant, holds):
    farm = cluster_farm
    # An H100 render waits after step 2 on its node until that node is taken away. Half
    # the renders need the H100 pool (scaled to zero by now), the rest go where placement sends them.
    hold_next_render("ltx", step=2, device_kind="H100")
    renders = [submit(farm, tenant, num_inference_steps=6, seed=100 + i,
                      **({"require_device_kind": "H100"} if i % 2 else {})) for i in range(12)]
    try:
        held_render, hold = wait_held()
    except TimeoutError:
        raise AssertionError(f"scheduler: {farm.scheduler_status()}; "
                             f"renders: {[(r.state, r.attempt, r.step) for r in farm.store.list(tenant.id)[0]]}")
    assert held_render in {r.id for r in renders}
    victim_node = next(name for name in ("h100-a", "h100-b")
                       if name in farm.nodes and hold["node"].endswith(node_id(farm, name)))
    farm.remove_node(victim_node)
    # And the database drops every connection of the farm's, as in a restart.
    assert farm.cut_store_connections() >= 1
    farm.add_gpu_node(f"{victim_node}-new", "H100")

    records = [final(farm, r.id, timeout=400) for r in renders]
    assert all(r.state is RenderState.SUCCEEDED for r in records), [r.error for r in records]
    for record in records:
        outcomes = [a.outcome for a in attempts(farm, record.id)]
        assert outcomes.count("SUCCEEDED") == 1 and outcomes[-1] == "SUCCEEDED", outcomes
        charged_attempts = {c.attempt for c in record.charges}
        lost = {a.number for a in attempts(farm, record.id) if a.outcome == "LOST"}
        assert not charged_attempts & lost, "an attempt lost to the node was charged"
    ledger = farm.store.ledger_total_nanodollars(tenant.id)
    every_render = farm.store.list(tenant.id, page_size=1000)[0]
    assert ledger == sum(r.cost_nanodollars for r in every_render)


def test_a_killed_scheduler_loses_no_render(cluster_farm, tenant, holds):
    """The scheduler replica dies mid-render (SIGKILL): Serve starts a new one, whose
    claims resume once the old leases expire; every render finishes once."""
    import os
    import signal

    from ray._private.state import actors

    farm = cluster_farm
    hold_next_render("ltx", step=2, device_kind="A100")  # mid-render when the scheduler dies
    renders = [submit(farm, tenant, require_device_kind="A100", num_inference_steps=6, seed=300 + i)
               for i in range(3)]
    held_render, _ = wait_held()
    [scheduler] = [a for a in actors().values() if a["State"] == "ALIVE" and "#scheduler#" in a["Name"]]
    os.kill(scheduler["Pid"], signal.SIGKILL)
    # The orphaned attempt goes on; its replica renders the next attempt once it is done.
    release(held_render)
    records = [final(farm, r.id) for r in renders]
    assert all(r.state is RenderState.SUCCEEDED for r in records), [r.error for r in records]
    for record in records:
        outcomes = [a.outcome for a in attempts(farm, record.id)]
        assert outcomes.count("SUCCEEDED") == 1, outcomes
        assert {c.attempt for c in record.charges} <= {a.number for a in attempts(farm, record.id)
                                                        if a.outcome == "SUCCEEDED"}


def test_a_stopping_scheduler_hands_its_render_back_to_resume_from_a_checkpoint(cluster_farm, tenant, holds):
    """As Serve stops the scheduler replica (`drain`, what its `__del__` runs), a render
    held mid-denoising is preempted, checkpoints and goes back to the queue at once, its
    lease released; the next scheduler resumes it from the checkpoint."""
    import os
    import signal

    from ray import serve
    from ray._private.state import actors

    from tests.cluster.sim import APP

    farm = cluster_farm
    hold_next_render("ltx", step=2, device_kind="A100")
    render = submit(farm, tenant, require_device_kind="A100", num_inference_steps=5, seed=400)
    wait_held()
    serve.get_deployment_handle("scheduler", app_name=APP).drain.remote().result(timeout_s=60)
    handed_back = farm.store.get(None, render.id)
    assert (handed_back.state, handed_back.preemptions) == (RenderState.QUEUED, 1), handed_back
    assert handed_back.checkpoint_uri
    # A stopped scheduler stays stopped: its replica is replaced, as a pod's would be.
    [scheduler] = [a for a in actors().values() if a["State"] == "ALIVE" and "#scheduler#" in a["Name"]]
    os.kill(scheduler["Pid"], signal.SIGKILL)
    record = final(farm, render.id)
    assert (record.state, record.attempt) == (RenderState.SUCCEEDED, 2), record.error
    assert [a.outcome for a in attempts(farm, render.id)] == ["PREEMPTED", "SUCCEEDED"]


def test_a_node_that_keeps_failing_renders_is_kept_out_of_its_pool(cluster_farm, tenant):
    """`l40s-flaky` fails every render at step 2 (a chaos drill's bad GPU). Its failed
    renders finish elsewhere; after two failures the node is quarantined, and renders
    submitted from then on never go to it."""
    farm = cluster_farm
    flaky, good = node_id(farm, "l40s-flaky"), node_id(farm, "l40s-good")
    first = [farm.submit(tenant.id, "ltx-chaos", seed=400 + i) for i in range(4)]
    try:
        quarantined = wait_for(lambda: farm.scheduler_status().get("quarantined_nodes"), TIMEOUT_S,
                               what="the failing node to be quarantined")
    except TimeoutError:
        raise AssertionError(f"scheduler: {farm.scheduler_status()}; "
                             f"attempts: {[attempts(farm, r.id) for r in first]}")
    assert [node.rsplit("/", 1)[-1] for node in quarantined] == [flaky]
    later = [farm.submit(tenant.id, "ltx-chaos", seed=500 + i) for i in range(4)]
    records = [final(farm, r.id) for r in first + later]
    assert all(r.state is RenderState.SUCCEEDED for r in records), [r.error for r in records]
    failed_on_flaky = 0
    for record in records:
        tried = attempts(farm, record.id)
        assert [a.outcome for a in tried].count("SUCCEEDED") == 1
        assert tried[-1].node.endswith(good), tried
        failed_on_flaky += sum(1 for a in tried if a.outcome == "RETRIED" and a.node.endswith(flaky))
    assert failed_on_flaky >= 2
    for record in records[len(first):]:
        assert all(a.node.endswith(good) for a in attempts(farm, record.id)), attempts(farm, record.id)
    # The pool counts the quarantined replica out.
    pool = farm.scheduler_status()["pools"]["ltx-chaos/L40S"]
    assert pool["fenced_replicas"] == 1 and pool["replicas"] == 1, pool
