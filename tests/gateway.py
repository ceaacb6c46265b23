"""Helpers for tests that talk to a gateway: the field violations of an answer, and a
gateway served in this process (no Ray) on a store of the test's choosing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from farm.api.server import Gateway
from farm.client import FarmClient
from farm.config import FarmConfig
from farm.jobs.store import JobStore


def bad_request_fields(error: grpc.RpcError) -> dict[str, str]:
    """Field -> description of every BadRequest violation the answer carries."""
    fields = {}
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update({v.field: v.description for v in bad.field_violations})
    return fields


@dataclasses.dataclass
class LocalGateway:
    gateway: Gateway
    target: str
    client: FarmClient
    """With the default tenant's key."""
    store: JobStore


@contextlib.contextmanager
def serving(config: FarmConfig) -> Iterator[LocalGateway]:
    """The gateway in this process (a thread with its own event loop) on a free port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = Gateway(config)
    port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(60)
    target = f"127.0.0.1:{port}"
    # Each call sent once: tests read the gateway's own answers, not a retried one's.
    client = FarmClient(target, (config.keys_dir / "default.key").read_text().strip(), retries=False)
    store = JobStore(config.store_url, migrate=False)
    try:
        yield LocalGateway(gateway, target, client, store)
    finally:
        client.close()
        store.close()
        asyncio.run_coroutine_threadsafe(gateway.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
