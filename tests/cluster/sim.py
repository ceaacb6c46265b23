"""A simulated multi-node farm on one machine: `ray.cluster_utils.Cluster` with a
head node for the scheduler and nodes that advertise one logical GPU of a kind
(`accelerator_type:H100`, ...); the engines run the tiny models on the CPU there.
The store is a fresh schema of the PostgreSQL server, as in a real cluster.
The multi-node tests and `benchmarks/scale.py` use it."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy

from farm.config import FarmConfig, ModelConfig, PoolConfig, Task
from farm.domain.spec import RenderSpec
from farm.jobs.validation import resolve_spec
from farm.jobs.records import RenderRecord
from farm.jobs.store import JobStore
from farm.serve.flags import HOLDS_ENV

POSTGRES_URL = os.environ.get("FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
APP = "farm-cluster"


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def tiny_ltx(models_dir: Path, name: str, pools: list[PoolConfig]) -> ModelConfig:
    from farm.engines.tiny import tiny_model_configs

    ltx = next(m for m in tiny_model_configs(models_dir) if m.family.value == "ltx-video")
    return ltx.model_copy(update={"name": name, "device": "cpu", "dtype": "float32", "cpu_threads": 1,
                                  "pools": pools})


class ClusterFarm:
    """The cluster, the farm's config and store, and its GPU nodes by name."""

    def __init__(self, cluster, config: FarmConfig, store: JobStore):
        self.cluster, self.config, self.store = cluster, config, store
        self.nodes: dict[str, object] = {}
        self.models = {m.name: m for m in config.served_models()}

    def add_gpu_node(self, name: str, kind: str, num_cpus: int = 2, env: dict[str, str] | None = None):
        """env: variables of the node's processes (e.g. a chaos drill's fault)."""
        node = self.cluster.add_node(num_cpus=num_cpus, num_gpus=1, resources={f"accelerator_type:{kind}": 1},
                                     env_vars=env)
        self.nodes[name] = node
        return node

    def remove_node(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    def submit(self, tenant_id: str, model: str, **fields) -> RenderRecord:
        values = dict(model=model, task=Task.TEXT_TO_VIDEO, prompt="a lighthouse at dusk", width=128, height=128,
                      num_frames=17, num_inference_steps=12, seed=7)
        values.update(fields)
        request = RenderSpec(**values)
        record, _ = self.store.submit(tenant_id, request, resolve_spec(request, self.models))
        return record

    def scheduler_status(self) -> dict:
        """What the scheduler holds and wants (for failure messages)."""
        from ray import serve

        try:
            return serve.get_deployment_handle("scheduler", APP).status.remote().result(timeout_s=10)
        except Exception as error:  # the report is best effort
            return {"error": repr(error)}

    def running_replicas(self, model: str, device_kind: str) -> int:
        from ray import serve

        app = serve.status().applications.get(APP)
        deployment = app.deployments.get(f"engine-{model}-{device_kind.lower()}") if app else None
        return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0

    def cut_store_connections(self) -> int:
        """What a PostgreSQL restart does to the farm: every one of its connections dies."""
        from tests.conftest import terminate_connections

        return terminate_connections(self.config.store_url.split("application_name=")[1])


@contextlib.contextmanager
def cluster_farm(models: list[ModelConfig], gpu_nodes: dict[str, str], scheduler: dict | None = None,
                 head_cpus: int = 4, node_env: dict[str, dict[str, str]] | None = None) -> Iterator[ClusterFarm]:
    """Starts the cluster (head + `gpu_nodes` name -> kind, `node_env` name -> variables
    of that node), deploys the farm, and tears everything down (the database schema
    too) on exit."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from farm.cli.embedded import QUIET_RAY_ENV
    from farm.serve import build_app

    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)
    home = Path(tempfile.mkdtemp(prefix="farm-cl-", dir="/tmp"))
    schema = f"farm_cluster_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    # Tagged, so that exactly the farm's database connections can be cut.
    store_url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}&application_name={schema}"
    config = FarmConfig(
        home=home, models=models, store={"url": store_url}, artifacts={"url": str(home / "artifacts")},
        scheduler={"heartbeat_interval_s": 0.5, "lease_seconds": 8, "metrics_port": 0, "autoscale_interval_s": 0.5,
                   **(scheduler or {})},
        ray={"app_name": APP},
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    store = JobStore(config.store_url)
    farm = ClusterFarm(cluster, config, store)
    try:
        for name, kind in gpu_nodes.items():
            farm.add_gpu_node(name, kind, env=(node_env or {}).get(name))
        # HOLDS_ENV: the replicas take the tests' holds (tests/holds.py).
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"FARM_HOME": str(home), HOLDS_ENV: "1"}})
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        serve.run(build_app(config), name=APP, route_prefix=None, blocking=False)
        kinds = {(m.name, p.device_kind) for m in models for p in m.pools or ()}
        wait_for(lambda: {(p.model, p.device_kind) for p in store.pools()} == kinds, timeout=300,
                 what="the pools to be published")
        yield farm
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        store.close()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
