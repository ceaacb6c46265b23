"""Fixtures shared by unit and integration tests: job stores on SQLite and on the
PostgreSQL server at 127.0.0.1:5432 (each test gets its own schema there)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

from farm.config import ModelConfig, Task
from farm.families import Family

POSTGRES_URL = os.environ.get("FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_schema_url(schema: str) -> str:
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def postgres_schema(prefix: str = "farm_test") -> Iterator[str]:
    """The URL of a fresh schema in the test database, dropped afterwards."""
    import sqlalchemy

    schema = f"{prefix}_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield postgres_schema_url(schema)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def postgres_url():
    """A fresh schema in the test database, dropped afterwards."""
    with postgres_schema() as url:
        yield url


def terminate_connections(application_name: str) -> int:
    """What a PostgreSQL restart does to its clients: every connection tagged with this
    application_name is cut. Returns how many were."""
    import sqlalchemy

    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        cut = connection.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %(name)s",
            {"name": application_name}).scalar()
    admin.dispose()
    return int(cut or 0)


@contextlib.contextmanager
def postgres_role() -> Iterator[tuple[str, str]]:
    """(store URL, role): a PostgreSQL role with a schema of its own, its connections tagged
    with the role's name so that `terminate_connections(role)` cuts only them. Dropped after."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    role = f"farm_cut_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        connection.exec_driver_sql(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    url = make_url(POSTGRES_URL).set(username=role, query={"options": f"-csearch_path={role}",
                                                          "application_name": role})
    try:
        yield url.render_as_string(hide_password=False), role
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"ALTER ROLE {role} LOGIN")
        terminate_connections(role)
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {role} CASCADE")
            connection.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'farm.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    from farm.jobs.store import JobStore

    job_store = JobStore(store_url)
    yield job_store
    job_store.close()


def sample_models() -> dict[str, ModelConfig]:
    return {
        "ltx": ModelConfig(name="ltx", family=Family.LTX_VIDEO,
                           sources={Task.TEXT_TO_VIDEO: "ltx-dir", Task.IMAGE_TO_VIDEO: "ltx-dir"}),
        "cog": ModelConfig(name="cog", family=Family.COGVIDEOX, sources={Task.TEXT_TO_VIDEO: "cog-dir"}),
    }


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """The tiny random-weight pipelines, written once per test session."""
    from farm.engines.tiny import make_tiny_models

    directory = tmp_path_factory.mktemp("models")
    # FARM_TEST_FAMILIES=wan,ltx-2 writes only those (working on one family, the rest unused).
    only = os.environ.get("FARM_TEST_FAMILIES")
    make_tiny_models(directory, families=only.split(",") if only else None)
    return directory
