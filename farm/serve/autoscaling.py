"""Queue-driven autoscaling of engine pools through Ray Serve's custom policy hook.

The scheduler knows the backlog (device-seconds of queued work per pool, from the
cost model) and the replicas busy with renders; Serve knows only ongoing requests,
which for a render farm say nothing about the queue in the store. So the scheduler
computes each pool's wanted replica count (`farm.jobs.scheduler.autoscale`) and
publishes it in Ray's internal KV; `BacklogPolicy`, run by the Serve controller every
control loop, hands it to Serve, which applies the pool's bounds and its up/down-scale
delays. Serve drains a replica it removes (its renders finish first, up to the pool's
drain timeout), and the wanted count never drops below the busy replicas.
"""

from __future__ import annotations

import json
import time
from typing import Any

NAMESPACE = "farm"
# A report older than this means the scheduler is gone: hold the current size
# rather than scale on stale numbers.
STALE_AFTER_S = 30.0


def wanted_key(app: str, deployment: str) -> bytes:
    return f"wanted/{app}/{deployment}".encode()


def publish_wanted(app: str, deployment: str, replicas: int) -> None:
    from ray.experimental import internal_kv

    value = json.dumps({"replicas": int(replicas), "at": time.time()}).encode()
    internal_kv._internal_kv_put(wanted_key(app, deployment), value, overwrite=True, namespace=NAMESPACE)


def read_wanted(app: str, deployment: str) -> tuple[int, float] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(wanted_key(app, deployment), namespace=NAMESPACE)
    if not raw:
        return None
    data = json.loads(raw)
    return int(data["replicas"]), float(data["at"])


class BacklogPolicy:
    """Serve custom autoscaling policy (`AutoscalingPolicy(policy_function=BacklogPolicy,
    policy_kwargs=...)`): the replica count the farm's scheduler asked for."""

    def __init__(self, app: str, deployment: str):
        self.app, self.deployment = app, deployment

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        state = dict(ctx.policy_state or {})
        try:
            report = read_wanted(self.app, self.deployment)
        except Exception:  # the GCS briefly unreachable: keep the current size
            report = None
        if report is None or time.time() - report[1] > STALE_AFTER_S:
            return ctx.target_num_replicas, state
        return report[0], state
