"""The multi-node farm for these tests (see `tests.cluster.sim`). Ray connects a
process to one cluster, so these tests run in their own pytest process (`make test`
runs tests/cluster after the rest)."""

from __future__ import annotations

import os
import secrets

import pytest

from farm.config import PoolConfig
from farm.serve.flags import clear_holds
from tests.cluster.sim import cluster_farm as start_cluster_farm
from tests.cluster.sim import tiny_ltx

TIMEOUT_S = int(os.environ.get("FARM_CLUSTER_TIMEOUT_S", "240"))


@pytest.fixture(scope="session")
def cluster_farm(models_dir):
    pools = [
        # Scales with its backlog, down to zero when idle.
        PoolConfig(device_kind="H100", num_gpus=1, num_cpus=1, min_replicas=0, max_replicas=2,
                   backlog_target_s=2.0, downscale_delay_s=3.0, relative_speed=2.0),
        PoolConfig(device_kind="A100", num_gpus=1, num_cpus=1, min_replicas=1, max_replicas=1),
    ]
    # A model of its own for the chaos drill, so no other test's renders meet the node
    # that fails every render: one replica on each of its two L40S nodes.
    chaos_pools = [PoolConfig(device_kind="L40S", num_gpus=1, num_cpus=1, min_replicas=2, max_replicas=2)]
    nodes = {"h100-a": "H100", "h100-b": "H100", "a100-a": "A100", "l40s-good": "L40S", "l40s-flaky": "L40S"}
    flaky = {"l40s-flaky": {"FARM_CHAOS_FAIL_AT_STEP": "2"}}
    models = [tiny_ltx(models_dir, "ltx", pools), tiny_ltx(models_dir, "ltx-chaos", chaos_pools)]
    with start_cluster_farm(models, nodes, node_env=flaky,
                            scheduler={"quarantine_after_failures": 2, "quarantine_s": 600}) as farm:
        yield farm


@pytest.fixture(scope="session")
def tenant(cluster_farm):
    record, _ = cluster_farm.store.create_tenant(f"t-{secrets.token_hex(3)}")
    return record


@pytest.fixture
def holds(cluster_farm):
    """For a test that holds renders: whatever it left held is let go after it."""
    yield
    clear_holds()
