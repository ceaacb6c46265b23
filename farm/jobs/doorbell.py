"""Doorbells: how processes sharing one SQLite file wake each other. SQLite has no
NOTIFY, so without a bell a scheduler must keep looking for queued renders, and that
polling keeps an idle farm's CPU busy and slows every render on a small node (the
figures are in benchmarks/RESULTS.md). A bell is a Unix datagram socket in Linux's
abstract namespace, named after the database file and a channel: ringing sends one
empty datagram, and one process per channel listens in a thread that sleeps until then.
Elsewhere (no abstract namespace), or when another process already listens on the
channel, `listening` is False and the caller polls as before."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

QUEUE = "queue"
"""Rung after a commit that queued a render (submit, requeue) or freed a slot."""
COMMITS = "commits"
"""Rung after every write commit: watchers learn of new events at once."""


def bell_address(database: str, channel: str) -> str | None:
    """The abstract socket name for a database file and channel; None where there
    is no abstract namespace or no file to name it after."""
    if not sys.platform.startswith("linux") or not database or database == ":memory:":
        return None
    key = hashlib.sha256(os.path.realpath(database).encode()).hexdigest()[:24]
    return f"\0farm-{key}-{channel}"


def _send(sender: socket.socket, address: str) -> None:
    try:
        sender.sendto(b"", address)
    except OSError:
        # Nobody listening, or the listener's queue is full of rings it has not read
        # yet: either way nothing is lost, since the listener looks at the store.
        pass


class Doorbell:
    """Rings one channel. Safe from any thread; a ring nobody hears costs one failed send."""

    def __init__(self, database: str, channel: str):
        self._address = bell_address(database, channel)
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)

    def ring(self) -> None:
        if self._socket is not None:
            _send(self._socket, self._address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class DoorbellListener:
    """Calls `on_ring` from a thread of its own after each ring (rings that arrive
    together are answered once). `listening` is False when the channel cannot be
    bound here; the owner must then poll."""

    def __init__(self, database: str, channel: str, on_ring: Callable[[], None]):
        self.listening = False
        self._on_ring = on_ring
        self._address = bell_address(database, channel)
        self._closing = threading.Event()
        self._socket: socket.socket | None = None
        if self._address is None:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            listener.bind(self._address)
        except OSError as error:
            listener.close()
            log.info("doorbell %s is taken (%s); polling instead", channel, error)
            return
        self._socket = listener
        self.listening = True
        self._thread = threading.Thread(target=self._listen, name=f"doorbell-{channel}", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                self._socket.recv(1)
                self._drain()
            except OSError:
                return  # closed
            if self._closing.is_set():
                return
            try:
                self._on_ring()
            except Exception:
                log.exception("doorbell callback failed")

    def _drain(self) -> None:
        """Reads the rings that came together, so a burst costs one callback."""
        self._socket.setblocking(False)
        try:
            while True:
                self._socket.recv(1)
        except BlockingIOError:
            pass
        finally:
            self._socket.setblocking(True)

    def close(self) -> None:
        if self._socket is None:
            return
        self._closing.set()
        # A ring of our own wakes the thread blocked in recv, which then exits.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            _send(waker, self._address)
        self._thread.join(timeout=2)
        self._socket.close()
        self._socket = None
