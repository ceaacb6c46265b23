"""One real farm for the whole integration session: a local Ray cluster with the
Serve application (started in this process, once: Ray takes ~10 s to start on two
cores) and the gateway as a child process on loopback, so that tests can kill and
restart it. State lives in a fresh FARM_HOME."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from farm.client import FarmClient
from farm.config import FarmConfig
from farm.serve.flags import HOLDS_ENV, clear_holds
from tests.otlp import TraceReceiver

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """`farm gateway` in a child process, as an operator would run it."""

    def __init__(self, config_path: Path, config: FarmConfig):
        self.config_path, self.config = config_path, config
        self.target = f"127.0.0.1:{config.gateway.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        ready = self.config.home / "gateway.ready"
        ready.unlink(missing_ok=True)
        log = open(self.config.logs_dir / "gateway.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "farm", "gateway", "--config", str(self.config_path),
                                         "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gateway exited; see {self.config.logs_dir / 'gateway.log'}"
            if ready.exists():
                with FarmClient(self.target) as probe:
                    if probe.is_serving():
                        return
            time.sleep(0.2)
        raise TimeoutError("gateway did not become SERVING")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def trace_receiver() -> TraceReceiver:
    """Where every process of the integration farm exports its spans."""
    receiver = TraceReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def farm_config(trace_receiver) -> tuple[FarmConfig, Path]:
    # Short path: Ray's unix sockets live under it.
    home = Path(tempfile.mkdtemp(prefix="farm-it-", dir="/tmp"))
    values = {
        "home": str(home),
        "gateway": {"port": free_port(), "metrics_port": free_port()},
        # One node (quarantine off): quarantining it would stop the whole farm, and the
        # session's tests fail renders on it (killed replicas, failing specs) on purpose.
        # The cluster suite tests quarantine.
        "scheduler": {"metrics_port": free_port(), "heartbeat_interval_s": 0.5, "lease_seconds": 10,
                      "quarantine_after_failures": 0},
        "ray": {"num_cpus": 16, "app_name": "farm-test"},
        # Small chunks, so that even tiny test clips spread over both post-processing replicas.
        "postproc": {"replicas": 2, "chunk_frames": 8},
        # Tracing on, as an operator with a collector runs it: every test's renders are traced.
        "tracing": {"otlp_endpoint": trace_receiver.endpoint, "flush_interval_s": 0.2},
    }
    # A LoRA adapter for the tiny LTX-Video, with a surcharge (tests/integration/test_families.py).
    values["adapters"] = [{"name": "watercolor", "source": str(ltx_adapter(home)), "families": ["ltx-video"],
                           "surcharge": 0.5}]
    config_path = home / "farm.yaml"
    config_path.write_text(yaml.safe_dump(values))
    os.environ["FARM_HOME"] = str(home)
    # The replicas take the tests' holds (tests/holds.py); Ray's workers inherit this.
    os.environ[HOLDS_ENV] = "1"
    return FarmConfig(**values), config_path


def ltx_adapter(home: Path) -> Path:
    """A random LoRA adapter of the tiny LTX-Video's transformer, in diffusers' format. The
    tiny model is written first, under the farm's models directory, where the farm finds it."""
    from diffusers import LTXPipeline

    from farm.engines.tiny import make_tiny_models
    from tests.unit.test_adapters import _save_adapter

    (model_dir,) = make_tiny_models(home / "models", families=["ltx-video"])
    transformer = LTXPipeline.from_pretrained(model_dir).transformer
    return Path(_save_adapter(LTXPipeline, transformer, home / "adapters" / "watercolor", seed=1, rank=4,
                              alpha=8).source)


@pytest.fixture(scope="session")
def inference_plane(farm_config):
    from farm.cli.embedded import (
        prepare_home,
        start_inference_plane,
        stop_inference_plane,
    )

    config, _ = farm_config
    prepare_home(config)
    start_inference_plane(config)
    yield config
    stop_inference_plane(config)


@pytest.fixture(scope="session")
def gateway(farm_config, inference_plane) -> GatewayProcess:
    config, config_path = farm_config
    process = GatewayProcess(config_path, config)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api_key(farm_config, gateway) -> str:
    config, _ = farm_config
    return (config.keys_dir / "default.key").read_text().strip()


@pytest.fixture
def client(gateway, api_key):
    with FarmClient(gateway.target, api_key) as c:
        yield c


@pytest.fixture
def holds(inference_plane):
    """For a test that holds renders or chunks: whatever it left held is let go after it."""
    yield
    clear_holds()
