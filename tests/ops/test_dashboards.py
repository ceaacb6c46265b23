"""The Grafana dashboards (helm/farm/files/dashboards/, built by deploy/grafana/dashboards.py)
are current, and every metric and label that a dashboard query or an alert names
(helm/farm/files/alerts.yaml and its unit tests' series) is one farm exports.

farm's metrics are collected from its real metric objects: the gateway's (GatewayMetrics and
the rate limiter's counter, on one registry) and the Serve application's (ServeMetrics)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from farm.api.metrics import GatewayMetrics
from farm.api.ratelimit import RateLimiter
from farm.config import RateLimitsConfig
from farm.serve.metrics import ServeMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "helm" / "farm" / "files" / "dashboards"
ALERTS = REPO / "helm" / "farm" / "files" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"

SCRAPE_LABELS = frozenset({"namespace"})
"""Labels the scrape adds to every series (a ServiceMonitor or PodMonitor adds `namespace`);
queries may filter and group by them."""

# The series names each kind of metric exports (the text format; `_created` is left out: no
# dashboard or alert should read it).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count")}


@functools.cache
def builder():
    """deploy/grafana/dashboards.py, a script outside the package, as a module."""
    spec = importlib.util.spec_from_file_location("farm_dashboards", REPO / "deploy" / "grafana" / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- what farm exports ---------------------------------------------------------------------

def _metric_objects() -> tuple[list[MetricWrapperBase], list[CollectorRegistry]]:
    gateway = GatewayMetrics()
    limiter = RateLimiter(RateLimitsConfig(), gateway)  # registers its counter on the gateway's registry
    serve = ServeMetrics()
    objects = [value for owner in (gateway, limiter, serve) for value in vars(owner).values()
               if isinstance(value, MetricWrapperBase)]
    return objects, [gateway.registry, serve.registry]


# Ray's own gauges a dashboard reads (GPU panels): Ray's metrics agent exports each with the
# `ray_` prefix and its view's columns as labels.
RAY_GAUGES = ("node_gpus_utilization", "node_gram_used", "node_gram_available")


def ray_series() -> dict[str, frozenset[str]]:
    """The Ray gauges in RAY_GAUGES as this Ray defines them (a renamed one fails here)."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    return {f"ray_{name}": frozenset(METRICS_GAUGES[name]._view.columns) for name in RAY_GAUGES}


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name farm exports, with the labels it carries (and the Ray gauges it reads)."""
    objects, registries = _metric_objects()
    families = {family.name for registry in registries for family in registry.collect()}
    described = {metric.describe()[0].name for metric in objects}
    # A metric registered without being an attribute would be missed: the registries say what is there.
    assert families == described, f"metrics not found as attributes: {sorted(families - described)}"
    series: dict[str, frozenset[str]] = {}
    for metric in objects:
        family = metric.describe()[0]
        labels = frozenset(metric._labelnames)  # prometheus_client keeps no public accessor for them
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series | ray_series()


@pytest.fixture(scope="module")
def farm_series() -> dict[str, frozenset[str]]:
    return exported_series()


# -- what a PromQL expression names --------------------------------------------------------

KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                      "bool", "offset", "inf", "nan"})
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHERS = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
RANGE = re.compile(r"\[[^\[\]]*\]")
GRAFANA_VARIABLE = re.compile(r"\$\{?\w+(?::\w+)?\}?")
IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


@dataclass
class Names:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def promql_names(expr: str) -> Names:
    """The metric names and label names a PromQL expression (with Grafana's variables) names:
    identifiers outside label matchers, grouping clauses and ranges, that are not functions
    (followed by a parenthesis) nor keywords, are metric names."""
    names = Names()
    text = STRING.sub('""', expr)
    for body in MATCHERS.findall(text):
        names.labels.update(MATCHER_LABEL.findall(body))
    text = MATCHERS.sub(" ", text)
    for body in GROUPING.findall(text):
        names.labels.update(label.strip() for label in body.split(",") if label.strip())
    text = GROUPING.sub(" ", text)
    text = GRAFANA_VARIABLE.sub(" ", RANGE.sub(" ", text))
    names.metrics.update(name for name in IDENTIFIER.findall(text) if name.lower() not in KEYWORDS)
    return names


def problems(where: str, names: Names, farm_series: dict[str, frozenset[str]], extra_labels=()) -> list[str]:
    """What a query names that farm does not export: unknown metrics, and labels that none of
    the query's metrics carries."""
    found = []
    unknown = sorted(names.metrics - farm_series.keys())
    if unknown:
        found.append(f"{where}: names metrics farm does not export: {unknown}")
    if not names.metrics:
        found.append(f"{where}: names no metric")
    carried = set(SCRAPE_LABELS).union(*(farm_series.get(m, ()) for m in names.metrics))
    stray = sorted((names.labels | set(extra_labels)) - carried)
    if stray and not unknown:
        found.append(f"{where}: names labels its metrics do not carry: {stray}")
    return found


LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*([A-Za-z_]\w*)\s*\)$")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def dashboard_problems(name: str, board: dict, farm_series) -> list[str]:
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            where = f"{name}: panel {panel['title']!r} query {target['refId']}"
            legend = LEGEND_LABEL.findall(target.get("legendFormat", ""))
            found += problems(where, promql_names(target["expr"]), farm_series, legend)
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["query"])
        if match is None:
            found.append(f"{name}: variable {variable['name']}: not label_values(metric, label): {variable['query']}")
            continue
        metric, label = match.groups()
        found += problems(f"{name}: variable {variable['name']}", Names({metric}, {label}), farm_series)
    return found


