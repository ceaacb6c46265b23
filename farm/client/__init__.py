"""The client SDK of farm.v1.RenderService, for other services, the CLI, the demo, the
benchmarks and the tests: `FarmClient` (synchronous) and `AsyncFarmClient` (asyncio) with
the same methods, typed errors carrying the answers' google.rpc details
(farm/client/errors.py), gRPC's retries for idempotent calls, TLS and mutual TLS, and
downloads streamed to disk that resume where a broken stream stopped.

It needs only grpcio, grpcio-status, grpcio-health-checking and farm.v1 (the generated
code): nothing else of farm."""

from farm.client import errors
from farm.client.aio import AsyncEventStream, AsyncFarmClient
from farm.client.channel import (
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    channel_credentials,
    find_api_key,
)
from farm.client.errors import FarmError, NoApiKey
from farm.client.sync import EventStream, FarmClient

__all__ = [
    "DEFAULT_TARGET", "MAX_MESSAGE_BYTES", "AsyncEventStream", "AsyncFarmClient", "EventStream", "FarmClient",
    "FarmError", "NoApiKey", "channel_credentials", "errors", "find_api_key",
]
