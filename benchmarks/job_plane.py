"""The job plane at scale (issue 19, item 14): how many renders a second the gateway,
the store and the scheduler carry end to end when the engines cost nothing.

No Ray and no model. Three processes, as in a cluster: the real gateway
(`farm.api.server.Gateway`, gRPC on loopback), the real scheduler
(`farm.jobs.scheduler.Scheduler`) over a null engine pool whose render stream emits
`--events` DENOISING progress events and then a `Done` with the phase timings a real
replica reports, at once (or one every `--step-ms`), and this process, whose
`--clients` asyncio tasks submit through `AsyncFarmClient` as fast as the gateway
answers for `--duration` seconds. The store is a fresh PostgreSQL database on the
server of `--store-url` (its own database rather than a schema: NOTIFY channels and the
server's transaction counters are per database, so the benchmark neither wakes other
farms' schedulers nor counts their transactions), dropped afterwards; or, with
`--store-url sqlite`, a SQLite file.

Measured, over the window after `--warmup` seconds until the clients stop:
- sustained renders/s: renders that reached SUCCEEDED (progress written, ledger rows
  written in the finishing transaction) per second, and submits/s beside it; when
  submits outrun completions the backlog grows and the completion rate is the limit;
- submit latency p50/p99 (the client's call), claim latency (the client's submit to
  the null engine receiving the render) and submit-to-SUCCEEDED p50/p99;
- per render, over the whole run once every render has ended: rows in renders, events,
  attempts and ledger; transactions and SQL statements of the gateway and of the
  scheduler (counted by SQLAlchemy events in each process), the time each process
  waited on the database, and PostgreSQL's own commit and tuple counters;
- CPU over the window: each process, PostgreSQL's backends of this database, and the
  whole machine (another tenant's work shows there); and CPU milliseconds per render,
  with the rate they would allow on this machine's cores were nothing else running.

`--profile DIR` runs py-spy (`--gil`: the thread holding the GIL, i.e. where Python
time goes) on the gateway, the scheduler and the clients during the first run's window,
and looks at what the database's backends are doing every 20 ms (`pg_stat_activity`:
on CPU, waiting for a lock, or idle in a transaction waiting for their client); it
prints the top costs of each. py-spy pauses each process to sample: that run's rate is
not the benchmark's.

Run: .venv/bin/python benchmarks/job_plane.py [--duration 20] [--warmup 3] [--clients 32] [--events 20]
     [--slots 64] [--step-ms 0] [--rate 0] [--tenants 1] [--runs 1]
     [--store-url postgresql+psycopg://postgres@127.0.0.1:5432/test | sqlite] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

MODEL = "ltx"
DEVICE_KIND = "H100"
NODE = "bench-node/0"
DEFAULT_STORE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STEP_SECONDS = 0.2  # what each denoising step reports as its device time (charged, never slept)
TABLES = ("renders", "events", "attempts", "ledger")
PY_SPY = Path(__file__).resolve().parent.parent / ".tools" / "bin" / "py-spy"


# -- the farm's config ------------------------------------------------------------------------


def farm_values(home: Path, store_url: str, slots: int) -> dict:
    """One LTX-Video model on one H100 pool of `slots` replicas (its weights need not
    exist: nothing loads them); every rate limit off, so the clients meet the job plane's
    own limits and not the per-tenant ones; no metrics endpoints."""
    unlimited = {"rate": None}
    return {
        "home": str(home),
        "models": [{"name": MODEL, "family": "ltx-video", "sources": {"text-to-video": str(home / "no-weights")},
                    "pools": [{"device_kind": DEVICE_KIND, "num_gpus": 1, "min_replicas": slots,
                               "max_replicas": slots}]}],
        "store": {"url": store_url},
        "gateway": {"port": 0, "metrics_port": 0,
                    "rate_limits": {name: unlimited for name in ("submits", "reads", "peer_submits", "peer_reads")}},
        "scheduler": {"metrics_port": 0},
    }


def farm_config(values: dict):
    from farm.config import FarmConfig

    return FarmConfig(**values)


# -- what each process counts of its database work ---------------------------------------------


class SqlCounts:
    """Transactions and statements of every SQLAlchemy engine in this process, and the
    seconds spent waiting on the database in `cursor.execute`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transactions = 0
        self.statements: collections.Counter[str] = collections.Counter()
        self.db_seconds = 0.0
        self._started = threading.local()

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "begin", self._begin)
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _begin(self, _connection) -> None:
        with self.lock:
            self.transactions += 1

    def _before(self, _conn, _cursor, statement, _parameters, _context, _executemany) -> None:
        self._started.at = time.perf_counter()

    def _after(self, _conn, _cursor, statement, _parameters, _context, _executemany) -> None:
        took = time.perf_counter() - getattr(self._started, "at", time.perf_counter())
        with self.lock:
            self.statements[statement] += 1  # shaped when asked: a regex per statement costs the process
            self.db_seconds += took

    def snapshot(self) -> dict:
        with self.lock:
            counted = list(self.statements.items())
            shaped: collections.Counter[str] = collections.Counter()
            for statement, count in counted:
                shaped[statement_shape(statement)] += count
            return {"transactions": self.transactions, "statements": dict(shaped), "db_seconds": self.db_seconds}


