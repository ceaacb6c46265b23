"""Scale-out on a simulated multi-node cluster (`tests/cluster/sim.py`): head node +
nodes with one logical GPU each, engines running the tiny LTX-Video model on the CPU.

1. Queue wait under a growing backlog (0 -> N renders, submitted at a steady rate):
   an autoscaled pool (0..2 replicas, scaled from its backlog) versus a fixed pool of
   2 replicas, one after the other in the same run. Wait = submit to the render's first
   engine stage. The ratio says what autoscaling costs in waiting (cold starts) for
   the GPU-hours it saves (reported as replica-seconds held).
2. Preemption latency: a one-replica pool busy with a long low-priority render, an
   urgent render arrives; time from its submit to its first denoising step, against
   one denoising step of the victim plus its checkpoint write.
3. Chaos: R renders while a GPU node with a replica on it is removed (and a fresh one
   added) every few seconds: renders lost (not SUCCEEDED exactly once) and attempts
   charged twice must be 0; attempts lost with their node are requeued, not charged.

Run: .venv/bin/python benchmarks/scale.py [--backlog 50] [--preemptions 5] [--chaos 100] [--node-every 3]
Needs the PostgreSQL server at 127.0.0.1:5432 (the store of a cluster).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy  # noqa: E402

from farm.config import PoolConfig, Task  # noqa: E402
from farm.domain.states import RenderState  # noqa: E402
from farm.jobs import schema as t  # noqa: E402
from tests.cluster.sim import cluster_farm, tiny_ltx, wait_for  # noqa: E402

SMALL = dict(width=64, height=64, num_frames=9, num_inference_steps=8)


def first_engine_stage(farm, render_id: str, stages=("ENCODING_PROMPT", "DENOISING")) -> dt.datetime | None:
    return next((e.time for e in farm.store.events_after(render_id, 0) if e.stage.value in stages), None)


def wait_done(farm, ids: list[str], timeout: float = 900) -> list:
    return [wait_for(lambda i=i: (r := farm.store.get(None, i)).state.is_final and r, timeout, what=f"render {i}")
            for i in ids]


def backlog_phase(farm, tenant_id: str, model: str, kind: str, count: int, interval_s: float) -> dict:
    """Submits `count` renders at a steady rate; returns waits and replica-seconds held."""
    held = {"replica_seconds": 0.0, "max": 0}
    stop = threading.Event()

    def sample():
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.25)
            now = time.monotonic()
            replicas = farm.running_replicas(model, kind)
            held["replica_seconds"] += replicas * (now - last)
            held["max"] = max(held["max"], replicas)
            last = now

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    ids = []
    for i in range(count):
        ids.append(farm.submit(tenant_id, model, seed=i, **SMALL).id)
        time.sleep(interval_s)
    records = wait_done(farm, ids)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    bad = [(r.id, r.state.value, r.error, [e.message for e in farm.store.events_after(r.id, 0) if e.message])
           for r in records if r.state is not RenderState.SUCCEEDED]
    if bad:
        print("renders that did not succeed:", bad, flush=True)
    firsts = {r.id: first_engine_stage(farm, r.id) for r in records if r.state is RenderState.SUCCEEDED}
    for rid, first in firsts.items():
        if first is None:
            print("no engine stage event:", rid, [(e.seq, e.stage.value, e.step, e.attempt, e.message)
                                                  for e in farm.store.events_after(rid, 0)], flush=True)
    waits = [(first - r.created_at).total_seconds() for r in records if (first := firsts.get(r.id)) is not None]
    return {"renders": count, "succeeded": sum(r.state is RenderState.SUCCEEDED for r in records),
            "mean_wait_s": statistics.mean(waits), "p95_wait_s": sorted(waits)[int(0.95 * (len(waits) - 1))],
            "max_wait_s": max(waits), "elapsed_s": elapsed, "replica_seconds": held["replica_seconds"],
            "max_replicas": held["max"]}


# The victim of the preemption phase: steps long enough to see the bound (a GPU step
# takes 0.1-2 s; tiny CPU steps at small sizes take milliseconds, less than the farm's
# own path from a submit to an engine), about 0.25 s with either transformer.
VICTIM = {"ltx-urgent": dict(width=768, height=512, num_frames=121),
          "ltx-urgent-deep": dict(width=512, height=384, num_frames=97)}
DEEP_LAYERS = 8


def deep_tiny_ltx(models_dir: Path, name: str, pools: list[PoolConfig], layers: int = DEEP_LAYERS):
    """The tiny LTX-Video with a transformer of `layers` blocks instead of one: real
    transformers are many blocks deep (28 in LTX-Video 2B, 42 in CogVideoX-5B), and a
    preemption waits for the running layer, so a one-block model shows a whole step."""
    import torch
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    model = tiny_ltx(models_dir, name, pools)
    target = models_dir / f"ltx-video-tiny-{layers}-layers"
    if not target.exists():
        pipe = LTXPipeline.from_pretrained(model.sources[Task.TEXT_TO_VIDEO])
        torch.manual_seed(0)
        pipe.transformer = LTXVideoTransformer3DModel(**{**pipe.transformer.config, "num_layers": layers})
        pipe.save_pretrained(target)
    return model.model_copy(update={"sources": {Task.TEXT_TO_VIDEO: str(target)}})


def preemption_phase(farm, tenant_id: str, model: str) -> dict:
    """A one-replica pool busy with a long low-priority render; an urgent one arrives."""
    victim = farm.submit(tenant_id, model, priority=10, seed=500, num_inference_steps=20, **VICTIM[model])
    wait_for(lambda: farm.store.get(None, victim.id).step >= 3, 300, what="the victim denoising")
    urgent = farm.submit(tenant_id, model, priority=90, seed=1, **SMALL)
    wait_done(farm, [urgent.id])
    first_step = first_engine_stage(farm, urgent.id, stages=("DENOISING",))
    if first_step is None:
        record = farm.store.get(None, urgent.id)
        raise SystemExit(f"the urgent render never denoised: {record.state.value}: {record.error}")
    latency = (first_step - urgent.created_at).total_seconds()
    [victim] = wait_done(farm, [victim.id])
    events = farm.store.events_after(victim.id, 0)
    note = next((e for e in events if "preempted at step" in e.message), None)
    timeline = [(round((e.time - urgent.created_at).total_seconds(), 3), who, e.stage.value, e.message)
                for who, rid in (("urgent", urgent.id), ("victim", victim.id))
                for e in farm.store.events_after(rid, 0) if not e.step or e.step == 1 or "preempt" in e.message]
    if note is None:
        return {"preempted": False, "submit_to_first_step_s": latency, "timeline_s": sorted(timeline)}
    checkpoint_s = float(re.search(r"written in ([0-9.]+) s", note.message).group(1))
    denoise = [c for c in victim.charges if c.phase == "DENOISING"]
    step_s = sum(c.device_seconds for c in denoise) / victim.spec.num_inference_steps
    return {"preempted": True, "submit_to_first_step_s": latency, "victim_step_s": step_s,
            "checkpoint_write_s": checkpoint_s, "bound_s": step_s + checkpoint_s,
            "within_bound": latency <= step_s + checkpoint_s, "victim_succeeded": victim.state is RenderState.SUCCEEDED,
            "victim_preemptions": victim.preemptions, "timeline_s": sorted(timeline)}


def chaos_phase(farm, tenant_id: str, model: str, count: int, every_s: float) -> dict:
    # Renders long enough (about a second) that nodes go while they run.
    ids = [farm.submit(tenant_id, model, seed=1000 + i, width=128, height=128, num_frames=17,
                       num_inference_steps=16).id for i in range(count)]
    removed = 0
    generation = 0
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        time.sleep(every_s)
        states = [farm.store.get(None, i).state for i in ids]
        if all(s.is_final for s in states):
            break
        victim = next((n for n in sorted(farm.nodes) if n.startswith("chaos")), None)
        if victim is not None:
            farm.remove_node(victim)
            removed += 1
        generation += 1
        farm.add_gpu_node(f"chaos-{generation}", "L40S")
    records = wait_done(farm, ids)
    with farm.store._read() as session:
        rows = session.execute(sqlalchemy.select(t.Attempt.render_id, t.Attempt.number, t.Attempt.outcome)
                               .where(t.Attempt.render_id.in_(ids))).all()
        charged = session.execute(sqlalchemy.select(t.LedgerEntry.render_id, t.LedgerEntry.attempt)
                                  .where(t.LedgerEntry.render_id.in_(ids), t.LedgerEntry.charged.is_(True))
                                  .distinct()).all()
    outcomes: dict[str, list] = {}
    for row in rows:
        outcomes.setdefault(row.render_id, []).append(row.outcome)
    lost_attempts = {(r.render_id, r.number) for r in rows if r.outcome == "LOST"}
    succeeded_once = sum(1 for r in records if r.state is RenderState.SUCCEEDED
                         and outcomes[r.id].count("SUCCEEDED") == 1)
    charged_lost = sum(1 for c in charged if (c.render_id, c.attempt) in lost_attempts)
    charged_attempts_per_render = {}
    for c in charged:
        charged_attempts_per_render[c.render_id] = charged_attempts_per_render.get(c.render_id, 0) + 1
    ledger = sum(r.cost_nanodollars for r in records)
    with farm.store._read() as session:
        ledger_rows = session.scalar(sqlalchemy.select(sqlalchemy.func.sum(t.LedgerEntry.nanodollars)).where(
            t.LedgerEntry.render_id.in_(ids), t.LedgerEntry.charged.is_(True)))
    return {"renders": count, "nodes_removed": removed, "succeeded_exactly_once": succeeded_once,
            "lost": count - succeeded_once, "lost_attempts_requeued": len(lost_attempts),
            "lost_attempts_charged": charged_lost,
            "renders_charged_for_two_attempts": sum(1 for n in charged_attempts_per_render.values() if n > 1),
            "ledger_equals_render_costs": ledger == (ledger_rows or 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=50)
    parser.add_argument("--submit-interval", type=float, default=0.3)
    parser.add_argument("--preemptions", type=int, default=3)
    parser.add_argument("--chaos", type=int, default=100)
    parser.add_argument("--node-every", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--phases", default="backlog,preemption,chaos",
                        help="which of backlog, preemption, chaos to run (comma-separated)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases or phases - {"backlog", "preemption", "chaos"}:
        parser.error(f"--phases: choose from backlog, preemption, chaos; got {args.phases!r}")

    from farm.engines.tiny import make_tiny_models

    models_dir = Path(tempfile.mkdtemp(prefix="farm-scale-models-"))
    make_tiny_models(models_dir)
    auto = [PoolConfig(device_kind="H100", num_gpus=1, num_cpus=1, min_replicas=0, max_replicas=2,
                       backlog_target_s=5.0, downscale_delay_s=5.0)]
    fixed = [PoolConfig(device_kind="A100", num_gpus=1, num_cpus=1, min_replicas=2, max_replicas=2)]
    chaos = [PoolConfig(device_kind="L40S", num_gpus=1, num_cpus=1, min_replicas=2, max_replicas=2)]
    single = [PoolConfig(device_kind="CPU", num_cpus=1, min_replicas=1, max_replicas=1)]
    single_deep = [PoolConfig(device_kind="CPU", num_cpus=1, min_replicas=1, max_replicas=1)]
    models = [tiny_ltx(models_dir, "ltx-auto", auto), tiny_ltx(models_dir, "ltx-fixed", fixed),
              tiny_ltx(models_dir, "ltx-chaos", chaos), tiny_ltx(models_dir, "ltx-urgent", single)]
    if "preemption" in phases:
        models.append(deep_tiny_ltx(models_dir, "ltx-urgent-deep", single_deep))
    nodes = {"h100-a": "H100", "h100-b": "H100", "a100-a": "A100", "a100-b": "A100",
             "chaos-0a": "L40S", "chaos-0b": "L40S"}
    result: dict = {"machine": f"{platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores",
                    "date": dt.date.today().isoformat()}
    with cluster_farm(models, nodes) as farm:
        tenant, _ = farm.store.create_tenant("bench")
        if "backlog" in phases:
            result["autoscaled"] = backlog_phase(farm, tenant.id, "ltx-auto", "H100", args.backlog,
                                                 args.submit_interval)
            result["fixed"] = backlog_phase(farm, tenant.id, "ltx-fixed", "A100", args.backlog, args.submit_interval)
            result["wait_ratio_autoscaled_over_fixed"] = (result["autoscaled"]["mean_wait_s"]
                                                          / result["fixed"]["mean_wait_s"])
            result["replica_seconds_ratio_autoscaled_over_fixed"] = (result["autoscaled"]["replica_seconds"]
                                                                     / result["fixed"]["replica_seconds"])
            print(json.dumps(result, indent=2, default=str), flush=True)
        if "preemption" in phases:
            preemption_results(farm, tenant.id, args.preemptions, result)
        if "chaos" in phases:
            result["chaos"] = chaos_phase(farm, tenant.id, "ltx-chaos", args.chaos, args.node_every)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


def preemption_results(farm, tenant_id: str, count: int, result: dict) -> None:
    for model, key in (("ltx-urgent", "preemption"), ("ltx-urgent-deep", f"preemption_{DEEP_LAYERS}_layers")):
        runs = [preemption_phase(farm, tenant_id, model) for _ in range(count)]
        result[f"{key}_runs"] = runs
        done = [r for r in runs if r["preempted"]]
        result[key] = {
            "runs": len(runs), "preempted": len(done),
            "median_submit_to_first_step_s": statistics.median(r["submit_to_first_step_s"] for r in runs),
            "median_bound_s": statistics.median(r["bound_s"] for r in done) if done else None,
            "within_bound": sum(r["within_bound"] for r in done),
        }
        print(key, json.dumps(result[key], indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
