"""A real Prometheus (Debian's 2.42.0 server, unpacked by `make promtool`) scrapes the
session's farm, its gateway and its Serve endpoint (the scheduler replica's), every
second, while a small workload runs: renders that succeed, one that fails on every
attempt, one preempted by an urgent render, one whose engine replica is killed, and a
call answered NOT_FOUND. Then every panel query of every Grafana dashboard, with the
variables Grafana would put in, returns at least one series from that Prometheus, and
every alert expression evaluates without error.

A few panels show what only a fault of the farm itself makes (listed in RARE_EVENT_PANELS,
with the reason): for those, every metric they name must be one the real scrape of the farm
announced (Prometheus's metadata of its targets knows each family from its # TYPE line, even
before the family has a series)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from farm.client import FarmClient
from farm.config import Task
from farm.domain.spec import RenderSpec
from farm.jobs.store import JobStore
from farm.jobs.validation import resolve_spec
from farm.serve import flags
from farm.serve.flags import hold_next_render
from farm.v1 import render_pb2 as pb
from tests.integration.conftest import free_port
from tests.integration.test_failing_renders import until_final
from tests.integration.test_render_path import small_spec
from tests.ops.test_dashboards import ALERTS, REPO, builder, promql_names

PROMETHEUS = REPO / ".tools" / "prometheus" / "usr" / "bin" / "prometheus"
SCRAPE_INTERVAL_S = 1
# Generous bounds on waits whose success is polled; none is the condition itself.
START_TIMEOUT_S = 60
RENDER_TIMEOUT_S = 300
SCRAPE_TIMEOUT_S = 30

# What Grafana puts in for its variables: its interval variables (the rate window a few
# minutes, longer than the workload, so each rate spans it), and "All" (`.*`, the
# dashboards' all-value) for the namespace, model and tenant selectors.
GRAFANA_VALUES = {"__rate_interval": "5m", "__range": "1h", "__interval": "15s", "datasource": "prometheus",
                  "namespace": ".*", "model": ".*", "tenant": ".*"}

STORE_OUTAGE = ("needs calls answered INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED: the job store unreachable from "
                "the gateway, which would fail the other tests sharing this farm")
RATE_LIMIT = ("needs a call refused by a rate limit: the per-tenant limits (100/s, burst 500) take thousands of calls "
              "on the shared gateway to trip, and the per-address ones would refuse the other tests' clients")
RARE_EVENT_PANELS = {
    ("gateway", "Server error ratio"): STORE_OUTAGE,
    ("gateway", "Job store unavailable"): STORE_OUTAGE,
    ("gateway", "Rate-limited calls"): RATE_LIMIT,
}
"""(dashboard, panel title) -> why the workload does not make the series it shows."""
GPU_PANELS = {("pools", "GPU utilisation by node"), ("pools", "GPU memory used by node")}
"""Panels of Ray's GPU gauges: Ray exports them only on nodes with GPUs, and this test scrapes
farm's endpoints, not Ray's. tests/ops/test_dashboards.py checks their names and labels
against Ray's own definitions."""


