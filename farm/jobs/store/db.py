"""The store's database: the engine for SQLite or PostgreSQL (each with its own
connection set-up), migrations at start, and the short read and write transactions
every store method runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from farm.jobs.store.notify import CommitBells


class Database:
    """One database URL: `read()` and `write()` open a session each, and a write is one
    transaction that commits when its block ends (then rings the commit bells)."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 8):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _make_engine(url, pool_size)
        if migrate:
            from farm.jobs.migrate import upgrade

            upgrade(self.engine)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        # On SQLite a write transaction takes the write lock at BEGIN: upgrading a read
        # lock later can fail with "database is locked" without waiting.
        self._writer = sessionmaker(self.engine.execution_options(farm_write=True), expire_on_commit=False)
        # SQLite has no NOTIFY: commits ring doorbells instead (see farm.jobs.doorbell).
        self._bells = CommitBells(url)

    def close(self) -> None:
        self._bells.close()
        self.engine.dispose()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session
        self._bells.after_commit(session)

    def lock(self, stmt):
        """`stmt` locking the rows it selects (SQLite's write transaction already holds
        the whole database)."""
        return stmt if self.is_sqlite else stmt.with_for_update()

    def ping(self) -> None:
        with self.read() as session:
            session.execute(select(1))


def _make_engine(url: str, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):
            write = connection.get_execution_options().get("farm_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
