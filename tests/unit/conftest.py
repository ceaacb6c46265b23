"""Fixtures of the engine tests: the tiny models of every family, loaded once per module."""

from __future__ import annotations

import pytest

from farm.config import Task

FAMILIES_AND_TASKS = [
    ("ltx-video-tiny", Task.TEXT_TO_VIDEO),
    ("ltx-video-tiny", Task.IMAGE_TO_VIDEO),
    ("cogvideox-tiny", Task.TEXT_TO_VIDEO),
    ("cogvideox-tiny", Task.IMAGE_TO_VIDEO),
]


@pytest.fixture(scope="module")
def engines(models_dir) -> dict:
    from farm.engines import load_engine
    from farm.engines.tiny import tiny_model_configs

    return {model.name: load_engine(model) for model in tiny_model_configs(models_dir)}
