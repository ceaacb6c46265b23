"""How the store tells others that something changed: a write that queued a render
announces it (NOTIFY on PostgreSQL; a doorbell rung after the commit on SQLite, see
farm.jobs.doorbell), and `ChangeDetector` is the listening side a scheduler or a
watch hub asks whether to look again."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text
from sqlalchemy.orm import Session

from farm.jobs import doorbell

QUEUE_CHANNEL = "farm_queue"
# Without a word from PostgreSQL for this long, the listener says "maybe" anyway (a
# notification lost with a dropped connection costs at most this much).
LISTEN_FALLBACK_S = 2.0


def sqlite_database(url: str) -> str | None:
    """The database file of a SQLite URL; None for other databases and in-memory ones."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return database if database and database != ":memory:" else None


def _psycopg_conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def announce_queued(session: Session, is_sqlite: bool) -> None:
    """Says, from inside a write transaction, that it queued a render or freed a slot.
    Delivered at commit, to schedulers listening (see ChangeDetector)."""
    if is_sqlite:
        session.info["queued"] = True  # CommitBells rings the queue bell after the commit
    else:
        session.execute(text(f"NOTIFY {QUEUE_CHANNEL}"))


class CommitBells:
    """The doorbells a SQLite file's write commits ring, since SQLite has no NOTIFY:
    every commit rings COMMITS (watchers), one that announced a queued render also
    rings QUEUE (schedulers). Nothing to ring on PostgreSQL or in memory."""

    def __init__(self, url: str):
        database = sqlite_database(url)
        self._bells = {channel: doorbell.Doorbell(database, channel)
                       for channel in (doorbell.QUEUE, doorbell.COMMITS)} if database else {}

    def after_commit(self, session: Session) -> None:
        # Rung after the commit, so whoever wakes sees it.
        if self._bells:
            self._bells[doorbell.COMMITS].ring()
            if session.info.get("queued"):
                self._bells[doorbell.QUEUE].ring()

    def close(self) -> None:
        for bell in self._bells.values():
            bell.close()


class ChangeDetector:
    """Tells cheaply whether renders may have been queued since the last look, so an
    idle scheduler need not query for work on every turn of its loop. On SQLite, `PRAGMA
    data_version` changes when another connection commits (no table is read), and the
    commit rings a doorbell (`channel`) that calls `on_change` at once.
    On PostgreSQL, every submit and requeue sends NOTIFY farm_queue, and a listening
    connection in a thread raises a flag and calls `on_change`. `pushed` says whether
    changes are announced here; if not (another process holds the doorbell, or no
    abstract sockets), the owner must poll."""

    def __init__(self, url: str, on_change=None, channel: str = doorbell.QUEUE):
        self._connection = None
        self._version: int | None = None
        self._flag = threading.Event()
        self._stop = threading.Event()
        self._on_change = on_change
        self._last_heard = time.monotonic()
        self._listener: threading.Thread | None = None
        self._bell: doorbell.DoorbellListener | None = None
        database = sqlite_database(url)
        if url.startswith("sqlite"):
            import sqlite3

            self._connection = sqlite3.connect(database or ":memory:", check_same_thread=False)
            if on_change is not None and database:
                self._bell = doorbell.DoorbellListener(database, channel, on_change)
        else:
            self._conninfo = _psycopg_conninfo(url)
            self._listener = threading.Thread(target=self._listen, name="store-listener", daemon=True)
            self._listener.start()

    @property
    def pushed(self) -> bool:
        return self._listener is not None or (self._bell is not None and self._bell.listening)

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {QUEUE_CHANNEL}")
                    self._heard()  # anything queued while not listening
                    while not self._stop.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self._heard()
            except Exception:  # the database restarting: listen again shortly
                self._stop.wait(0.5)

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        self._flag.set()
        if self._on_change is not None:
            self._on_change()

    def changed(self) -> bool:
        if self._connection is None:
            if self._listener is None:
                return True
            stale = time.monotonic() - self._last_heard > LISTEN_FALLBACK_S
            if stale:
                self._last_heard = time.monotonic()
            heard = self._flag.is_set()
            self._flag.clear()
            return heard or stale
        version = self._connection.execute("PRAGMA data_version").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        self._stop.set()
        if self._bell is not None:
            self._bell.close()
        if self._connection is not None:
            self._connection.close()