ANNOTATION_LABEL = re.compile(r"\$labels\.(\w+)")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# -- the tests -----------------------------------------------------------------------------

def test_the_expression_reader_finds_metrics_and_labels():
    names = promql_names('histogram_quantile(0.95, sum by (model, le) (rate(farm_queue_wait_seconds_bucket'
                         '{namespace=~"$namespace", model=~"a|b"}[$__rate_interval]))) > 1e3 '
                         'unless on (model) absent(up offset 5m) and scalar(sum(x:recorded:rate5m))')
    assert names.metrics == {"farm_queue_wait_seconds_bucket", "up", "x:recorded:rate5m"}
    assert names.labels == {"model", "le", "namespace"}
    # Strings are not names, whatever they hold.
    assert promql_names('farm_renders_running{model="sum by (tenant) (up)"}').metrics == {"farm_renders_running"}


def test_farm_exports_what_the_dashboards_expect(farm_series):
    assert farm_series["farm_gateway_requests_total"] == {"method", "code"}
    assert farm_series["farm_gateway_rate_limited_total"] == {"class", "scope"}
    assert farm_series["farm_queue_wait_seconds_bucket"] == {"model", "le"}
    assert farm_series["farm_node_quarantines_total"] == frozenset()
    assert "farm_queue_wait_seconds" not in farm_series  # a histogram exports _bucket, _sum, _count only
    assert "farm_cost_dollars" not in farm_series  # a counter exports _total


def test_every_dashboard_is_current():
    module = builder()
    built = module.dashboards()
    assert sorted(path.stem for path in DASHBOARDS_DIR.glob("*.json")) == sorted(built), \
        "a JSON file in helm/farm/files/dashboards/ that the builder does not make, or one missing"
    for name, board in built.items():
        committed = (DASHBOARDS_DIR / f"{name}.json").read_text()
        assert committed == module.to_text(board), \
            f"{name}.json is stale: run .venv/bin/python deploy/grafana/dashboards.py"


