"""farm's Grafana dashboards, built with grafana-foundation-sdk's typed builders and
written as JSON to helm/farm/files/dashboards/ (the chart ships each as a ConfigMap for
Grafana's dashboard sidecar).

    .venv/bin/python deploy/grafana/dashboards.py           # rewrite the JSON files
    .venv/bin/python deploy/grafana/dashboards.py --check   # exit 1 if one is stale

Every query names only metrics farm exports (farm/api/metrics.py, farm/api/ratelimit.py,
farm/serve/metrics.py); tests/ops/test_dashboards.py rebuilds the files, compares them
with the committed ones and checks every metric and label a query names.

Each dashboard filters by the `namespace` label that a Kubernetes scrape (ServiceMonitor,
PodMonitor) adds to every series, so one Grafana can watch several farms; where a scrape
adds none, "All" matches every series all the same."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard

OUTPUT = Path(__file__).resolve().parents[2] / "helm" / "farm" / "files" / "dashboards"
DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
"""Grafana's rate window: at least four scrape intervals, whatever the zoom."""
TAG = "farm"

# Label matchers for the dashboards' variables.
NAMESPACE = 'namespace=~"$namespace"'
MODEL = 'model=~"$model"'
TENANT = 'tenant=~"$tenant"'

# Alert thresholds drawn on the panels that show what the alert watches
# (helm/farm/files/alerts.yaml).
QUEUE_WAIT_SLO_S = 600
FAILURE_RATE_LIMIT = 0.10


def sel(*matchers: str) -> str:
    return "{" + ", ".join(matchers) + "}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


def _targets(panel, queries: Sequence[Query]):
    for index, query in enumerate(queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index))
        if query.legend:
            target = target.legend_format(query.legend)
        panel = panel.with_target(target)
    return panel


def graph(title: str, description: str, unit: str, *queries: Query, stacked: bool = False,
          threshold: float | None = None, width: int = 12, height: int = 8) -> timeseries.Panel:
    """A time series panel; `threshold` draws an alert's limit as a dashed line."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).fill_opacity(10 if not stacked else 40).line_width(1)
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    if threshold is not None:
        panel = (panel.thresholds(dashboard_builders.ThresholdsConfig().mode(dashboard.ThresholdsMode.ABSOLUTE)
                                  .steps([dashboard.Threshold(value=None, color="green"),
                                          dashboard.Threshold(value=threshold, color="red")]))
                 .thresholds_style(common_builders.GraphThresholdsStyleConfig()
                                   .mode(common.GraphTresholdsStyleMode.DASHED)))
    return _targets(panel, queries)


def single(title: str, description: str, unit: str, query: Query, width: int = 6, height: int = 4) -> stat.Panel:
    """One number over the dashboard's time range (its query uses $__range)."""
    panel = (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).graph_mode(common.BigValueGraphMode.NONE)
             .color_mode(common.BigValueColorMode.NONE)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return _targets(panel, [query])


def variable(name: str, label: str, metric: str) -> dashboard_builders.QueryVariable:
    """A multi-value variable of a label's values on `metric`; "All" is `.*`, so it also
    matches series without the label."""
    return (dashboard_builders.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(f"label_values({metric}, {name})").multi(True).include_all(True).all_value(".*")
            .current(dashboard.VariableOption(selected=True, text="All", value="$__all"))
            .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dashboard.VariableSort.ALPHABETICAL_ASC))


Section = tuple[str, list]
"""A row's title and its panels."""


