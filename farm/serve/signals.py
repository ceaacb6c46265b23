"""Signals from the scheduler to the engine replica that runs a render.

A Serve handle routes each call to some replica, so the scheduler cannot call the
replica that holds a given render. It raises a flag in Ray's internal key-value
store instead (one small GCS write); the engine looks for the flag at its step
boundaries (a GCS read of microseconds next to a denoising step) and answers on
the render's own stream. Only `farm.serve` touches Ray's KV, through here.
"""

from __future__ import annotations

NAMESPACE = "farm"


def _preempt_key(render_id: str, attempt: int) -> bytes:
    return f"preempt/{render_id}/{attempt}".encode()


def request_preemption(render_id: str, attempt: int) -> None:
    """Asks the engine running this attempt to checkpoint at its next step and stop."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_preempt_key(render_id, attempt), b"1", overwrite=True, namespace=NAMESPACE)


def preemption_requested(render_id: str, attempt: int) -> bool:
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_exists(_preempt_key(render_id, attempt), namespace=NAMESPACE))


def clear_preemption(render_id: str, attempt: int) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_preempt_key(render_id, attempt), namespace=NAMESPACE)