def statement_shape(statement: str) -> str:
    """A statement without its IN lists and columns: what it does to which table."""
    text = " ".join(statement.split())
    text = re.sub(r"\(__\[POSTCOMPILE_\w+\]\)|IN \([^)]*\)", "IN (...)", text)
    verb = text.split(" ", 1)[0].upper()
    if verb == "SELECT":
        table = re.search(r" FROM (\w+)", text)
        where = re.search(r" WHERE (.{0,70})", text)
        lock = " FOR UPDATE" if "FOR UPDATE" in text else ""
        return f"SELECT {table.group(1) if table else text[7:50]}{lock} WHERE {where.group(1) if where else '-'}"
    if verb in ("INSERT", "UPDATE", "DELETE"):
        return " ".join(text.split(" ")[:3])
    return text[:70]


def usage_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Commands:
    """A child's side of its pipe to the benchmark: `stats` answers at once (from a
    thread), `stop` sets `stopped`."""

    def __init__(self, connection, counts: SqlCounts, extra=lambda: {}):
        self.connection, self.counts, self.extra = connection, counts, extra
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, name="bench-commands", daemon=True).start()

    def _serve(self) -> None:
        while True:
            command = self.connection.recv()
            if command == "stats":
                self.connection.send({"cpu_s": usage_seconds(), "pid": os.getpid(), **self.counts.snapshot()})
            elif command == "stop":
                self.stopped.set()
                return


# -- the gateway process -----------------------------------------------------------------------


def gateway_process(values: dict, connection) -> None:
    counts = SqlCounts()
    counts.install()
    from farm.api.server import Gateway

    async def serve() -> None:
        gateway = Gateway(farm_config(values))
        port = await gateway.start()
        connection.send({"port": port, "pid": os.getpid()})
        commands = Commands(connection, counts)
        await asyncio.to_thread(commands.stopped.wait)
        await gateway.stop(0)

    asyncio.run(serve())


# -- the scheduler process and its null engine pool ---------------------------------------------


