"""Fixtures of the engine tests: the tiny models of every family, each loaded on first use
and kept for the module."""

from __future__ import annotations

import pytest

from farm.families import tiny_models

# Every family's tiny model with each task it serves, from the registry.
FAMILIES_AND_TASKS = [(tiny.name, task) for _, tiny in tiny_models() for task in tiny.directories]


class LazyEngines(dict):
    """Model name -> engine, loaded when a test first asks for it (a test of one family
    does not pay for loading every other)."""

    def __init__(self, models_dir):
        super().__init__()
        from farm.engines.tiny import tiny_model_configs

        self._configs = {model.name: model for model in tiny_model_configs(models_dir)}

    def __missing__(self, name: str):
        from farm.engines import load_engine

        engine = self[name] = load_engine(self._configs[name])
        return engine

    def all(self) -> list:
        return [self[name] for name in self._configs]


@pytest.fixture(scope="module")
def engines(models_dir) -> LazyEngines:
    return LazyEngines(models_dir)