def assemble(uid: str, title: str, description: str, variables: list, sections: list[Section]) -> dict:
    board = (dashboard_builders.Dashboard(title).uid(uid).description(description).tags([TAG])
             .time("now-6h", "now").refresh("1m").timezone("utc").tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
             .readonly()
             .link(dashboard_builders.DashboardLink("farm").type(dashboard.DashboardLinkType.DASHBOARDS)
                   .tags([TAG]).as_dropdown(True).include_vars(True).keep_time(True))
             .with_variable(dashboard_builders.DatasourceVariable("datasource").label("Prometheus")
                            .type("prometheus")))
    for var in variables:
        board = board.with_variable(var)
    panel_id = 0
    for row_title, panels in sections:
        panel_id += 1
        board = board.with_row(dashboard_builders.Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    # A plain JSON tree: what Grafana reads and the tests inspect.
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


# -- the dashboards ------------------------------------------------------------------------

def renders() -> dict:
    ns_model = sel(NAMESPACE, MODEL)
    finished = f"farm_renders_finished_total{ns_model}"
    failed = "farm_renders_finished_total" + sel(NAMESPACE, MODEL, 'state="FAILED"')
    decided = "farm_renders_finished_total" + sel(NAMESPACE, MODEL, 'state=~"SUCCEEDED|FAILED"')
    return assemble(
        "farm-renders", "farm / Renders",
        "The queue, what runs, how renders end and how long their stages take.",
        [variable("namespace", "Namespace", "farm_pool_replicas"), variable("model", "Model", "farm_pool_replicas")],
        [
            ("Queue", [
                graph("Queued renders by model", "Renders waiting in the queue (the queue depth).", "short",
                      Query(f"sum by (model) (farm_queue_depth{ns_model})", "{{model}}"), stacked=True, width=6),
                graph("Queued work by model",
                      "Estimated device-seconds of queued renders (the autoscaler's backlog, summed over the "
                      "model's pools).", "s",
                      Query(f"sum by (model) (farm_pool_backlog_seconds{ns_model})", "{{model}}"), stacked=True,
                      width=6),
                graph("Submitted and dispatched",
                      "Renders queued at the gateways (idempotent replays excluded) and attempts the scheduler "
                      "dispatched to engines, per second. Dispatches above submits drain the queue.", "ops",
                      Query(f"sum(rate(farm_renders_submitted_total{ns_model}[{RATE}]))", "submitted"),
                      Query(f"sum(rate(farm_attempts_started_total{ns_model}[{RATE}]))", "attempts dispatched"),
                      width=6),
                graph("Queue wait (p50, p95)",
                      f"Submit to first dispatch, by model. The dashed line is the alert's SLO "
                      f"({QUEUE_WAIT_SLO_S} s at the 95th percentile).", "s",
                      Query(f"histogram_quantile(0.95, sum by (model, le) "
                            f"(rate(farm_queue_wait_seconds_bucket{ns_model}[{RATE}])))", "{{model}} p95"),
                      Query(f"histogram_quantile(0.5, sum by (model, le) "
                            f"(rate(farm_queue_wait_seconds_bucket{ns_model}[{RATE}])))", "{{model}} p50"),
                      threshold=QUEUE_WAIT_SLO_S, width=6),
            ]),
            ("Running and outcomes", [
                graph("Running renders by model", "Renders on engines now.", "short",
                      Query(f"sum by (model) (farm_renders_running{ns_model})", "{{model}}"), stacked=True, width=8),
                graph("Renders finished by state (per minute)", "Renders reaching SUCCEEDED, FAILED or CANCELLED.",
                      "short",
                      Query(f"60 * sum by (state) (rate({finished}[{RATE}]))", "{{state}}"), stacked=True, width=8),
                graph("Failure rate by model",
                      "FAILED among renders that succeeded or failed (cancels left out). The dashed line is the "
                      "alert's limit.", "percentunit",
                      Query(f"sum by (model) (rate({failed}[{RATE}])) / sum by (model) (rate({decided}[{RATE}]))",
                            "{{model}}"),
                      threshold=FAILURE_RATE_LIMIT, width=8),
                graph("Attempts per finished render",
                      "Attempts dispatched per render that reached a final state: 1 when nothing is retried, "
                      "requeued or preempted.", "short",
                      Query(f"sum by (model) (rate(farm_attempts_started_total{ns_model}[{RATE}])) "
                            f"/ sum by (model) (rate({finished}[{RATE}]))", "{{model}}"), width=12),
                graph("Frames delivered (per second)", "Frames of succeeded renders.", "short",
                      Query(f"sum by (model) (rate(farm_frames_generated_total{ns_model}[{RATE}]))", "{{model}}"),
                      width=12),
            ]),
            ("Durations", [
                graph("Render duration (p50, p95) by state", "First dispatch to final state.", "s",
                      Query(f"histogram_quantile(0.95, sum by (state, le) "
                            f"(rate(farm_render_duration_seconds_bucket{ns_model}[{RATE}])))", "{{state}} p95"),
                      Query(f"histogram_quantile(0.5, sum by (state, le) "
                            f"(rate(farm_render_duration_seconds_bucket{ns_model}[{RATE}])))", "{{state}} p50"),
                      width=12),
                graph("Denoising step time (p50, p95)", "One denoising step of one render, by model and device kind.",
                      "s",
                      Query(f"histogram_quantile(0.95, sum by (model, device_kind, le) "
                            f"(rate(farm_denoising_step_duration_seconds_bucket{ns_model}[{RATE}])))",
                            "{{model}} {{device_kind}} p95"),
                      Query(f"histogram_quantile(0.5, sum by (model, device_kind, le) "
                            f"(rate(farm_denoising_step_duration_seconds_bucket{ns_model}[{RATE}])))",
                            "{{model}} {{device_kind}} p50"),
                      width=12),
                graph("Device time by stage",
                      "Device-seconds metered per second in each phase (prompt encoding, denoising, decoding, "
                      "post-processing, encoding, writing): how many devices are busy in each. Post-processing "
                      "and encoding count CPU core-seconds.", "short",
                      Query(f"sum by (phase) (rate(farm_device_seconds_total{ns_model}[{RATE}]))", "{{phase}}"),
                      stacked=True, width=12),
                graph("Stage time per finished render",
                      "Mean metered device-seconds per render that reached a final state, by phase.", "s",
                      Query(f"sum by (phase) (rate(farm_device_seconds_total{ns_model}[{RATE}])) "
                            f"/ scalar(sum(rate({finished}[{RATE}])))", "{{phase}}"),
                      stacked=True, width=12),
            ]),
        ])


def cost() -> dict:
    charged = sel(NAMESPACE, TENANT, MODEL)
    all_tenants = sel(NAMESPACE, MODEL)  # for series with no tenant label: absorbed work, finished renders
    return assemble(
        "farm-cost", "farm / Cost",
        "What renders cost, whom it was charged to, what budgets have left and what the farm absorbed.",
        [variable("namespace", "Namespace", "farm_cost_dollars_total"),
         variable("tenant", "Tenant", "farm_cost_dollars_total"),
         variable("model", "Model", "farm_cost_dollars_total")],
        [
            ("Totals over the time range", [
                single("Charged", "Dollars charged to tenants over the dashboard's time range.", "currencyUSD",
                       Query(f"sum(increase(farm_cost_dollars_total{charged}[$__range]))")),
                single("Device-hours charged", "Device time charged over the time range (CPU phases in "
                       "core-hours).", "short",
                       Query(f"sum(increase(farm_device_seconds_total{charged}[$__range])) / 3600")),
                single("Absorbed by the farm", "Cost of attempts lost to farm faults (a replica or node died): "
                       "recorded, never charged.", "currencyUSD",
                       Query(f"sum(increase(farm_absorbed_dollars_total{all_tenants}[$__range]))")),
                single("Lowest budget left", "The smallest budget left of the selected tenants (after "
                       "reservations), as the scheduler last published it.", "currencyUSD",
                       Query(f"min(farm_budget_remaining_dollars{sel(NAMESPACE, TENANT)})")),
            ]),
            ("Spend", [
                graph("Spend by tenant ($/hour)", "Dollars charged per hour, by tenant.", "currencyUSD",
                      Query(f"3600 * sum by (tenant) (rate(farm_cost_dollars_total{charged}[{RATE}]))", "{{tenant}}"),
                      stacked=True),
                graph("Spend by model ($/hour)", "Dollars charged per hour, by model.", "currencyUSD",
                      Query(f"3600 * sum by (model) (rate(farm_cost_dollars_total{charged}[{RATE}]))", "{{model}}"),
                      stacked=True),
                graph("Spend by device kind and phase ($/hour)", "Where the money goes: each phase priced on the "
                      "device kind that ran it.", "currencyUSD",
                      Query(f"3600 * sum by (device_kind, phase) (rate(farm_cost_dollars_total{charged}[{RATE}]))",
                            "{{device_kind}} {{phase}}"), stacked=True),
                graph("Device time by tenant and device kind", "Device-seconds charged per second: the devices "
                      "each tenant keeps busy.", "short",
                      Query(f"sum by (tenant, device_kind) (rate(farm_device_seconds_total{charged}[{RATE}]))",
                            "{{tenant}} {{device_kind}}"), stacked=True),
                graph("Cost per finished render", "Dollars charged per render that reached a final state, by "
                      "model, over all tenants (renders are not counted by tenant).", "currencyUSD",
                      Query(f"sum by (model) (rate(farm_cost_dollars_total{all_tenants}[{RATE}])) "
                            f"/ sum by (model) (rate(farm_renders_finished_total{all_tenants}[{RATE}]))", "{{model}}")),
            ]),
            ("Budgets and absorbed work", [
                graph("Budget left by tenant", "Budget left in the tenant's current period, after reservations "
                      "(published when a render of the tenant ends; tenants without a budget have none).",
                      "currencyUSD",
                      Query(f"sum by (tenant) (farm_budget_remaining_dollars{sel(NAMESPACE, TENANT)})", "{{tenant}}"),
                      Query(f"sum by (tenant) (farm_budget_dollars{sel(NAMESPACE, TENANT)})", "{{tenant}} budget")),
                graph("Absorbed by model and device kind ($/hour)", "Cost of attempts lost to farm faults, per "
                      "hour: work the farm paid for itself.", "currencyUSD",
                      Query(f"3600 * sum by (model, device_kind) (rate(farm_absorbed_dollars_total{all_tenants}[{RATE}]))",
                            "{{model}} {{device_kind}}"), stacked=True),
            ]),
        ])


def pools() -> dict:
    pool = sel(NAMESPACE, MODEL)
    return assemble(
        "farm-pools", "farm / Pools",
        "Engine pools (one per model and device kind): replicas, backlog, cold starts, preemptions, quarantines.",
        [variable("namespace", "Namespace", "farm_pool_replicas"), variable("model", "Model", "farm_pool_replicas")],
        [
            ("Replicas", [
                graph("Replicas running and wanted", "Engine replicas running in each pool, and what its backlog "
                      "asks for (within the pool's bounds). Wanted above running for long: replicas do not start.",
                      "short",
                      Query(f"sum by (model, device_kind) (farm_pool_replicas{pool})",
                            "{{model}} {{device_kind}} running"),
                      Query(f"sum by (model, device_kind) (farm_pool_wanted_replicas{pool})",
                            "{{model}} {{device_kind}} wanted")),
                graph("Replicas short", "Wanted minus running, per pool (0 when the pool has what it asks for).",
                      "short",
                      Query(f"clamp_min(sum by (model, device_kind) (farm_pool_wanted_replicas{pool}) "
                            f"- sum by (model, device_kind) (farm_pool_replicas{pool}), 0)",
                            "{{model}} {{device_kind}}")),
                graph("Backlog by pool", "Estimated device-seconds of queued work routed to each pool.", "s",
                      Query(f"sum by (model, device_kind) (farm_pool_backlog_seconds{pool})",
                            "{{model}} {{device_kind}}"), stacked=True),
                graph("Cold start by pool", "Start-up (model load and warm-up) of each pool's newest replica; the "
                      "autoscaler asks for replicas that much earlier.", "s",
                      Query(f"max by (model, device_kind) (farm_pool_cold_start_seconds{pool})",
                            "{{model}} {{device_kind}}")),
            ]),
            ("Disruptions", [
                graph("Preemptions by pool (per hour)", "Renders checkpointed and requeued for a render of a "
                      "preempting priority class.", "short",
                      Query(f"3600 * sum by (model, device_kind) (rate(farm_preemptions_total{pool}[{RATE}]))",
                            "{{model}} {{device_kind}}"), stacked=True, width=8),
                graph("Node quarantines (last 10 minutes)", "Nodes put in quarantine after failing renders, over "
                      "the last 10 minutes (with the default quarantine_s of 300 s, an upper bound of the nodes "
                      "quarantined now). The scheduler's log names each node and why.", "short",
                      Query(f"sum(increase(farm_node_quarantines_total{sel(NAMESPACE)}[10m]))", "quarantines"),
                      width=8),
                graph("Attempts lost (per hour)", "Attempts lost and requeued, by pool and cause: a replica or "
                      "node that died (replica), or a scheduler whose lease expired (lease; its pool unknown). "
                      "Steady replica losses mean replicas that keep dying.", "short",
                      Query(f"3600 * sum by (model, device_kind, cause) (rate(farm_attempts_lost_total{pool}[{RATE}]))",
                            "{{model}} {{device_kind}} {{cause}}"), stacked=True, width=8),
            ]),
            ("GPUs", [
                graph("GPU utilisation by node", "Ray's own gauge of each GPU's utilisation, from the Ray pods' "
                      "metrics port (the chart's PodMonitor scrapes it). Ray exports it on nodes with GPUs only. "
                      "Busy pools with idle GPUs: the engines wait on something else (CPU, post-processing, I/O).",
                      "percent",
                      Query(f"avg by (ip, GpuIndex, GpuDeviceName) (ray_node_gpus_utilization{sel(NAMESPACE)})",
                            "{{ip}} GPU {{GpuIndex}} {{GpuDeviceName}}")),
                graph("GPU memory used by node", "Ray's gauge of the GPU memory in use on each node, beside what "
                      "is free.", "decmbytes",
                      Query(f"sum by (ip) (ray_node_gram_used{sel(NAMESPACE)})", "{{ip}} used"),
                      Query(f"sum by (ip) (ray_node_gram_available{sel(NAMESPACE)})", "{{ip}} free")),
            ]),
        ])


def gateway() -> dict:
    ns = sel(NAMESPACE)
    not_ok = sel(NAMESPACE, 'code!="OK"')
    unavailable = sel(NAMESPACE, 'code="UNAVAILABLE"')
    server_errors = sel(NAMESPACE, 'code=~"INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED"')
    # WatchRender is timed until its stream ends, minutes: it would hide the unary calls.
    unary = sel(NAMESPACE, 'method!="WatchRender"')
    return assemble(
        "farm-gateway", "farm / Gateway",
        "The gRPC gateway: calls, errors by code, latency, rate limits and submits.",
        [variable("namespace", "Namespace", "farm_gateway_requests_total")],
        [
            ("Calls", [
                graph("Calls by method", "RPCs per second, by method.", "reqps",
                      Query(f"sum by (method) (rate(farm_gateway_requests_total{ns}[{RATE}]))", "{{method}}"),
                      stacked=True),
                graph("Errors by code", "RPCs that did not end OK, per second, by gRPC code. UNAVAILABLE: the job "
                      "store could not be reached (or a dependency timed out); RESOURCE_EXHAUSTED: a rate limit, "
                      "budget or queue limit.", "reqps",
                      Query(f"sum by (code) (rate(farm_gateway_requests_total{not_ok}[{RATE}]))",
                            "{{code}}"), stacked=True),
                graph("Server error ratio", "Calls ending INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED among all "
                      "calls.", "percentunit",
                      Query(f"sum(rate(farm_gateway_requests_total{server_errors}[{RATE}])) "
                            f"/ sum(rate(farm_gateway_requests_total{ns}[{RATE}]))", "server errors")),
                graph("Job store unavailable", "Calls answered UNAVAILABLE, per second, by method: the gateway "
                      "could not reach the job store.", "reqps",
                      Query(f"sum by (method) (rate(farm_gateway_requests_total{unavailable}[{RATE}]))",
                            "{{method}}")),
                graph("Job store errors", "Failed calls to the job store per second: the gateways' (answered "
                      "UNAVAILABLE) and the scheduler's by operation (retried).", "ops",
                      Query(f"sum(rate(farm_gateway_store_errors_total{ns}[{RATE}]))", "gateways"),
                      Query(f"sum by (operation) (rate(farm_store_errors_total{ns}[{RATE}]))",
                            "scheduler {{operation}}")),
            ]),
            ("Latency", [
                graph("Latency p95 by method", "Unary calls (WatchRender streams are timed until they end).", "s",
                      Query(f"histogram_quantile(0.95, sum by (method, le) "
                            f"(rate(farm_gateway_request_duration_seconds_bucket{unary}[{RATE}])))", "{{method}}")),
                graph("Latency p50 and p99, all unary calls", "", "s",
                      Query(f"histogram_quantile(0.99, sum by (le) "
                            f"(rate(farm_gateway_request_duration_seconds_bucket{unary}[{RATE}])))", "p99"),
                      Query(f"histogram_quantile(0.5, sum by (le) "
                            f"(rate(farm_gateway_request_duration_seconds_bucket{unary}[{RATE}])))", "p50")),
            ]),
            ("Limits and submits", [
                graph("Rate-limited calls", "Calls refused by a rate limit, per second, by class of call "
                      "(submits, reads, watches, failed-auth) and scope (tenant or client address).", "reqps",
                      Query(f"sum by (class, scope) (rate(farm_gateway_rate_limited_total{ns}[{RATE}]))",
                            "{{class}} {{scope}}"), stacked=True),
                graph("Renders submitted", "Renders queued per second (idempotent replays excluded), by model "
                      "and task.", "ops",
                      Query(f"sum by (model, task) (rate(farm_renders_submitted_total{ns}[{RATE}]))",
                            "{{model}} {{task}}"), stacked=True),
            ]),
        ])


DASHBOARDS: dict[str, Callable[[], dict]] = {"renders": renders, "cost": cost, "pools": pools, "gateway": gateway}


def dashboards() -> dict[str, dict]:
    return {name: build() for name, build in DASHBOARDS.items()}


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel, as Grafana sends it to Prometheus."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str


GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def panel_queries(values: dict[str, str], boards: dict[str, dict] | None = None) -> list[PanelQuery]:
    """Every panel query of every dashboard (of `boards`, or of the builders), with its
    Grafana variables (`$name`, `${name}`, `${name:format}`) replaced by `values`, as
    Grafana does before it sends a query. A variable missing from `values` is an error:
    a query left with a `$` would not be the one Grafana runs."""
    found = []
    for name, board in (boards if boards is not None else dashboards()).items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                def resolve(match: re.Match) -> str:
                    variable = match.group(1) or match.group(2)
                    if variable not in values:
                        raise KeyError(f"{name}: panel {panel['title']!r}: no value for ${variable}")
                    return values[variable]

                found.append(PanelQuery(name, panel["title"], target["refId"],
                                        GRAFANA_VARIABLE.sub(resolve, target["expr"])))
    return found


def to_text(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from a rebuild")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = args.output / f"{name}.json"
        text = to_text(board)
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"{path} is stale: run .venv/bin/python deploy/grafana/dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