class NullStream:
    """One attempt on the null engine (a `RenderStream`): `events` DENOISING steps, each
    its own batch (as a replica sends one batch per wake-up), then `Done` with the phase
    timings a replica reports; `step_s` apart (0: all at once)."""

    def __init__(self, request, events: int, step_s: float):
        self.request, self.events, self.step_s = request, events, step_s
        self._cancelled = False

    def __aiter__(self):
        return self._batches()

    async def _batches(self):
        from farm.domain.engine import RenderCancelled
        from farm.domain.events import Done, PhaseTiming, RenderProgress
        from farm.domain.states import Stage

        for step in range(1, self.events + 1):
            if self.step_s:
                await asyncio.sleep(self.step_s)
            if self._cancelled:
                raise RenderCancelled([], step - 1)
            yield [RenderProgress(Stage.DENOISING, step=step, total_steps=self.events, step_seconds=STEP_SECONDS,
                                  at=time.time(), node=NODE if step == 1 else None)]
        timings = (PhaseTiming(Stage.ENCODING_PROMPT, DEVICE_KIND, 0.3),
                   *[PhaseTiming(Stage.DENOISING, DEVICE_KIND, STEP_SECONDS)] * self.events,
                   PhaseTiming(Stage.DECODING, DEVICE_KIND, 1.5), PhaseTiming(Stage.POSTPROCESSING, "CPU", 2.0),
                   PhaseTiming(Stage.ENCODING, "CPU", 1.0), PhaseTiming(Stage.WRITING, "CPU", 0.1))
        render_id = self.request.render_id
        yield [Done(artifact_uri=f"file:///bench/renders/{render_id}/attempt-1/video.mp4",
                    manifest_uri=f"file:///bench/renders/{render_id}/attempt-1/manifest.json",
                    timings=timings, device_kind=DEVICE_KIND, node=NODE, frames=self.request.num_frames,
                    seed=self.request.seed, quality={"flicker": 0.1, "temporal_consistency": 0.9})]

    def cancel(self) -> None:
        self._cancelled = True


class NullPool:
    """An `EnginePool` of `slots` null engines that never grows or shrinks; it remembers
    when each render reached it (the claim latency's end)."""

    def __init__(self, slots: int, events: int, step_s: float):
        self.model, self.device_kind = MODEL, DEVICE_KIND
        self.slots = self.min_replicas = self.max_replicas = slots
        self.backlog_target_s, self.relative_speed, self.cold_start_s = 60.0, 1.0, 0.0
        self.preemptible = False
        self.events, self.step_s = events, step_s
        self.dispatched: dict[str, float] = {}

    @property
    def key(self) -> str:
        return f"{self.model}/{self.device_kind}"

    def render(self, request) -> NullStream:
        self.dispatched.setdefault(request.render_id, time.time())
        return NullStream(request, self.events, self.step_s)

    def preempt(self, render_id: str, attempt: int) -> None:
        pass

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        pass