class Prometheus:
    """A Prometheus server on a free loopback port, its storage in a temporary directory."""

    def __init__(self, targets: dict[str, str]):
        self.home = Path(tempfile.mkdtemp(prefix="farm-prom-", dir="/tmp"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (self.home / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = self.home / "prometheus.log"
        self.process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={self.home / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.home / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:  # a query Prometheus refuses: 400 with its reason
            body = json.load(error)
        return body

    def query(self, expr: str) -> list[dict]:
        """The series of an instant query; a query Prometheus refuses fails the test."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, condition) -> None:
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while not condition():
            assert self.process.poll() is None, f"Prometheus exited; see {self.log}"
            assert time.monotonic() < deadline, f"{what}: not within {SCRAPE_TIMEOUT_S} s ({self.log})"
            time.sleep(0.2)

    def scraped_since(self, job: str, since: float) -> bool:
        """Whether a scrape of `job` that succeeded began after `since` (a Unix time)."""
        last = self.value(f'timestamp(up{{job="{job}"}} == 1)')
        return last is not None and last > since

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(farm_config, gateway):
    if not PROMETHEUS.exists():
        subprocess.run(["make", "-s", "promtool"], cwd=REPO, check=True, timeout=300)
    config, _ = farm_config
    server = Prometheus({"farm-gateway": f"127.0.0.1:{config.gateway.metrics_port}",
                         "farm-serve": f"127.0.0.1:{config.scheduler.metrics_port}"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the API answers once the server is up; `up` once both targets were scraped
            assert server.process.poll() is None, f"Prometheus exited; see {server.log}"
            try:
                if len(server.query("up == 1")) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"Prometheus did not scrape both farm endpoints: {server.log}"
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


def serve_counter(port: int, name: str) -> float:
    """The sum of a counter's series on a farm endpoint, read directly."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(value) for value in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def wait_holding(render_id: str) -> dict:
    """The hold's record ({step, node, pid, waiting}) once `render_id` waits at it."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while not (record := flags.held().get(render_id, {})).get("waiting"):
        assert time.monotonic() < deadline, f"{render_id} did not take its hold"
        time.sleep(0.05)
    return record


def run_workload(config, client: FarmClient, store: JobStore, tenant) -> int:
    """Renders that end each way the dashboards show; returns how many reached a final state."""
    model = config.model("ltx-video-tiny")
    # One step of LTX-Video fails in its scheduler on every attempt (tests/integration/
    # test_failing_renders.py); the gateway refuses that spec, so it goes in through the store.
    request = RenderSpec(model=model.name, task=Task.TEXT_TO_VIDEO, prompt="a paper boat", width=32, height=32,
                         num_frames=9, fps=8, num_inference_steps=2, seed=7)
    failing, _ = store.submit(tenant.id, request, dataclasses.replace(resolve_spec(request, {model.name: model}),
                                                                      num_inference_steps=1))
    succeeding = [client.submit(small_spec(steps=2, seed=seed)).id for seed in (1, 2)]
    with pytest.raises(grpc.RpcError) as missing:
        client.get("r00000000000deadbeef")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert until_final(store, failing.id, RENDER_TIMEOUT_S).state.value == "FAILED"
    for render_id in succeeding:
        assert client.wait(render_id, timeout=RENDER_TIMEOUT_S).state == pb.RENDER_STATE_SUCCEEDED

    # A batch render held while denoising, preempted by an urgent one.
    hold_next_render(model.name, step=2)
    victim = client.submit(small_spec(steps=4, seed=3, priority=10)).id
    wait_holding(victim)
    urgent = client.submit(small_spec(steps=2, seed=4, priority=90)).id
    assert client.wait(urgent, timeout=RENDER_TIMEOUT_S).state == pb.RENDER_STATE_SUCCEEDED
    final = client.wait(victim, timeout=RENDER_TIMEOUT_S)
    assert final.state == pb.RENDER_STATE_SUCCEEDED and final.preemptions == 1, final
    flags.clear_holds()

    # A render whose engine replica dies under it: its lost attempt is absorbed by the farm.
    hold_next_render(model.name, step=2)
    killed = client.submit(small_spec(steps=4, seed=5)).id
    # SIGKILL, as in a crash or an OOM kill, to the replica process holding it (there may be two).
    os.kill(wait_holding(killed)["pid"], signal.SIGKILL)
    final = client.wait(killed, timeout=RENDER_TIMEOUT_S)
    assert final.state == pb.RENDER_STATE_SUCCEEDED and final.attempt == 2, final
    return 6


def empty_queries(server: Prometheus, queries) -> list:
    return [query for query in queries if not server.query(query.expr)]


def announced_families(server: Prometheus) -> set[str]:
    """The metric families the scrapes of the farm's two endpoints announced (# TYPE)."""
    return {entry["metric"] for job in ("farm-gateway", "farm-serve")
            for entry in server.api("targets/metadata", match_target=f'{{job="{job}"}}')["data"]}


FAMILY_SUFFIX = re.compile(r"(_total|_bucket|_sum|_count)$")


def unannounced_metrics(expr: str, families: set[str]) -> list[str]:
    return sorted(name for name in promql_names(expr).metrics if FAMILY_SUFFIX.sub("", name) not in families)


def test_a_real_prometheus_scraping_the_farm_answers_every_dashboard_query(prometheus, gateway, farm_config, holds):
    config, _ = farm_config
    store = JobStore(config.store_url, migrate=False)
    tenant, key = store.create_tenant(f"prom-{secrets.token_hex(3)}")
    store.set_budget(tenant.name, 1000.0, "day")  # so that its budget left is published

    serve_port = config.scheduler.metrics_port
    finished_before = serve_counter(serve_port, "farm_renders_finished_total")
    with FarmClient(gateway.target, key) as mine:
        finished = run_workload(config, mine, store, tenant)
    store.close()
    # The scheduler counts a render once its final state is written, a moment after a client
    # can read that state.
    deadline = time.monotonic() + 30
    while (finished_now := serve_counter(serve_port, "farm_renders_finished_total")) < finished_before + finished:
        assert time.monotonic() < deadline, f"{finished_now - finished_before} of {finished} renders counted"
        time.sleep(0.1)
    # Prometheus has the workload once its count reached the endpoint's, and both endpoints
    # were scraped after that.
    prometheus.wait_for("farm_renders_finished_total scraped",
                        lambda: (prometheus.value("sum(farm_renders_finished_total)") or 0) >= finished_now)
    done = time.time()
    for job in ("farm-gateway", "farm-serve"):
        prometheus.wait_for(f"a scrape of {job}", lambda: prometheus.scraped_since(job, done))

    queries = builder().panel_queries(GRAFANA_VALUES)
    assert {q.dashboard for q in queries} == set(builder().DASHBOARDS)
    assert all("$" not in q.expr for q in queries)
    empty = empty_queries(prometheus, queries)
    unexpected = [q for q in empty if (q.dashboard, q.panel) not in RARE_EVENT_PANELS.keys() | GPU_PANELS]
    assert not unexpected, "dashboard queries with no series after the workload:\n" + "\n".join(
        f"{q.dashboard}: {q.panel!r} {q.ref_id}: {q.expr}" for q in unexpected)
    # Each rare-event panel is a panel of a dashboard, and names only families the farm's scrape announced.
    panels = {(q.dashboard, q.panel) for q in queries}
    assert set(RARE_EVENT_PANELS) | GPU_PANELS <= panels
    families = announced_families(prometheus)
    assert {"farm_renders_finished", "farm_gateway_rate_limited", "farm_gateway_requests"} <= families
    for query in queries:
        if (query.dashboard, query.panel) in RARE_EVENT_PANELS:
            assert not unannounced_metrics(query.expr, families), query

    # The check bites: one misspelled metric in a panel makes that query, and only that one, empty;
    # and a rare-event panel's query naming a metric farm does not export is refused too.
    boards = builder().dashboards()
    panel = next(p for p in boards["renders"]["panels"] if p.get("title") == "Running renders by model")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("farm_renders_running", "farm_render_running")
    broken = [q for q in builder().panel_queries(GRAFANA_VALUES, {"renders": boards["renders"]})
              if q.panel == panel["title"]]
    assert [q.expr for q in empty_queries(prometheus, broken)] == [broken[0].expr]
    assert unannounced_metrics(broken[0].expr, families) == ["farm_render_running"]
    assert unannounced_metrics("sum(rate(farm_gateway_rate_limit_total[5m]))", families) == [
        "farm_gateway_rate_limit_total"]


def test_every_alert_expression_evaluates_against_the_live_prometheus(prometheus):
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        answer = prometheus.api("query", query=rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)
    # ... and an expression Prometheus cannot evaluate is refused the same way.
    wrong = prometheus.api("query", query="rate(farm_renders_running)")
    assert wrong["status"] == "error" and wrong["errorType"] == "bad_data"


def test_grafana_variables_left_unresolved_are_an_error():
    boards = builder().dashboards()
    with pytest.raises(KeyError, match=r"\$model"):
        builder().panel_queries({k: v for k, v in GRAFANA_VALUES.items() if k != "model"}, boards)
