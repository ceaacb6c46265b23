"""`farm serve` stops on SIGTERM as Kubernetes asks of a pod (30 s): the gateway stops
taking calls and finishes those in flight, the scheduler hands every render it holds back
to the queue (a render mid-denoising checkpoints first: tests/cluster and
tests/unit/test_scheduler.py), and the process exits 0. Its own farm, in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from farm.client import FarmClient
from farm.domain.states import RenderState
from farm.jobs.store import JobStore
from tests.integration.conftest import STARTUP_TIMEOUT_S, free_port
from tests.integration.test_render_path import small_spec

KUBERNETES_GRACE_S = 30

pytestmark = pytest.mark.timeout(STARTUP_TIMEOUT_S + 120)


def test_farm_serve_stops_within_the_grace_period_and_loses_no_render():
    home = Path(tempfile.mkdtemp(prefix="farm-stop-", dir="/tmp"))
    config = {"home": str(home), "ray": {"app_name": "farm-stop"},
              "gateway": {"port": free_port(), "metrics_port": free_port()},
              "scheduler": {"metrics_port": free_port()}, "postproc": {"replicas": 1}}
    (home / "farm.yaml").write_text(yaml.safe_dump(config))
    ready = home / "ready"
    # A farm of its own: not the session farm's home (FARM_* settings win over the file),
    # drill holds (FARM_CHAOS_HOLDS) or Ray cluster.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("FARM_") and name != "RAY_ADDRESS"}
    with open(home / "serve.log", "wb") as log:
        farm = subprocess.Popen([sys.executable, "-m", "farm", "serve", "--config", str(home / "farm.yaml"),
                                 "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.exists():
            assert farm.poll() is None and time.monotonic() < deadline, (home / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        key = (home / "keys" / "default.key").read_text().strip()
        with FarmClient(f"127.0.0.1:{config['gateway']['port']}", key) as client:
            renders = [client.submit(small_spec(seed=seed)).id for seed in (11, 12, 13)]
        stopping = time.monotonic()
        farm.send_signal(signal.SIGTERM)
        code = farm.wait(KUBERNETES_GRACE_S)
        took = time.monotonic() - stopping
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
    assert code == 0, (home / "serve.log").read_text()[-3000:]
    assert took < KUBERNETES_GRACE_S
    # Each render finished, or is back in the queue with no lease held for it: none is
    # left RUNNING for a dead scheduler, none failed for the stop.
    store = JobStore(f"sqlite:///{home / 'farm.db'}", migrate=False)
    try:
        for render_id in renders:
            record = store.get(None, render_id)
            assert record.state in (RenderState.SUCCEEDED, RenderState.QUEUED), record
    finally:
        store.close()