class NullMetrics:
    """`SchedulerMetrics` that records nothing (the Prometheus ones live in farm.serve,
    which imports Ray; a counter's increment is a microsecond)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def scheduler_process(values: dict, slots: int, events: int, step_s: float, connection) -> None:
    counts = SqlCounts()
    counts.install()
    from farm.jobs.scheduler import Scheduler
    from farm.jobs.store import JobStore

    async def serve() -> None:
        config = farm_config(values)
        store = JobStore(config.store_url, migrate=False)
        pool = NullPool(slots, events, step_s)
        scheduler = Scheduler(store, {MODEL: [pool]}, config, f"bench-scheduler-{os.getpid()}", NullMetrics())
        scheduler.start()
        connection.send({"pid": os.getpid()})
        commands = Commands(connection, counts)
        await asyncio.to_thread(commands.stopped.wait)
        await scheduler.stop()
        store.close()
        connection.send({"dispatched": pool.dispatched})

    asyncio.run(serve())


# -- the clients ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Submitted:
    render_id: str
    at: float
    """Wall-clock time the call began."""
    seconds: float


async def submit_for(target: str, keys: list[str], clients: int, channels: int, duration_s: float, events: int,
                     rate: float, stopped=lambda: None) -> tuple[list[Submitted], collections.Counter]:
    """`clients` tasks over `channels` channels submit until `duration_s` is over (each
    waiting for its answer before the next; `rate` > 0 paces all of them together to that
    many submits a second); `stopped()` is called once the last answer came, before the
    channels close. Returns the submits and the errors by kind."""
    from farm.client import AsyncFarmClient
    from farm.v1 import render_pb2 as pb

    opened = [AsyncFarmClient(target, keys[i % len(keys)], retries=False) for i in range(max(channels, len(keys)))]
    done: list[Submitted] = []
    errors = collections.Counter()
    started = time.monotonic()
    end = started + duration_s
    seeds = iter(range(10**9))

    async def client(index: int) -> None:
        farm = opened[index % len(opened)]
        sent = 0
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if rate:
                due = started + (sent * clients + index) / rate
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
            sent += 1
            spec = pb.RenderSpec(model=MODEL, task=pb.TASK_TEXT_TO_VIDEO, prompt="a harbor at dusk, slow pan",
                                 width=768, height=512, num_frames=121, num_inference_steps=events, seed=next(seeds))
            at, began = time.time(), time.perf_counter()
            try:
                render = await farm.submit(spec, timeout=30)
            except Exception as error:  # counted, not fatal: the figure says how many
                errors[type(error).__name__] += 1
                continue
            done.append(Submitted(render.id, at, time.perf_counter() - began))

    await asyncio.gather(*(client(i) for i in range(clients)))
    stopped()
    for farm in opened:
        await farm.close()
    return done, errors


# -- the store's side: a database of its own, and what it holds ----------------------------------


@contextlib.contextmanager
def bench_store(base_url: str, home: Path) -> Iterator[tuple[str, str | None]]:
    """(url, database name): a fresh PostgreSQL database on base_url's server, dropped
    afterwards; or a SQLite file under home for `sqlite`."""
    if base_url == "sqlite":
        yield f"sqlite:///{home / 'farm.db'}", None
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"farm_bench_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    url = make_url(base_url).set(database=name, query={"application_name": name})
    try:
        yield url.render_as_string(hide_password=False), name
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def table_counts(store) -> dict[str, int]:
    from sqlalchemy import func, select

    from farm.jobs import schema as t

    with store._read() as session:
        return {table.__tablename__: session.scalar(select(func.count()).select_from(table))
                for table in (t.Render, t.Event, t.Attempt, t.LedgerEntry)}


def postgres_counters(store) -> dict[str, int]:
    if store.is_sqlite:
        return {}
    from sqlalchemy import text

    with store._read() as session:
        row = session.execute(text(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched, tup_returned "
            "FROM pg_stat_database WHERE datname = current_database()")).one()
    return dict(row._mapping)


def unfinished(store) -> int:
    from sqlalchemy import func, select

    from farm.domain.states import RenderState
    from farm.jobs import schema as t

    with store._read() as session:
        return session.scalar(select(func.count()).select_from(t.Render).where(
            t.Render.state.in_([RenderState.QUEUED.value, RenderState.RUNNING.value])))


def render_times(store) -> dict[str, tuple[str, float, float | None]]:
    """render id -> (state, created, finished) as the store stamped them (epoch seconds)."""
    from sqlalchemy import select

    from farm.jobs import schema as t

    with store._read() as session:
        rows = session.execute(select(t.Render.id, t.Render.state, t.Render.created_at, t.Render.finished_at))
        return {r.id: (r.state, r.created_at.timestamp(), r.finished_at.timestamp() if r.finished_at else None)
                for r in rows}


# -- CPU ---------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s(database: str | None) -> tuple[float, float]:
    """CPU seconds so far of PostgreSQL's backends connected to `database`, and of its
    background processes (WAL writer, checkpointer: shared with other databases)."""
    backends = background = 0.0
    if database is None:
        return 0.0, 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not command.startswith("postgres: "):
                continue
            seconds = process_cpu_s(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        if f" {database} " in command:
            backends += seconds
        elif "writer" in command or "checkpointer" in command:
            background += seconds
    return backends, background


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# -- the profile ---------------------------------------------------------------------------------


def start_profiles(pids: dict[str, int], seconds: float, directory: Path) -> list[tuple[str, Path, subprocess.Popen]]:
    directory.mkdir(parents=True, exist_ok=True)
    running = []
    for name, pid in pids.items():
        out = directory / f"{name}.txt"
        process = subprocess.Popen([str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                    "--rate", "100", "--format", "raw", "--threads", "--gil", "--output", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running.append((name, out, process))
    return running


class DatabaseSampler:
    """What the benchmark's PostgreSQL backends are doing, `interval_s` apart: active
    (and on what they wait) or idle (waiting for their client), by statement."""

    def __init__(self, base_url: str, database: str, interval_s: float = 0.02):
        self.base_url, self.database, self.interval_s = base_url, database, interval_s
        self.samples: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-pg-sampler", daemon=True)

    def __enter__(self) -> DatabaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        conninfo = make_url(self.base_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as connection:
            while not self._stop.wait(self.interval_s):
                rows = connection.execute(
                    "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'on CPU'), query "
                    "FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid()", (self.database,)).fetchall()
                self.rounds += 1
                for state, wait, query in rows:
                    if state == "active":
                        self.samples[("active", wait, statement_shape(query))] += 1
                    elif state == "idle in transaction":
                        self.samples[("idle in transaction", "waiting for its client", "")] += 1

    def summarize(self, top: int = 12) -> None:
        rounds = max(self.rounds, 1)
        print(f"  PostgreSQL backends of the benchmark's database ({self.rounds} looks, {self.interval_s * 1000:.0f} ms "
              f"apart; backends busy on average):")
        for (state, wait, shape), count in self.samples.most_common(top):
            print(f"      {count / rounds:5.2f}  {state}, {wait}: {shape}")


FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['function']} ({file})"


def summarize_profile(name: str, path: Path, top: int = 12) -> None:
    """Samples by thread, the functions the samples were in (self), and the farm
    functions they were under (inclusive)."""
    if not path.exists():
        print(f"  {name}: no profile written")
        return
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        threads[frames[0]] += samples
        named = [frame_name(f) for f in frames[1:]]
        if named:
            own[named[-1]] += samples
        for frame in set(named):
            if "farm/" in frame or "sqlalchemy/orm/session" in frame or "grpc/_cython" in frame:
                under[frame] += samples
    print(f"  {name}: {total} samples ({total / 100:.1f} s holding the GIL at 100 Hz)")
    print("    by thread: " + ", ".join(f"{t} {n / total:.0%}" for t, n in threads.most_common(6)))
    print("    self:")
    for frame, samples in own.most_common(top):
        print(f"      {samples / total:6.1%}  {frame}")
    print("    inclusive (farm code, ORM sessions, gRPC):")
    for frame, samples in under.most_common(top + 6):
        print(f"      {samples / total:6.1%}  {frame}")


# -- one run -------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def per_render(before: dict, after: dict, renders: int) -> dict:
    return {key: (after.get(key, 0) - before.get(key, 0)) / renders for key in after}


def run_once(args, profile: Path | None) -> dict:
    from farm.jobs.store import JobStore

    home = Path(tempfile.mkdtemp(prefix="farm-job-plane-", dir="/tmp"))
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, home, ignore_errors=True)
        url, database = cleanup.enter_context(bench_store(args.store_url, home))
        values = farm_values(home, url, args.slots)
        gateway_end, gateway_pipe = context.Pipe()
        gateway = context.Process(target=gateway_process, args=(values, gateway_end), name="gateway")
        gateway.start()
        ready = gateway_pipe.recv()  # migrations ran, the default tenant and its key exist
        target = f"127.0.0.1:{ready['port']}"
        scheduler_end, scheduler_pipe = context.Pipe()
        scheduler = context.Process(target=scheduler_process, name="scheduler",
                                    args=(values, args.slots, args.events, args.step_ms / 1000, scheduler_end))
        scheduler.start()
        scheduler_pipe.recv()
        store = JobStore(url, migrate=False)
        config = farm_config(values)
        keys = [(config.keys_dir / "default.key").read_text().strip()]
        keys += [store.create_tenant(f"tenant-{i}")[1] for i in range(1, args.tenants)]
        pipes = {"gateway": gateway_pipe, "scheduler": scheduler_pipe}
        pids = {"gateway": gateway.pid, "scheduler": scheduler.pid, "clients": os.getpid()}

        def stats() -> dict:
            for pipe in pipes.values():
                pipe.send("stats")
            return {name: pipe.recv() for name, pipe in pipes.items()}

        rows_before, pg_before, sql_before = table_counts(store), postgres_counters(store), stats()
        marks: dict[str, dict] = {}

        def mark(name: str) -> None:
            marks[name] = {"time": time.time(), "processes": stats(), "client_cpu_s": usage_seconds(),
                           "postgres_cpu_s": postgres_cpu_s(database), "machine": machine_busy(),
                           "load": os.getloadavg()[0]}

        async def measured() -> tuple[list[Submitted], collections.Counter]:
            loop = asyncio.get_running_loop()
            window = args.duration - args.warmup
            profiles = []
            samplers: list[DatabaseSampler] = []

            def window_opens() -> None:
                mark("start")
                if profile is not None:
                    profiles.extend(start_profiles(pids, window, profile))
                    if database is not None:
                        sampler = DatabaseSampler(args.store_url, database)
                        sampler.__enter__()
                        samplers.append(sampler)

            loop.call_later(args.warmup, window_opens)
            submitted = await submit_for(target, keys, args.clients, args.channels, args.duration, args.events,
                                         args.rate, stopped=lambda: mark("end"))
            for sampler in samplers:
                sampler.__exit__()
                sampler.summarize()
            for name, out, process in profiles:
                _, error = process.communicate(timeout=window + 30)
                if process.returncode:
                    print(f"py-spy on {name} failed: {error.decode(errors='replace')[-400:]}")
            return submitted

        client_started = time.time()
        submitted, errors = asyncio.run(measured())
        drain_deadline = time.monotonic() + args.drain_timeout
        while (left := unfinished(store)) and time.monotonic() < drain_deadline:
            time.sleep(0.2)
        drained = time.time()
        if not store.is_sqlite:
            time.sleep(1.2)  # PostgreSQL publishes a backend's counters at most once a second
        rows_after, pg_after, sql_after = table_counts(store), postgres_counters(store), stats()
        times = render_times(store)
        for pipe in pipes.values():
            pipe.send("stop")
        dispatched = scheduler_pipe.recv()["dispatched"]
        gateway.join(30)
        scheduler.join(30)
        store.close()

    start, end = marks["start"], marks["end"]
    window = end["time"] - start["time"]
    succeeded = [finished for state, _, finished in times.values() if state == "SUCCEEDED"]
    in_window = sum(1 for f in succeeded if start["time"] <= f < end["time"])
    submits_in_window = sum(1 for s in submitted if start["time"] <= s.at < end["time"])
    claim = [dispatched[s.render_id] - s.at for s in submitted if s.render_id in dispatched]
    whole = [times[s.render_id][2] - s.at for s in submitted if times.get(s.render_id, (0, 0, None))[2]]

    def backlog(at: float) -> int:
        return (sum(1 for s in submitted if s.at < at) - sum(1 for d in dispatched.values() if d < at))

    finished_renders = len(succeeded)
    cpu = {name: (end["processes"][name]["cpu_s"] - start["processes"][name]["cpu_s"]) / window
           for name in ("gateway", "scheduler")}
    cpu["clients"] = (end["client_cpu_s"] - start["client_cpu_s"]) / window
    cpu["postgres backends"] = (end["postgres_cpu_s"][0] - start["postgres_cpu_s"][0]) / window
    cpu["postgres background"] = (end["postgres_cpu_s"][1] - start["postgres_cpu_s"][1]) / window
    busy = (end["machine"][0] - start["machine"][0]) / (end["machine"][1] - start["machine"][1]) * os.cpu_count()
    processes = {}
    for name in ("gateway", "scheduler"):
        before, after = sql_before[name], sql_after[name]
        statements = collections.Counter(after["statements"])
        statements.subtract(before["statements"])
        processes[name] = {
            "transactions_per_render": (after["transactions"] - before["transactions"]) / max(finished_renders, 1),
            "statements_per_render": sum(statements.values()) / max(finished_renders, 1),
            "db_ms_per_render": (after["db_seconds"] - before["db_seconds"]) * 1000 / max(finished_renders, 1),
            "top_statements": [(shape, count / max(finished_renders, 1)) for shape, count in statements.most_common(12)],
        }
    # CPU per render: the gateway's per submit, the others' per render finished.
    cpu_ms = {name: cores * window * 1000 / max(submits_in_window if name in ("gateway", "clients") else in_window, 1)
              for name, cores in cpu.items()}
    return {
        "store": "sqlite" if database is None else "postgresql",
        "cpu_ms_per_render": cpu_ms,
        "cores_per_render_s": sum(cpu_ms.values()) / 1000,
        "window_s": window,
        "submitted": len(submitted),
        "errors": dict(errors),
        "succeeded": finished_renders,
        "unfinished_after_drain": left,
        "drain_s": drained - end["time"],
        "renders_per_s": in_window / window,
        "submits_per_s": submits_in_window / window,
        "overall_renders_per_s": finished_renders / (drained - client_started) if finished_renders else 0.0,
        "backlog_at_start": backlog(start["time"]),
        "backlog_at_end": backlog(end["time"]),
        "submit_ms": {"p50": percentile([s.seconds for s in submitted], 0.5) * 1000,
                      "p99": percentile([s.seconds for s in submitted], 0.99) * 1000},
        "claim_ms": {"p50": percentile(claim, 0.5) * 1000, "p99": percentile(claim, 0.99) * 1000},
        "submit_to_succeeded_ms": {"p50": percentile(whole, 0.5) * 1000, "p99": percentile(whole, 0.99) * 1000},
        "rows_per_render": per_render(rows_before, rows_after, max(finished_renders, 1)),
        "postgres_per_render": per_render(pg_before, pg_after, max(finished_renders, 1)),
        "processes": processes,
        "cpu_cores": cpu,
        "machine_busy_cores": busy,
        "other_work_cores": busy - sum(cpu.values()),
        "load_average": start["load"],
    }


def capacity(result: dict) -> float:
    """Renders a second the CPU costs allow on this machine's cores, were nothing else running:
    all of it shared by the cores, the gateway and the scheduler at most one core each."""
    ms = result["cpu_ms_per_render"]
    bounds = [os.cpu_count() / result["cores_per_render_s"]]
    bounds += [1000 / ms[name] for name in ("gateway", "scheduler") if ms[name] > 0]
    return min(bounds)


def report(result: dict) -> None:
    r = result
    if r["unfinished_after_drain"]:
        print(f"  (!) {r['unfinished_after_drain']} renders had not ended when the drain timed out: the figures "
              f"per render below count their rows and statements too")
    print(f"  {r['succeeded']} renders SUCCEEDED of {r['submitted']} submitted "
          f"({r['unfinished_after_drain']} unfinished {r['drain_s']:.1f} s after the clients stopped); "
          f"submit errors: {r['errors'] or 'none'}")
    print(f"  sustained: {r['renders_per_s']:.0f} renders/s SUCCEEDED, {r['submits_per_s']:.0f} submits/s, over "
          f"{r['window_s']:.1f} s; backlog {r['backlog_at_start']} -> {r['backlog_at_end']} queued")
    print(f"  submit p50 {r['submit_ms']['p50']:.1f} ms, p99 {r['submit_ms']['p99']:.1f} ms; claim (submit to engine) "
          f"p50 {r['claim_ms']['p50']:.1f} ms, p99 {r['claim_ms']['p99']:.1f} ms; submit to SUCCEEDED "
          f"p50 {r['submit_to_succeeded_ms']['p50']:.1f} ms, p99 {r['submit_to_succeeded_ms']['p99']:.1f} ms")
    print("  rows per render: " + ", ".join(f"{k} {v:.2f}" for k, v in r["rows_per_render"].items()))
    if r["postgres_per_render"]:
        print("  PostgreSQL per render: " + ", ".join(f"{k} {v:.1f}" for k, v in r["postgres_per_render"].items()))
    for name, p in r["processes"].items():
        print(f"  {name}: {p['transactions_per_render']:.2f} transactions, {p['statements_per_render']:.1f} "
              f"statements, {p['db_ms_per_render']:.2f} ms waiting on the database per render")
        for shape, count in p["top_statements"]:
            print(f"      {count:5.2f}  {shape}")
    print("  CPU (cores busy over the window): " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items())
          + f"; whole machine {r['machine_busy_cores']:.2f} of {os.cpu_count()}, other work "
          f"{r['other_work_cores']:.2f}; load average at start {r['load_average']:.1f}")
    print("  CPU ms per render (the gateway's and the clients' per submit): "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_render"].items())
          + f"; in all {r['cores_per_render_s'] * 1000:.1f} ms. On {os.cpu_count()} idle cores that is at most "
          f"{capacity(r):.0f} renders/s (each Python process is held to one core by its GIL)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds the clients submit")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the measured window")
    parser.add_argument("--clients", type=int, default=32, help="concurrent submitting tasks")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels the tasks share")
    parser.add_argument("--events", type=int, default=20, help="progress events per render (denoising steps)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="the null engine's pause before each event")
    parser.add_argument("--slots", type=int, default=64, help="null engine replicas (renders at once)")
    parser.add_argument("--rate", type=float, default=0.0, help="submits a second in all (0: as fast as answered)")
    parser.add_argument("--tenants", type=int, default=1, help="tenants the submits are spread over")
    parser.add_argument("--runs", type=int, default=1, help="runs, each on a fresh database; the median is shown")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--store-url", default=DEFAULT_STORE,
                        help="PostgreSQL server (a database of the benchmark's own is made there), or 'sqlite'")
    parser.add_argument("--profile", type=Path, help="py-spy the processes during the window; profiles go here")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {cpu_model}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; Python {platform.python_version()}")
    import farm

    print(f"farm from {Path(farm.__file__).parent}")
    print(f"store {args.store_url}; {args.clients} clients on {args.channels} channels, {args.tenants} tenant(s); "
          f"{args.slots} null engines, {args.events} events a render, {args.step_ms:g} ms apart; "
          f"{args.duration:g} s ({args.warmup:g} s warm-up)")
    results = []
    for index in range(args.runs):
        print(f"run {index + 1} of {args.runs}:", flush=True)
        results.append(run_once(args, args.profile if index == 0 else None))
        report(results[-1])
        if args.profile and index == 0:
            print("profile of run 1 (py-spy --gil, 100 Hz: samples of the thread holding the GIL, i.e. Python CPU):")
            for name in ("gateway", "scheduler", "clients"):
                summarize_profile(name, args.profile / f"{name}.txt")
    if args.runs > 1:
        rates = [r["renders_per_s"] for r in results]
        print(f"median of {args.runs} runs: {statistics.median(rates):.0f} renders/s sustained "
              f"(runs: {', '.join(f'{x:.0f}' for x in rates)}); submits/s "
              f"{statistics.median(r['submits_per_s'] for r in results):.0f}; submit p50 "
              f"{statistics.median(r['submit_ms']['p50'] for r in results):.1f} ms, p99 "
              f"{statistics.median(r['submit_ms']['p99'] for r in results):.1f} ms; claim p50 "
              f"{statistics.median(r['claim_ms']['p50'] for r in results):.1f} ms, p99 "
              f"{statistics.median(r['claim_ms']['p99'] for r in results):.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
