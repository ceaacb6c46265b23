"""The Helm chart (helm/farm) and the plain manifests rendered from it (deploy/kubernetes),
checked with the real helm (`make ops-tools` puts it in .tools/helm/bin; `make test` runs
that first), Kubernetes' own object schemas (kubernetes-validate, Kubernetes 1.33), the
KubeRay CRD's schema (../shared/k8s/kuberay-crds) and Ray Serve's config schema, and farm's
own `build_app` on the rendered Serve args. No API server, no KubeRay operator, no Ray
cluster: what needs them is said in the README's "Deploying on Kubernetes"."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.ops.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "farm"
sys.path.insert(0, str(CHART / "schema"))
import generate  # noqa: E402  (helm/farm/schema/generate.py)

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERAY_CRDS = Path(os.environ.get("FARM_KUBERAY_CRDS", REPO_ROOT.parent / "shared" / "k8s" / "kuberay-crds"))
# Prometheus Operator objects are checked by this script against the schemas of
# @kubernetes-models/prometheus-operator (both installed by `make ops-tools`).
MONITORING_VALIDATOR = generate.HELM.parents[1] / "validate-monitoring.mjs"


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> list[str]:
    if not generate.HELM.exists():
        pytest.fail(f"{generate.HELM} is missing: `make ops-tools` installs it (`make test` does)")
    return [str(generate.HELM)]


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict[str, str]:
    return generate.helm_env(str(tmp_path_factory.mktemp("helm-home")))


def run_helm(helm, helm_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*helm, *args], capture_output=True, text=True, env=helm_env, timeout=60)


def template(helm, helm_env, *args: str) -> subprocess.CompletedProcess:
    return run_helm(helm, helm_env, "template", "farm", str(CHART), "--namespace", "farm",
                    "--kube-version", generate.KUBERNETES_VERSION, *args)


@pytest.fixture(scope="session")
def rendered(helm, helm_env) -> dict[str, list[dict]]:
    """Every CI values file's render: {file name: [objects]}."""
    out = {}
    for values in CI_VALUES:
        result = template(helm, helm_env, "-f", str(values))
        assert result.returncode == 0, f"{values.name}: {result.stderr}"
        out[values.name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [doc for doc in objects(docs, kind)
             if component is None or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"{len(found)} {kind} objects ({component})"
    return found[0]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


@pytest.fixture
def farm_env(monkeypatch):
    """FarmConfig reads FARM_* variables first: the rendered config alone must decide."""
    for name in list(os.environ):
        if name.startswith("FARM_"):
            monkeypatch.delenv(name)


# --- helm lint, and the values schema ----------------------------------------------------------

@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_passes_helm_lint_strict(helm, helm_env, values):
    result = run_helm(helm, helm_env, "lint", "--strict", str(CHART), "-f", str(values),
                      "--kube-version", generate.KUBERNETES_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_values_cover_the_deployments_the_chart_promises(rendered):
    """Defaults, two GPU kinds, external PostgreSQL and S3, TLS on, the quick-start database."""
    assert {"defaults-values.yaml", "two-gpu-kinds-values.yaml", "external-postgresql-s3-values.yaml",
            "tls-values.yaml", "quickstart-postgresql-values.yaml"} <= set(rendered)
    groups = [g["groupName"] for g in one(rendered["two-gpu-kinds-values.yaml"], "RayService")
              ["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert {"gpu-h100", "gpu-a100"} <= set(groups)


WRONG_VALUES = {
    "a string for gateway.replicas": ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
    "an unknown key in the farm config": ({"config": {"schedular": {"lease_seconds": 10}}}, "schedular"),
    "an unknown key of a farm config section": ({"config": {"gateway": {"prot": 1}}}, "prot"),
    "an out-of-range farm setting": ({"config": {"scheduler": {"max_attempts": 0}}}, "max_attempts"),
    "a negative GPU count of a pool": (
        {"config": {"models": [{"name": "m", "family": "ltx-video", "sources": {"text-to-video": "x"},
                                "pools": [{"device_kind": "H100", "num_gpus": -1}]}]}}, "num_gpus"),
    "an unknown model family": (
        {"config": {"models": [{"name": "m", "family": "sora", "sources": {"text-to-video": "x"}}]}}, "family"),
    "a negative GPU count of a worker group": ({"ray": {"gpuWorkers": {"H100": {"gpusPerPod": -1}}}}, "gpusPerPod"),
    "a worker group without its GPU count": ({"ray": {"gpuWorkers": {"A100": {"nodeSelector": {}}}}}, "gpusPerPod"),
    "a misspelt chart key": ({"gateway": {"replica": 2}}, "replica"),
    "an unknown Service type": ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
    "a bad scrape interval": ({"monitoring": {"serviceMonitor": {"interval": "soon"}}}, "interval"),
}


@pytest.mark.parametrize("case", WRONG_VALUES, ids=list(WRONG_VALUES))
def test_values_schema_refuses_wrong_values(helm, helm_env, tmp_path, case):
    values, where = WRONG_VALUES[case]
    path = tmp_path / "wrong-values.yaml"
    path.write_text(yaml.safe_dump(values))
    for result in (template(helm, helm_env, "-f", str(path)),
                   run_helm(helm, helm_env, "lint", "--strict", str(CHART), "-f", str(path))):
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "values don't meet the specifications of the schema" in output or "at '/" in output, output
        assert where in output, output


TEMPLATE_REFUSALS = {
    "a GPU pool of a kind without a worker group": (
        {"config": {"models": [{"name": "m", "family": "ltx-video", "sources": {"text-to-video": "x"},
                                "pools": [{"device_kind": "L40S", "num_gpus": 1}]}]}},
        'ray.gpuWorkers has no "L40S" group'),
    "a replica needing more GPUs than a pod has": (
        {"config": {"models": [{"name": "m", "family": "ltx-video", "sources": {"text-to-video": "x"},
                                "pools": [{"device_kind": "H100", "num_gpus": 2}]}]}},
        "could never be placed"),
    "TLS without its Secret": ({"gateway": {"tls": {"enabled": True}}}, "gateway.tls.secretName"),
    "plaintext refused and no TLS": ({"gateway": {"allowPlaintext": False}}, "refuse to serve plaintext"),
    "no store at all": ({"store": {"existingSecret": ""}}, "must name the job store"),
}


@pytest.mark.parametrize("case", TEMPLATE_REFUSALS, ids=list(TEMPLATE_REFUSALS))
def test_chart_refuses_deployments_that_cannot_work(helm, helm_env, tmp_path, case):
    values, message = TEMPLATE_REFUSALS[case]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = template(helm, helm_env, "-f", str(path))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_values_schema_is_current():
    assert (CHART / "values.schema.json").read_text() == generate.render_schema(), \
        "values.schema.json is stale: run `make chart` (helm/farm/schema/generate.py)"


def test_values_schema_takes_farm_config_schema_whole():
    schema = json.loads((CHART / "values.schema.json").read_text())
    from farm.config import FarmConfig

    farm = FarmConfig.model_json_schema()
    assert schema["$defs"] == farm.pop("$defs")
    config = dict(schema["properties"]["config"])
    config.pop("description")
    assert config == {k: v for k, v in farm.items() if k != "description"}
    assert config["additionalProperties"] is False


def test_default_values_meet_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def _keys_needing_comments(values: dict, schema: dict, path: tuple[str, ...] = ()):
    """Every key of values.yaml the chart defines (not FarmConfig's, not Kubernetes structures)."""
    for key, value in values.items():
        where = path + (key,)
        yield where
        if where == ("config",) or not isinstance(value, dict):
            continue
        if "properties" in schema.get("properties", {}).get(key, {}):
            yield from _keys_needing_comments(value, schema["properties"][key], where)
        elif "properties" in schema.get("properties", {}).get(key, {}).get("additionalProperties", {}):
            # A map of chart objects (ray.gpuWorkers): each entry, and its keys.
            entry = schema["properties"][key]["additionalProperties"]
            for name, item in value.items():
                yield where + (name,)
                yield from _keys_needing_comments(item, entry, where + (name,))


def test_every_value_has_a_comment():
    text = (CHART / "values.yaml").read_text()
    comments = generate.values_comments(text)
    missing = [".".join(path) for path in _keys_needing_comments(yaml.safe_load(text), generate.chart_schema())
               if path not in comments]
    assert not missing, f"values.yaml keys without a comment above them: {missing}"


def test_keys_other_templates_use_have_their_defaults():
    """The monitoring and batch templates (and whoever reads the chart's values) rely on these."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    monitoring, batch = values["monitoring"], values["batch"]
    assert monitoring["serviceMonitor"]["enabled"] is False
    assert monitoring["prometheusRule"] == {"enabled": False, "labels": {}}
    assert monitoring["dashboards"] == {"enabled": True, "labels": {"grafana_dashboard": "1"}}
    assert batch == {"enabled": False, "manifest": "", "completions": 1, "parallelism": 1,
                     "backoffLimitPerIndex": 3, "jobId": "", "resultsUrl": "", "apiKeySecret": "", "image": {}}


# --- every rendered object against its schema ----------------------------------------------------

def _strict(schema):
    """A CRD schema as the API server applies it, with pruning made an error: an object that
    names its properties accepts no other (unless it preserves unknown fields), so a
    misspelt field fails here instead of vanishing at apply time."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    path = KUBERAY_CRDS / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.fail(f"KubeRay's CRDs are not at {KUBERAY_CRDS} (set FARM_KUBERAY_CRDS to where they are)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB of YAML
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _pod_templates(rayservice: dict):
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def validate_monitoring(objects: list[dict]) -> list[dict]:
    """[{kind, name, error}] for Prometheus Operator objects, from their published schemas."""
    result = subprocess.run(["node", str(MONITORING_VALIDATOR)], input=json.dumps(objects),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_rendered_object_validates(rendered, rayservice_schema, values):
    docs = rendered[values.name]
    monitoring = []
    for doc in docs:
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "RayService":
            assert doc["apiVersion"] == "ray.io/v1"
            errors = sorted(jsonschema.Draft4Validator(rayservice_schema).iter_errors(doc), key=str)
            assert not errors, f"{name}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
            # The pod templates inside it are core PodTemplateSpecs: as strictly as any Pod.
            for group, pod in _pod_templates(doc):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", **pod},
                                             generate.KUBERNETES_VERSION, strict=True)
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            monitoring.append(doc)
        else:
            try:
                kubernetes_validate.validate(doc, generate.KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {error.message} at {'/'.join(map(str, error.path))}")
    if monitoring:
        invalid = [r for r in validate_monitoring(monitoring) if r["error"]]
        assert not invalid, invalid


def test_monitoring_objects_are_rendered_and_checked(rendered):
    """The TLS values turn the Prometheus Operator objects on: they are there to be checked,
    and the check refuses a broken one."""
    docs = [d for d in rendered["tls-values.yaml"] if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {"ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in docs}
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "soon"
    missing_selector = copy.deepcopy(monitor)
    del missing_selector["spec"]["selector"]
    [wrong_interval, no_selector] = validate_monitoring([monitor, missing_selector])
    assert wrong_interval["error"] and "interval" in wrong_interval["error"]
    assert no_selector["error"] and "selector" in no_selector["error"]


def test_kubernetes_validate_refuses_a_broken_object(rendered):
    """The validation above can fail: a misspelt field of a Deployment is refused."""
    deployment = copy.deepcopy(one(rendered["defaults-values.yaml"], "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, generate.KUBERNETES_VERSION, strict=True)


def test_rayservice_schema_refuses_a_broken_rayservice(rendered, rayservice_schema):
    """...and so is a RayService with a misspelt field or a wrong type."""
    rayservice = one(rendered["defaults-values.yaml"], "RayService")
    validator = jsonschema.Draft4Validator(rayservice_schema)
    misspelt = copy.deepcopy(rayservice)
    misspelt["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    for broken in (misspelt, wrong_type):
        assert list(validator.iter_errors(broken))


# --- the inference plane ----------------------------------------------------------------------------

def _worker_groups(docs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _start_resources(params: dict) -> dict[str, float]:
    """rayStartParams' `resources`, '"{...}"' as `ray start --resources` takes it."""
    text = params.get("resources")
    return json.loads(json.loads(text)) if text else {}


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_ray_group_bounds_match_the_pools(rendered, farm_env, values):
    """Each GPU worker group's pod bounds are its pools' replica bounds in GPUs over GPUs a pod,
    rounded up, computed here from FarmConfig itself; every GPU pool has its group; KubeRay's
    own rules (unique names, min <= replicas <= max) hold."""
    from farm.config import FarmConfig

    docs = rendered[values.name]
    config = FarmConfig(**serve_config(docs)["applications"][0]["args"])
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = {}
    for group in groups:
        assert 0 <= group["minReplicas"] == group["replicas"] <= group["maxReplicas"]
        types = [r.removeprefix("accelerator_type:") for r in _start_resources(group["rayStartParams"])
                 if r.startswith("accelerator_type:")]
        if types:
            [kind] = types
            gpu_groups[kind] = group
    pools = [p for m in config.served_models() for p in m.resolved_pools() if p.num_gpus]
    assert {p.ray_accelerator_type for p in pools} <= set(gpu_groups)
    for kind, group in gpu_groups.items():
        per_pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        of_kind = [p for p in pools if p.ray_accelerator_type == kind]
        assert group["minReplicas"] == math.ceil(sum(p.num_gpus * p.min_replicas for p in of_kind) / per_pod)
        assert group["maxReplicas"] == math.ceil(sum(p.num_gpus * p.max_replicas for p in of_kind) / per_pod)


def test_two_gpu_kinds_bounds_by_hand(rendered):
    """The same, with the numbers written out: H100 pools need 2x1 + 1x2 = 4 GPUs at least and
    12x1 + 4x2 = 20 at most, 8 a pod; A100 pools 0 and 6, 4 a pod; A100-80G 1 and 3, 1 a pod."""
    groups = _worker_groups(rendered["two-gpu-kinds-values.yaml"])
    bounds = {name: (g["minReplicas"], g["maxReplicas"]) for name, g in groups.items()}
    assert bounds == {"cpu": (1, 4), "gpu-h100": (1, 3), "gpu-a100": (0, 2), "gpu-a100-80g": (1, 3)}


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_serve_config_builds_farms_application(rendered, farm_env, values):
    """serveConfigV2 is a valid Serve config, its import_path is farm's builder, and
    build_app(args) builds the application (no Ray cluster: building binds deployments only).
    Every engine deployment asks for an accelerator type some worker group offers, in a GPU
    count one pod has, and the scheduler for the resource only the head offers."""
    from ray.serve._private.build_app import build_app as build_deployments  # lists an Application's deployments
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    docs = rendered[values.name]
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    [application] = config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    from farm.serve import build_app

    assert builder is build_app
    app = builder(copy.deepcopy(application["args"]))
    assert isinstance(app, Application)
    deployments = {d.name: d for d in build_deployments(app, name=application["name"]).deployments}

    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head_resources = _start_resources(cluster["headGroupSpec"]["rayStartParams"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    offered = {}
    for group in cluster["workerGroupSpecs"]:
        gpus = group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        for resource in _start_resources(group["rayStartParams"]):
            offered[resource] = gpus
    engines = [d for name, d in deployments.items() if name not in ("scheduler", "postproc")]
    assert engines
    for engine in engines:
        options = engine.ray_actor_options
        for resource in options.get("resources", {}):
            if resource.startswith("accelerator_type:"):
                assert resource in offered, f"{engine.name} asks for {resource}; the groups offer {sorted(offered)}"
                assert options.get("num_gpus", 0) <= offered[resource], engine.name
    [override] = application["deployments"]
    assert override["name"] in deployments
    for resource in override["ray_actor_options"]["resources"]:
        assert resource in head_resources
        assert all(resource not in _start_resources(g["rayStartParams"]) for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_both_planes_read_one_config(rendered, farm_env, tmp_path, values):
    """The gateway's farm.yaml (ConfigMap) and the Serve args are the same FarmConfig, and it
    listens where the Services and probes look."""
    from farm.config import load_config

    docs = rendered[values.name]
    config_map = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    text = config_map["data"]["farm.yaml"]
    assert yaml.safe_load(text) == serve_config(docs)["applications"][0]["args"]
    (tmp_path / "farm.yaml").write_text(text)
    config = load_config(tmp_path / "farm.yaml")
    assert config.gateway.host == "0.0.0.0" and config.scheduler.metrics_host == "0.0.0.0"
    assert config.store.url is None  # it comes from the Secret, as FARM_STORE__URL
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.gateway.port, "metrics": config.gateway.metrics_port}
    env = {e["name"]: e for e in container["env"]}
    assert env["FARM_CONFIG"]["value"] == "/etc/farm/farm.yaml"
    assert env["FARM_STORE__URL"]["valueFrom"]["secretKeyRef"]["name"]
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "farm-metrics", "containerPort": config.scheduler.metrics_port} in head["ports"]
    if config.gateway.tls:
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert str(config.gateway.tls_cert_file.parent) in mounts


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_gateway_probes(rendered, values):
    """Readiness is the gRPC health service (over TLS through the probe script where the
    kubelet's own gRPC probe cannot speak it); liveness only asks whether the port accepts
    connections, so a store or Ray outage never restarts gateways."""
    docs = rendered[values.name]
    container = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert set(container["livenessProbe"]) >= {"tcpSocket"} and "grpc" not in container["livenessProbe"]
    assert container["startupProbe"]["tcpSocket"]["port"] == "grpc"
    readiness = container["readinessProbe"]
    tls = yaml.safe_load(values.read_text()).get("gateway", {}).get("tls", {}).get("enabled", False)
    if tls:
        assert readiness["exec"]["command"] == ["python", "/etc/farm/tls_probe.py"]
    else:
        assert readiness["grpc"]["port"] == next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


def test_serve_metrics_service_selects_the_head(rendered):
    docs = rendered["defaults-values.yaml"]
    service = next(d for d in objects(docs, "Service") if d["metadata"]["name"].endswith("-serve-metrics"))
    head_labels = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()
    for group in _worker_groups(docs).values():
        assert not service["spec"]["selector"].items() <= group["template"]["metadata"]["labels"].items()


def test_ray_version_is_the_locked_one():
    """KubeRay's rayVersion must be the Ray in the images, which install the lock."""
    pins = dict(line.split("==", 1) for line in (REPO_ROOT / "requirements" / "cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith(("#", " ")))
    ray_pin = pins["ray"].split()[0].split(";")[0]
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == ray_pin


# --- the plain manifests -----------------------------------------------------------------------------

def test_plain_manifests_are_current():
    expected = generate.render_manifests()
    present = {p.name: p.read_text() for p in generate.MANIFESTS_DIR.glob("*.yaml")}
    assert sorted(present) == sorted(expected), "run `make chart`"
    for name, text in expected.items():
        assert present[name] == text, f"deploy/kubernetes/{name} is stale: run `make chart`"


# --- the API-key bootstrap ---------------------------------------------------------------------------

def test_bootstrap_issues_a_working_key(tmp_path):
    """The bootstrap Job's store half, on a real store: a new tenant gets a key that
    authenticates; where the tenant exists (a gateway made `default` and kept its key in its
    own pod), a rotated key works and the unreadable one is revoked."""
    sys.path.insert(0, str(CHART / "scripts"))
    import bootstrap_api_key

    from farm.domain.errors import Unauthenticated
    from farm.jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'farm.db'}")
    try:
        key = bootstrap_api_key.issue_key(store, "studio")
        assert store.authenticate(key).name == "studio"
        _, lost = store.create_tenant("default")
        rotated = bootstrap_api_key.issue_key(store, "default")
        assert store.authenticate(rotated).name == "default"
        with pytest.raises(Unauthenticated):
            store.authenticate(lost)
    finally:
        store.close()


# --- the readiness probe under TLS, against a real gateway ---------------------------------------

def _certificates(directory: Path, server_name: str) -> None:
    """A throwaway CA (ca.crt) and a gateway certificate for `server_name` signed by it that
    also allows client authentication (tls.crt, tls.key): a kubernetes.io/tls Secret's files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (directory / "ca.crt").write_bytes(certificate("farm-test-ca", ca_key, "farm-test-ca", ca_key, ca=True))
    (directory / "tls.crt").write_bytes(certificate(server_name, key, "farm-test-ca", ca_key, ca=False))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def test_tls_readiness_probe_asks_a_real_gateway(rendered, farm_env, tmp_path):
    """The probe script and environment the TLS values render, run against a gateway serving
    mutual TLS from such files: NOT_SERVING (exit 1) until an engine pool reports in, then
    SERVING (exit 0); without its client certificate the gateway refuses its handshake."""
    import time

    from farm.config import FarmConfig
    from farm.jobs.records import PoolStatus
    from tests.gateway import serving

    docs = rendered["tls-values.yaml"]
    container = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("FARM_PROBE_")}
    config_map = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    _certificates(tls_dir, env["FARM_PROBE_SERVER_NAME"])
    script = tmp_path / "tls_probe.py"
    script.write_text(config_map["data"]["tls_probe.py"].replace('"/etc/farm/tls"', repr(str(tls_dir))))
    model = {"name": "ltx", "family": "ltx-video", "sources": {"text-to-video": "no-such-dir"}}
    config = FarmConfig(home=tmp_path / "home", models=[model], gateway={
        "port": 0, "metrics_port": 0, "health_interval_s": 0.1, "tls_cert_file": tls_dir / "tls.crt",
        "tls_key_file": tls_dir / "tls.key", "tls_client_ca_file": tls_dir / "ca.crt"})

    def probe(**overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                              env={**os.environ, **env, "FARM_PROBE_PORT": str(gateway.gateway.port), **overrides})

    with serving(config) as gateway:
        assert env["FARM_PROBE_MUTUAL_TLS"] == "1"
        not_ready = probe()
        assert not_ready.returncode == 1 and not not_ready.stderr, not_ready.stderr
        gateway.store.publish_pools("test", [PoolStatus("ltx", "CPU", 1, 1, 1)])
        deadline = time.monotonic() + 20
        while (ready := probe()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.returncode == 0, ready.stderr
        refused = probe(FARM_PROBE_MUTUAL_TLS="0")
        assert refused.returncode != 0 and "health check failed: UNAVAILABLE" in refused.stderr
