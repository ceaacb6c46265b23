"""Growth: with 100,000 queued renders, claims, ListRenders and autoscaling's backlog
read walk indexes (checked in the query plans on SQLite and PostgreSQL, never by wall
time), and the backlog read returns a row per kind of work instead of every spec, sizing
the pools as reading every spec did; retention prunes the old events and images of
renders that ended (in short batches, from the CLI and from the scheduler's autoscaling
round) while GetRender, ListRenders, WatchRender, the ledger and usage answer as before."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import re

import pytest
import sqlalchemy as sa
from sqlalchemy import String, case, cast, event, insert, literal, select, update
from typer.testing import CliRunner

from farm.cli.commands import app as farm_cli
from farm.config import GIB, FarmConfig, ModelConfig, PoolConfig, PriceConfig
from farm.domain.spec import RenderSpec, Task
from farm.domain.states import AttemptOutcome, RenderState, Stage
from farm.families import Family
from farm.jobs import schema as t
from farm.jobs.migrate import upgrade
from farm.jobs.records import ProgressUpdate
from farm.jobs.scheduler import Scheduler
from farm.jobs.scheduler.autoscale import (
    PoolLoad,
    assign_backlog,
    assign_grouped_backlog,
    wanted_replicas,
)
from farm.jobs.store import JobStore
from farm.jobs.validation import resolve_spec
from farm.metering.cost import price_timings
from farm.v1 import render_pb2 as pb
from tests.gateway import serving

OWNER = "growth-test"
QUEUED = 100_000
ENDED = 20_000
TENANTS = 20
MODEL = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "no-such-dir"},
                    pools=[PoolConfig(device_kind=kind, num_gpus=1, min_replicas=0, max_replicas=4)
                           for kind in ("H100", "A100")])
SHAPES = [(256, 256, 17, 4), (512, 512, 33, 20), (768, 512, 65, 30)]


def resolved(width=256, height=256, frames=17, steps=4, priority=None, require="", memory_gib=None, prompt="a kite"):
    request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt=prompt, width=width, height=height,
                         num_frames=frames, num_inference_steps=steps, priority=priority, require_device_kind=require)
    spec = resolve_spec(request, {"ltx": MODEL})
    if memory_gib is not None:  # what the gateway's memory estimate would have stored
        spec = dataclasses.replace(spec, memory_bytes=int(memory_gib * GIB))
    return request, spec


# A store of 100,000 queued renders ---------------------------------------------------------


def fill(store: JobStore, tenant_ids: list[str], count: int, state: RenderState) -> None:
    """`count` renders in one INSERT ... SELECT over a recursive CTE of numbers (rows made
    by the database, not 100,000 submits): each shape, with and without a required kind,
    tenants and priorities in turn."""
    kinds = [(resolved(*shape)[1], require) for shape in SHAPES for require in (None, "H100")]
    numbers = select(literal(0).label("n")).cte("numbers", recursive=True)
    numbers = numbers.union_all(select(numbers.c.n + 1).where(numbers.c.n < count - 1))
    n = numbers.c.n

    def in_turn(values, type_=None):
        return case({i: literal(v, type_ or String()) for i, v in enumerate(values)}, value=n % len(values))

    now = t.utcnow()
    columns = {
        "id": literal(state.value[:1].lower()) + cast(n, String), "tenant_id": in_turn(tenant_ids),
        "request_fingerprint": literal("-"), "model": literal("ltx"), "task": literal(Task.TEXT_TO_VIDEO.value),
        "spec_json": in_turn([spec.to_json() for spec, _ in kinds]),
        "work_key": in_turn([t.work_key(spec.to_json()) for spec, _ in kinds]),
        "require_device_kind": in_turn([require for _, require in kinds]),
        "priority": in_turn([10, 50, 90], sa.Integer()), "seed": literal(1), "state": literal(state.value),
        "stage": literal(""), "step": literal(0), "total_steps": literal(0), "attempt": literal(1),
        "cancel_requested": literal(False), "created_at": literal(now, t.UTCDateTime()),
        "finished_at": literal(now if state.is_final else None, t.UTCDateTime()),
        "cost_nanodollars": literal(0), "reserved_nanodollars": literal(0), "event_seq": literal(1),
        "preemptions": literal(0), "checkpoint_step": literal(0),
    }
    with store.engine.begin() as connection:
        connection.execute(insert(t.Render).from_select(list(columns), select(*columns.values())))


def analyze(store: JobStore) -> None:
    """What autovacuum does after a bulk load on PostgreSQL: statistics and the visibility map."""
    if store.is_sqlite:
        return
    engine = sa.create_engine(store.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql("VACUUM ANALYZE renders")
    engine.dispose()


@contextlib.contextmanager
def statements(store: JobStore):
    """The SQL statements (with their parameters) the store sends inside the block."""
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)


def queries(sent) -> list[str]:
    return [statement for statement, _ in sent if statement.lstrip().upper().startswith(("SELECT", "WITH"))]


def plans_of_reads(store: JobStore, sent) -> list[tuple[str, str]]:
    """(statement, its plan) of every read of the renders table among `sent` (pruning's
    read of events looks each one's render up)."""
    explain = "EXPLAIN QUERY PLAN " if store.is_sqlite else "EXPLAIN "
    plans = []
    with store.engine.connect() as connection:
        for statement, parameters in sent:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH")) or "FROM renders" not in statement:
                continue
            rows = connection.exec_driver_sql(explain + statement, parameters).all()
            plans.append((statement, "\n".join(str(row[-1]) for row in rows)))
    return plans


def reads_every_render(store: JobStore, plan: str) -> bool:
    """A scan of the renders table itself (SQLite's "SCAN renders" without an index, or
    PostgreSQL's "Seq Scan on renders"); a walk of an index is fine."""
    if store.is_sqlite:
        return re.search(r"\bSCAN renders\b(?! USING)", plan) is not None
    return "Seq Scan on renders" in plan


def test_claims_listing_and_the_backlog_walk_indexes_with_100000_queued_renders(store_url):
    store = JobStore(store_url)
    try:
        tenants = [store.create_tenant(f"studio-{i}")[0].id for i in range(TENANTS)]
        fill(store, tenants, ENDED, RenderState.SUCCEEDED)
        fill(store, tenants, QUEUED, RenderState.QUEUED)
        analyze(store)

        with statements(store) as claiming:
            assert store.has_queued(["ltx"]) and store.best_queued(["ltx"], 67)["ltx"][0] == 90
            claimed = store.claim({"ltx": 8}, OWNER, 30, {"ltx": ["H100"]}, {"ltx": 80 * GIB})
        with store.engine.connect() as connection:  # the most urgent first
            assert set(connection.scalars(select(t.Render.priority).where(
                t.Render.id.in_([c.id for c in claimed])))) == {90} and len(claimed) == 8
        with statements(store) as listing:
            page, token = store.list(tenants[3], page_size=50)
            assert len(page) == 50 and store.list(tenants[3], page_size=50, page_token=token)[0]
            assert len(store.list(tenants[3], states=[RenderState.QUEUED], model="ltx", page_size=50)[0]) == 50
        with statements(store) as backlog:
            work = store.queued_work(["ltx"])
        with statements(store) as pruning:
            store.prune(t.utcnow(), 30, 30)

        # The backlog read: one grouped query (and one for specs it had not seen), a row per
        # kind of work (3 shapes, with and without a required kind), not a row per render.
        assert len(queries(backlog)) <= 2 and len(work) == 6
        with store._read() as session:
            queued = session.scalar(select(sa.func.count()).select_from(t.Render).where(
                t.Render.state == RenderState.QUEUED.value, t.Render.model == "ltx"))
        assert sum(w.count for w in work) == queued == QUEUED - len(claimed)
        assert {(w.spec.width, w.required) for w in work} == {(s[0], r) for s in SHAPES for r in (None, "H100")}
        with statements(store) as again:
            assert store.queued_work(["ltx"]) == work
        assert len(queries(again)) == 1  # the specs of known work are not read again

        plans = plans_of_reads(store, claiming + listing + backlog + pruning)
        assert len(plans) >= 10
        for statement, plan in plans:
            assert not reads_every_render(store, plan), f"{statement}\n{plan}"
        by_index = "\n".join(plan for _, plan in plans)
        for index in ("ix_renders_queued_heads", "ix_renders_queued_work", "ix_renders_tenant_created",
                      "ix_events_state_time", "ix_renders_image_finished"):
            assert index in by_index
    finally:
        store.close()


# Autoscaling from the grouped backlog --------------------------------------------------------


class Pool:
    """An `EnginePool` with no replica up: autoscaling sizes it, nothing renders on it."""

    def __init__(self, device_kind: str, relative_speed: float):
        self.model, self.device_kind, self.relative_speed = "ltx", device_kind, relative_speed
        self.slots, self.min_replicas, self.max_replicas = 0, 0, 4
        self.backlog_target_s, self.cold_start_s, self.preemptible = 60.0, 5.0, True
        self.sizes: list[int] = []

    @property
    def key(self) -> str:
        return f"ltx/{self.device_kind}"

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        self.sizes.append(replicas)

    def render(self, request):
        raise AssertionError("no replica is up")

    def preempt(self, render_id: str, attempt: int) -> None:
        raise AssertionError("no replica is up")


class Metrics:
    """`SchedulerMetrics` that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, args))

    def of(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]


def farm_config(tmp_path, **store) -> FarmConfig:
    return FarmConfig(home=tmp_path, models=[MODEL], devices={"memory_gib": {"H100": 80, "A100": 40}},
                      artifacts={"url": str(tmp_path / "artifacts")}, store=store)


def sized_spec_by_spec(store: JobStore, scheduler: Scheduler, pools: list[Pool]) -> dict[str, tuple[int, float]]:
    """How autoscaling sized the pools before this issue: every queued spec read and
    estimated, placed one by one in the order they were queued. Pool key -> (wanted
    replicas, backlog seconds)."""
    renders = []
    for spec, required, done_steps in store.queued_specs(["ltx"], limit=QUEUED):
        left = 1 - done_steps / max(spec.num_inference_steps, 1)
        seconds_on = {p.key: scheduler.placement.estimate_seconds(spec, p) * left
                      for p in scheduler.placement.pools_it_fits(spec)}
        renders.append((seconds_on, next((p.key for p in pools if p.device_kind == required), None)
                        if required else None))
    backlog = assign_backlog(renders, {p.key: p.max_replicas for p in pools})
    return {p.key: (wanted_replicas(PoolLoad(p.key, p.slots, 0, p.min_replicas, p.max_replicas, backlog[p.key],
                                             p.backlog_target_s, p.cold_start_s)), backlog[p.key]) for p in pools}


def test_autoscaling_from_the_grouped_backlog_sizes_pools_as_reading_every_spec_did(tmp_path):
    """A mixed queue: three shapes, renders that require a kind, ones that only the H100s
    hold (60 GiB), one that no pool may run (60 GiB, A100 required), ones preempted
    half-way, and renders that may go to either pool. The grouped read places renders in
    its own order (those with one pool to go to first, then the largest first); with the
    queue in that order, reading every spec sized every pool the same, to the replica and
    (but for floating-point sums) to the second."""
    config = farm_config(tmp_path)
    store = JobStore(config.store_url)
    tenant = store.create_tenant("studio")[0].id
    rng = random.Random(7)
    one_pool = [resolved(*rng.choice(SHAPES), priority=rng.choice([10, 50]), require=require, memory_gib=memory)
                for require, memory in rng.choices([("H100", None), ("A100", None), ("A100", 1), ("", 60),
                                                    ("H100", 60), ("A100", 60)], k=160)]
    either = [resolved(*shape, priority=rng.choice([10, 50])) for shape in reversed(SHAPES) for _ in range(30)]
    ids = [store.submit(tenant, request, spec)[0].id for request, spec in one_pool + either]
    with store.engine.begin() as connection:  # preempted renders resume from their checkpoints
        connection.execute(update(t.Render).where(t.Render.id.in_(ids[:len(one_pool):5])).values(checkpoint_step=2))

    async def scenario():
        pools = [Pool("H100", 3.0), Pool("A100", 1.0)]
        metrics = Metrics()
        scheduler = Scheduler(store, {"ltx": pools}, config, OWNER, metrics)
        await scheduler.autoscale_pass()
        return sized_spec_by_spec(store, scheduler, pools), metrics

    try:
        before, metrics = asyncio.run(scenario())
    finally:
        store.close()
    after = {f"ltx/{kind}": (wanted, backlog) for _, kind, _, wanted, backlog, _ in metrics.of("pool_sized")}
    assert {key: wanted for key, (wanted, _) in after.items()} == {key: wanted for key, (wanted, _) in before.items()}
    for key, (_, backlog) in before.items():
        assert backlog > 0 and after[key][1] == pytest.approx(backlog, rel=1e-9)
    assert metrics.of("queued") == [("ltx", len(ids))]


def test_grouped_placement_is_one_by_one_placement_in_its_own_order():
    """`assign_grouped_backlog` places a group of any size in a few steps; it ends where
    placing its renders one by one (in its order) does, ties and all."""
    rng = random.Random(11)
    for _ in range(500):
        pools = [f"ltx/{kind}" for kind in ("H100", "A100", "L4", "B200")[:rng.randint(1, 4)]]
        capacity = {key: rng.randint(0, 8) for key in pools}
        groups = []
        for _ in range(rng.randint(1, 6)):
            fits = rng.sample(pools, rng.randint(1, len(pools)))
            seconds_on = {key: rng.choice([rng.uniform(0.1, 100.0), 1.0, 2.0, 10.0]) for key in fits}
            groups.append((seconds_on, rng.choice([None, None, rng.choice(pools)]), rng.randint(0, 400)))
        one_pool, several = [], []
        for seconds_on, required, count in groups:
            options = [key for key in ([required] if required else seconds_on) if key in seconds_on]
            if options and count:
                (one_pool if len(options) == 1 else several).append((seconds_on, required, count, options))
        several.sort(key=lambda group: -min(group[0][key] for key in group[3]))
        one_by_one = assign_backlog([(seconds_on, required) for seconds_on, required, count, _ in one_pool + several
                                     for _ in range(count)], capacity)
        grouped = assign_grouped_backlog(groups, capacity)
        assert grouped == pytest.approx(one_by_one, rel=1e-9, abs=1e-9)


def test_renders_queued_before_the_work_key_get_one_when_the_store_migrates(store_url):
    engine = sa.create_engine(store_url)
    upgrade(engine, "0005")
    _, spec = resolved(512, 512, 33, 20)
    renders = sa.table("renders", *[sa.column(c.name, c.type) for c in t.Render.__table__.columns
                                    if c.name != "work_key"])
    with engine.begin() as connection:
        connection.execute(insert(t.Tenant).values(id="x", name="studio", weight=1.0, created_at=t.utcnow()))
    row = {"id": "r1", "tenant_id": "x", "request_fingerprint": "-", "model": "ltx", "task": spec.task.value,
           "spec_json": spec.to_json(), "priority": 50, "seed": 1, "state": "QUEUED", "stage": "", "step": 0,
           "total_steps": 0, "attempt": 1, "cancel_requested": False, "created_at": t.utcnow(),
           "cost_nanodollars": 0, "reserved_nanodollars": 0, "event_seq": 0, "preemptions": 0, "checkpoint_step": 0}
    with engine.begin() as connection:
        connection.execute(insert(renders), [row, {**row, "id": "r2", "state": "SUCCEEDED"}])
    upgrade(engine)
    with engine.connect() as connection:
        keys = dict(connection.execute(select(t.Render.id, t.Render.work_key)).all())
    engine.dispose()
    assert keys == {"r1": t.work_key(spec.to_json()), "r2": None}
    store = JobStore(store_url)
    try:
        [work] = store.queued_work(["ltx"])
        assert (work.spec.width, work.count) == (512, 1)
    finally:
        store.close()


# Retention --------------------------------------------------------------------------------------

CHARGES = price_timings(PriceConfig(), [(Stage.DENOISING, "CPU", 2.0), (Stage.DECODING, "CPU", 0.5)])


def run_to_the_end(store: JobStore, tenant_id: str, finish: bool = True, prompt: str = "a kite") -> str:
    """A render submitted, claimed, four steps of progress and (unless `finish` is False) succeeded."""
    request, spec = resolved(prompt=prompt)
    render = store.submit(tenant_id, request, spec)[0]
    [claimed] = [c for c in store.claim({"ltx": 10}, OWNER, 30) if c.id == render.id]
    store.record_progress(OWNER, [ProgressUpdate(render.id, 1, Stage.DENOISING, s, 4) for s in range(1, 5)])
    if finish:
        store.finish(OWNER, render.id, claimed.attempt, AttemptOutcome.SUCCEEDED, charges=CHARGES,
                     device_kind="CPU")
    return render.id


def age(store: JobStore, render_id: str, days: float, image: bytes | None = None) -> None:
    """Moves the render's events and its end `days` into the past (and gives it an image)."""
    ago = dt.timedelta(days=days)
    with store.engine.begin() as connection:
        for event_row in connection.execute(select(t.Event.id, t.Event.time).where(t.Event.render_id == render_id)):
            connection.execute(update(t.Event).where(t.Event.id == event_row.id).values(time=event_row.time - ago))
        finished = connection.scalar(select(t.Render.finished_at).where(t.Render.id == render_id))
        connection.execute(update(t.Render).where(t.Render.id == render_id).values(
            finished_at=finished - ago if finished else None, image=image))


def ledger_rows(store: JobStore) -> list[tuple]:
    with store.engine.connect() as connection:
        return connection.execute(select(t.LedgerEntry.render_id, t.LedgerEntry.phase, t.LedgerEntry.nanodollars)
                                  .order_by(t.LedgerEntry.id)).all()


def test_pruning_drops_old_events_and_images_of_ended_renders_only(store_url):
    store = JobStore(store_url)
    try:
        tenant = store.create_tenant("studio")[0].id
        old, recent = run_to_the_end(store, tenant), run_to_the_end(store, tenant)
        running = run_to_the_end(store, tenant, finish=False)
        queued = store.submit(tenant, *resolved())[0].id
        for render_id in (old, running, queued):
            age(store, render_id, 40, image=b"\x89PNG old" if render_id == old else None)
        age(store, recent, 0, image=b"\x89PNG recent")
        events = {r: store.events_after(r, 0) for r in (old, recent, running, queued)}
        ledger, before = ledger_rows(store), store.get(tenant, old)
        since, until = t.utcnow() - dt.timedelta(days=400), t.utcnow() + dt.timedelta(days=1)
        usage = store.usage(tenant, since, until, "model")
        assert len(events[old]) == 7 and ledger  # submitted, started, 4 steps, succeeded

        # In short transactions: two events at a time, one transaction allowed, more left.
        first = store.prune(t.utcnow(), 30, 30, max_batches=1, event_batch=2)
        assert (first.events, first.images, first.more) == (2, 0, True)
        rest = store.prune(t.utcnow(), 30, 30, event_batch=2)
        assert (first.events + rest.events, rest.images, rest.more) == (len(events[old]) - 1, 1, False)
        assert store.prune(t.utcnow(), 30, 30) == type(rest)(0, 0, False)

        # The old render keeps its final event; the rest keep everything.
        assert store.events_after(old, 0) == events[old][-1:] and events[old][-1].state is RenderState.SUCCEEDED
        for render_id in (recent, running, queued):
            assert store.events_after(render_id, 0) == events[render_id]
        # GetRender answers as before (less the input image, which no answer carries).
        after = store.get(tenant, old)
        assert after == dataclasses.replace(before, spec=dataclasses.replace(before.spec, image=b""))
        assert before.spec.image and store.get(tenant, recent).spec.image == b"\x89PNG recent"
        # The ledger and the usage reports built on it are untouched.
        assert ledger_rows(store) == ledger and store.usage(tenant, since, until, "model") == usage
    finally:
        store.close()


def test_a_pruned_render_still_answers_get_list_watch_and_usage_over_grpc(tmp_path):
    """Through a real gateway on loopback, pruned by `farm store prune`."""
    config = FarmConfig(home=tmp_path, models=[MODEL.model_copy(update={"pools": []})])
    config.gateway.port = config.gateway.metrics_port = 0
    with serving(config) as farm:
        client = farm.client
        render_id = client.submit(pb.RenderSpec(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a kite",
                                                width=256, height=256, num_frames=17, num_inference_steps=4)).id
        claimed = {c.id: c for c in farm.store.claim({"ltx": 1}, OWNER, 30)}
        farm.store.finish(OWNER, render_id, claimed[render_id].attempt, AttemptOutcome.SUCCEEDED, charges=CHARGES,
                          device_kind="CPU")
        age(farm.store, render_id, 40)
        since, until = dt.datetime(2000, 1, 1), dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        usage, render = client.usage(since, until), client.get(render_id)
        events = list(client.watch(render_id, timeout=30))
        assert len(events) > 2 and render.cost.total_dollars > 0

        result = CliRunner().invoke(farm_cli, ["store", "prune", "--events-older-than", "30d"],
                                    env={"FARM_HOME": str(tmp_path)})
        assert result.exit_code == 0, result.output
        assert f"deleted {len(events) - 1} events" in result.output

        assert client.get(render_id) == render
        assert [r.id for r in client.list().renders] == [render_id]
        # A watch from the start reads the final event and ends; one after it ends at once.
        assert list(client.watch(render_id, timeout=30)) == events[-1:]
        assert list(client.watch(render_id, after_sequence=events[-1].sequence, timeout=30)) == []
        assert client.usage(since, until) == usage


def test_bad_retention_periods_are_refused_naming_the_option(tmp_path):
    result = CliRunner().invoke(farm_cli, ["store", "prune", "--events-older-than", "30x"],
                                env={"FARM_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "--events-older-than" in result.output and "30d" in result.output


def test_the_scheduler_prunes_in_its_autoscaling_round_at_most_every_interval(tmp_path):
    config = farm_config(tmp_path, event_retention_days=30, prune_interval_s=3600)
    store = JobStore(config.store_url)
    tenant = store.create_tenant("studio")[0].id
    first, second = run_to_the_end(store, tenant, prompt="first"), run_to_the_end(store, tenant, prompt="second")
    age(store, first, 40)

    async def scenario():
        scheduler = Scheduler(store, {"ltx": [Pool("H100", 1.0)]}, config, OWNER, Metrics())
        await scheduler.autoscale_pass()
        pruned_first = len(store.events_after(first, 0))
        age(store, second, 40)
        await scheduler.autoscale_pass()  # within the hour: no prune
        return pruned_first, len(store.events_after(second, 0))

    try:
        pruned_first, second_events = asyncio.run(scenario())
    finally:
        store.close()
    assert pruned_first == 1 and second_events == 7