def test_dashboards_have_stable_uids_a_prometheus_variable_and_ids():
    boards = builder().dashboards()
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids) and all(uid.startswith("farm-") and len(uid) <= 40 for uid in uids)
    assert set(boards) == {"renders", "cost", "pools", "gateway"}
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["refId"] for t in panel["targets"]), panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_the_panels_draw_the_alerts_thresholds():
    module, alerts = builder(), {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert f") > {module.QUEUE_WAIT_SLO_S}\n" in alerts["FarmQueueWaitOverSLO"]
    assert f") > {module.FAILURE_RATE_LIMIT:.2f}\n" in alerts["FarmRenderFailureRateHigh"]


def test_every_dashboard_query_names_only_farm_metrics(farm_series):
    found = []
    for name, board in builder().dashboards().items():
        found += dashboard_problems(name, board, farm_series)
    assert not found, "\n".join(found)


def test_every_farm_metric_is_on_a_dashboard(farm_series):
    """A metric farm adds shows up somewhere (a family counts as shown by any of its series)."""
    shown = set()
    for board in builder().dashboards().values():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                shown |= promql_names(target["expr"]).metrics
    family = re.compile(r"(_total|_bucket|_sum|_count)$")
    missing = {family.sub("", name) for name in farm_series} - {family.sub("", name) for name in shown}
    assert not missing, f"farm metrics on no dashboard: {sorted(missing)}"


def test_a_query_naming_a_metric_farm_does_not_export_fails(farm_series):
    """The check bites: a dashboard with one wrong name, a wrong suffix, a foreign metric or
    a label its metric lacks is refused."""
    board = builder().renders()
    assert not dashboard_problems("renders", board, farm_series)
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    for wrong, expected in [
        ("sum(rate(farm_renders_finishd_total[5m]))", "farm_renders_finishd_total"),
        ("histogram_quantile(0.9, rate(farm_queue_wait_seconds[5m]))", "farm_queue_wait_seconds"),
        ("sum(rate(farm_cost_dollars[5m]))", "farm_cost_dollars"),
        ("up == 0", "'up'"),
        ("sum by (tenant) (farm_pool_replicas)", "labels its metrics do not carry: ['tenant']"),
        ('farm_renders_running{device_kind="H100"}', "['device_kind']"),
    ]:
        broken = copy.deepcopy(board)
        next(p for p in broken["panels"] if p["id"] == panel["id"])["targets"][0]["expr"] = wrong
        found = dashboard_problems("renders", broken, farm_series)
        assert len(found) == 1 and expected in found[0], (wrong, found)
    broken = copy.deepcopy(board)
    broken["templating"]["list"][1]["query"] = "label_values(farm_pool_replica, namespace)"
    assert "farm_pool_replica" in "".join(dashboard_problems("renders", broken, farm_series))
    broken = copy.deepcopy(board)
    next(p for p in broken["panels"] if p["id"] == panel["id"])["targets"][0]["legendFormat"] = "{{tenant}}"
    assert "['tenant']" in "".join(dashboard_problems("renders", broken, farm_series))


def test_every_alert_names_only_farm_metrics(farm_series):
    found = []
    for rule in alert_rules():
        names = promql_names(rule["expr"])
        used = {label for text in rule["annotations"].values() for label in ANNOTATION_LABEL.findall(text)}
        found += problems(f"alert {rule['alert']}", names, farm_series, used)
    assert not found, "\n".join(found)
    # ... and the check bites on an alert too.
    wrong = problems("alert", promql_names("rate(farm_gateway_request_total[5m]) > 0"), farm_series)
    assert wrong and "farm_gateway_request_total" in wrong[0]


def test_the_alert_unit_tests_feed_only_farm_series(farm_series):
    """The series promtool's unit tests feed the alerts are series farm exports, with its labels."""
    found = []
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for series in case["input_series"]:
            name, _, matchers = series["series"].partition("{")
            labels = set(MATCHER_LABEL.findall(matchers))
            found += problems(f"series {series['series']}", Names({name.strip()}, labels), farm_series)
    assert not found, "\n".join(found)


# -- the chart's dashboard ConfigMaps ------------------------------------------------------

@pytest.fixture(scope="module")
def helm(helm_binary) -> Path:
    return helm_binary


def dashboard_config_maps(helm: Path, *values: str) -> dict[str, dict]:
    args = [a for value in values for a in ("--set", value)]
    result = subprocess.run([str(helm), "template", "rel", str(REPO / "helm" / "farm"), "--namespace", "farm", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(result.stdout)
            if doc and doc["kind"] == "ConfigMap" and "-dashboard-" in doc["metadata"]["name"]}


def test_the_chart_ships_each_dashboard_in_a_config_map_for_the_sidecar(helm):
    maps = dashboard_config_maps(helm)
    assert set(maps) == {f"rel-farm-dashboard-{name}" for name in builder().DASHBOARDS}
    for name in builder().DASHBOARDS:
        config_map = maps[f"rel-farm-dashboard-{name}"]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"][f"farm-{name}.json"]) == json.loads(
            (DASHBOARDS_DIR / f"{name}.json").read_text())
    relabelled = dashboard_config_maps(helm, "monitoring.dashboards.labels.grafana_dashboard=null",
                                       "monitoring.dashboards.labels.team=render")
    assert all(m["metadata"]["labels"]["team"] == "render" and "grafana_dashboard" not in m["metadata"]["labels"]
               for m in relabelled.values())
    assert dashboard_config_maps(helm, "monitoring.dashboards.enabled=false") == {}


# -- every query is PromQL that Prometheus parses -------------------------------------------

PROMTOOL = REPO / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
# Grafana's interval variables, as Grafana would put them in before sending a query.
GRAFANA_INTERVALS = {"$__rate_interval": "2m", "$__range": "6h", "$__interval": "30s"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    if not PROMTOOL.exists():
        subprocess.run(["make", "-s", "promtool"], cwd=REPO, check=True, timeout=300)
    return PROMTOOL


def check_queries(promtool: Path, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool check rules on a rule file with one recording rule per query."""
    rules = []
    for index, expr in enumerate(exprs):
        for variable, interval in GRAFANA_INTERVALS.items():
            expr = expr.replace(variable, interval)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_every_dashboard_query_parses(promtool, tmp_path):
    exprs = [target["expr"] for board in builder().dashboards().values() for panel in board["panels"]
             for target in panel.get("targets", [])]
    result = check_queries(promtool, exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    # ... and a query that does not parse is refused.
    assert check_queries(promtool, ["sum by (model) (rate(farm_renders_running[5m])"], tmp_path).returncode != 0
