"""The lock files pin everything pyproject.toml asks for, so a dependency changed without
`make lock` fails here instead of installing something nobody tested."""

from __future__ import annotations

import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Which extras each lock installs (the Makefile's `lock` target says the same).
LOCKS = {"cpu": ("dev", "onnx", "s3"), "gpu": ("dev", "gpu", "s3")}


def pins(lock: str) -> dict[str, Version]:
    pinned = {}
    for line in (ROOT / "requirements" / f"{lock}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, _, version = line.partition("==")
            assert version, f"requirements/{lock}.txt: {line!r} is not pinned with =="
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def wanted(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_pinned_within_its_range(lock):
    pinned = pins(lock)
    for requirement in wanted(LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in requirements/{lock}.txt: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={pinned[name]}, outside {requirement}: run `make lock`"
        )


def test_both_locks_pin_the_same_versions_of_what_they_share():
    cpu, gpu = pins("cpu"), pins("gpu")
    assert cpu["torch"].public == gpu["torch"].public, "CPU and GPU nodes must run one torch release"
    differing = {
        name: (str(cpu[name]), str(gpu[name]))
        for name in cpu.keys() & gpu.keys()
        if name != "torch" and cpu[name] != gpu[name]
    }
    assert not differing, f"the GPU lock differs from the CPU lock (run `make lock`): {differing}"


def test_the_installed_environment_is_its_lock():
    """What `make setup` installed is what the lock pins (a stale .venv shows up here)."""
    from importlib.metadata import PackageNotFoundError, version

    lock = "cpu" if Version(version("torch")).local == "cpu" else "gpu"
    stale = {}
    for name, pinned in pins(lock).items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            stale[name] = (str(pinned), str(installed))
    assert not stale, f"installed packages differ from requirements/{lock}.txt (run `make setup`): {stale}"
