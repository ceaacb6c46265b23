"""Holding a render at a step, or a post-processing chunk, until the test lets it go
(`farm.serve.flags`' drills): what makes a render "long enough" to cancel, preempt,
or kill a process under, whatever the machine's speed. The farm's replicas take holds
because the test farms start them with FARM_CHAOS_HOLDS=1; this process is a Ray driver
of that farm, so it reaches the same key-value store."""

from __future__ import annotations

import time

from farm.serve import flags

# Start-up waits keep generous bounds: a hold is taken once a replica starts the render.
HOLD_TIMEOUT_S = 300.0


def wait_held(kind: str = "render", timeout: float = HOLD_TIMEOUT_S) -> tuple[str, dict]:
    """The holder (a render id, or `chunk/<pid>`) and its record, once one of `kind`
    ("render" or "chunk") is waiting at its hold."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for holder, record in flags.held().items():
            if record["waiting"] and holder.startswith("chunk/") == (kind == "chunk"):
                return holder, record
        time.sleep(0.05)
    raise TimeoutError(f"no {kind} took its hold within {timeout} s")
