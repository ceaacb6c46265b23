"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): a head node
for the scheduler and nodes that advertise logical GPUs of a kind
(`accelerator_type:H100`, `accelerator_type:A100`); the engines run on the CPU there.
The farm on it uses PostgreSQL as its store, as a real cluster would.

Ray connects a process to one cluster, so these tests run in their own pytest
process (`make test` runs tests/cluster after the rest)."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy

from farm.config import FarmConfig, PoolConfig
from farm.jobs.store import JobStore
from tests.conftest import POSTGRES_URL, postgres_schema_url

APP = "farm-cluster"
TIMEOUT_S = int(os.environ.get("FARM_CLUSTER_TIMEOUT_S", "240"))


def wait_for(predicate, timeout: float = TIMEOUT_S, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class ClusterFarm:
    """The cluster, the farm's config and store, and its GPU nodes by name."""

    def __init__(self, cluster, config: FarmConfig, store: JobStore, models_dir: Path):
        self.cluster, self.config, self.store, self.models_dir = cluster, config, store, models_dir
        self.nodes: dict[str, object] = {}
        self.model = config.served_models()[0]

    def add_gpu_node(self, name: str, kind: str):
        node = self.cluster.add_node(num_cpus=2, num_gpus=1, resources={f"accelerator_type:{kind}": 1})
        self.nodes[name] = node
        return node

    def remove_node(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    def scheduler_status(self) -> dict:
        """What the scheduler holds and wants, for failure messages."""
        from ray import serve

        try:
            return serve.get_deployment_handle("scheduler", APP).status.remote().result(timeout_s=10)
        except Exception as error:  # the report is best effort
            return {"error": repr(error)}

    def running_replicas(self, device_kind: str) -> int:
        from ray import serve

        app = serve.status().applications.get(APP)
        name = f"engine-{self.model.name}-{device_kind.lower()}"
        deployment = app.deployments.get(name) if app else None
        return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0


@pytest.fixture(scope="session")
def cluster_farm(models_dir):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from farm.embedded import QUIET_RAY_ENV
    from farm.engines.tiny import tiny_model_configs
    from farm.serve import build_app

    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)
    home = Path(tempfile.mkdtemp(prefix="farm-cl-", dir="/tmp"))
    schema = f"farm_cluster_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    # Tagged, so a test can cut exactly the farm's database connections.
    store_url = f"{postgres_schema_url(schema)}&application_name={schema}"

    ltx = next(m for m in tiny_model_configs(models_dir) if m.family.value == "ltx-video")
    pools = [
        PoolConfig(device_kind="H100", num_gpus=1, num_cpus=1, min_replicas=0, max_replicas=2,
                   backlog_target_s=2.0, downscale_delay_s=3.0, relative_speed=2.0),
        PoolConfig(device_kind="A100", num_gpus=1, num_cpus=1, min_replicas=1, max_replicas=1),
    ]
    model = ltx.model_copy(update={"name": "ltx", "device": "cpu", "dtype": "float32", "cpu_threads": 1,
                                   "pools": pools})
    config = FarmConfig(
        home=home, models=[model], store={"url": store_url}, artifacts={"url": str(home / "artifacts")},
        scheduler={"heartbeat_interval_s": 0.5, "lease_seconds": 8, "metrics_port": 0, "autoscale_interval_s": 0.5},
        ray={"app_name": APP},
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    store = JobStore(config.store_url)
    farm = ClusterFarm(cluster, config, store, models_dir)
    farm.add_gpu_node("h100-a", "H100")
    farm.add_gpu_node("h100-b", "H100")
    farm.add_gpu_node("a100-a", "A100")
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"FARM_HOME": str(home)}})
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
    serve.run(build_app(config), name=APP, route_prefix=None, blocking=False)
    wait_for(lambda: {p.device_kind for p in store.pools()} == {"H100", "A100"}, what="pools to be published")
    try:
        yield farm
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        store.close()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(scope="session")
def tenant(cluster_farm):
    record, _ = cluster_farm.store.create_tenant(f"t-{secrets.token_hex(3)}")
    return record
