"""Prometheus metrics of the Serve application, exposed by the scheduler replica.

Engines report step timings and results through their render streams, so one
endpoint covers the whole application however many engine replicas there are."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from farm.jobs.records import ClaimedRender
from farm.metering.cost import Charge

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RENDER_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# What the scheduler asks of the store: claims, leases (heartbeats, requeues, pools),
# progress, endings, the autoscaling reads and the retention's pruning.
STORE_OPERATIONS = ("claim", "lease", "cancels", "progress", "ending", "autoscale", "prune")
# Why an attempt was lost: its replica or node went away, its scheduler's lease expired, or
# its scheduler stopped before the render could checkpoint.
LOSS_CAUSES = ("replica", "lease", "stopped")


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.finished = Counter("farm_renders_finished_total", "Renders that reached a final state.",
                                ["model", "state"], registry=r)
        self.started = Counter("farm_attempts_started_total", "Render attempts dispatched to an engine.",
                               ["model"], registry=r)
        self.queue_wait = Histogram("farm_queue_wait_seconds", "Submit to first dispatch.", ["model"],
                                    buckets=RENDER_BUCKETS, registry=r)
        self.duration = Histogram("farm_render_duration_seconds", "First dispatch to final state.",
                                  ["model", "state"], buckets=RENDER_BUCKETS, registry=r)
        self.step = Histogram("farm_denoising_step_duration_seconds", "One denoising step of one render.",
                              ["model", "device_kind"], buckets=STEP_BUCKETS, registry=r)
        self.frames = Counter("farm_frames_generated_total", "Frames delivered in succeeded renders.",
                              ["model"], registry=r)
        labels = ["tenant", "model", "device_kind", "phase"]
        self.cost = Counter("farm_cost_dollars_total", "Cost charged to tenants.", labels, registry=r)
        self.device_seconds = Counter("farm_device_seconds_total", "Device time charged to tenants.", labels,
                                      registry=r)
        self.absorbed = Counter("farm_absorbed_dollars_total", "Cost of attempts lost to farm faults, not charged.",
                                ["model", "device_kind"], registry=r)
        self.budget_remaining = Gauge("farm_budget_remaining_dollars",
                                      "Budget left in the current period (after reservations).", ["tenant"],
                                      registry=r)
        self.running_renders = Gauge("farm_renders_running", "Renders on engines now.", ["model"], registry=r)
        pool = ["model", "device_kind"]
        self.pool_replicas = Gauge("farm_pool_replicas", "Engine replicas running in the pool.", pool, registry=r)
        self.pool_wanted = Gauge("farm_pool_wanted_replicas", "Replicas the pool's backlog asks for.", pool,
                                 registry=r)
        self.pool_backlog = Gauge("farm_pool_backlog_seconds",
                                  "Estimated device-seconds of queued work routed to the pool.", pool, registry=r)
        self.pool_cold_start = Gauge("farm_pool_cold_start_seconds",
                                     "Start-up (model load and warm-up) of the pool's newest replica.", pool,
                                     registry=r)
        self.quarantines = Counter("farm_node_quarantines_total",
                                   "Nodes kept out of their pools after failing renders (see the scheduler's log).",
                                   registry=r)
        self.preemptions = Counter("farm_preemptions_total", "Renders preempted for a higher priority class.", pool,
                                   registry=r)

        self.queue_depth = Gauge("farm_queue_depth", "Renders queued for the model.", ["model"], registry=r)
        self.lost = Counter("farm_attempts_lost_total",
                            "Attempts the farm lost (replica or node gone); requeued, their cost absorbed.",
                            ["model", "device_kind", "cause"], registry=r)
        self.budget = Gauge("farm_budget_dollars", "The tenant's budget for its current period.", ["tenant"],
                            registry=r)
        self.store_errors = Counter("farm_store_errors_total",
                                    "Job store calls of the scheduler that failed (and were retried).",
                                    ["operation"], registry=r)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)  # 0 until one fails: a rate needs the series

    def serve_http(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def attempt_started(self, claimed: ClaimedRender, queue_wait_s: float | None) -> None:
        self.started.labels(claimed.spec.model).inc()
        if queue_wait_s is not None:
            self.queue_wait.labels(claimed.spec.model).observe(max(queue_wait_s, 0.0))

    def step_finished(self, model: str, device_kind: str, seconds: float) -> None:
        self.step.labels(model, device_kind).observe(seconds)

    def render_finished(self, tenant: str, model: str, state: str, duration_s: float | None, frames: int,
                        charges: list[Charge]) -> None:
        self.finished.labels(model, state).inc()
        if duration_s is not None:
            self.duration.labels(model, state).observe(duration_s)
        if frames:
            self.frames.labels(model).inc(frames)
        self.charged(tenant, model, charges)

    def charged(self, tenant: str, model: str, charges: list[Charge]) -> None:
        """Charges written to the ledger (at a final state, or a preemption or retry before one)."""
        for charge in charges:
            self.cost.labels(tenant, model, charge.device_kind, charge.phase).inc(charge.dollars)
            self.device_seconds.labels(tenant, model, charge.device_kind, charge.phase).inc(charge.device_seconds)

    def attempt_absorbed(self, model: str, charges: list[Charge]) -> None:
        for charge in charges:
            self.absorbed.labels(model, charge.device_kind).inc(charge.dollars)

    def budget_left(self, tenant: str, dollars: float, budget_dollars: float | None = None) -> None:
        self.budget_remaining.labels(tenant).set(dollars)
        if budget_dollars is not None:
            self.budget.labels(tenant).set(budget_dollars)

    def queued(self, model: str, count: int) -> None:
        self.queue_depth.labels(model).set(count)

    def attempt_lost(self, model: str, device_kind: str, cause: str) -> None:
        self.lost.labels(model, device_kind, cause).inc()

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    def running(self, model: str, count: int) -> None:
        self.running_renders.labels(model).set(count)

    def pool_sized(self, model: str, device_kind: str, replicas: int, wanted: int, backlog_s: float,
                   cold_start_s: float) -> None:
        self.lost.labels(model, device_kind, "replica")  # 0 until one is lost: a rate needs the series
        self.pool_replicas.labels(model, device_kind).set(replicas)
        self.pool_wanted.labels(model, device_kind).set(wanted)
        self.pool_backlog.labels(model, device_kind).set(backlog_s)
        self.pool_cold_start.labels(model, device_kind).set(cold_start_s)

    def preempted(self, model: str, device_kind: str) -> None:
        self.preemptions.labels(model, device_kind).inc()

    def node_quarantined(self) -> None:
        self.quarantines.inc()
