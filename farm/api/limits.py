"""How much the gateway takes in: the largest request a legitimate spec makes (gRPC
refuses anything larger before it is parsed), and how many large requests it handles at
once (`LargeRequestLimit`, refusing the rest before they are parsed)."""

from __future__ import annotations

import contextlib
import inspect

import grpc
from grpc_status import rpc_status

from farm.api.interceptors import error_status
from farm.config import FarmConfig
from farm.domain.errors import ResourceExhausted

# Every field of a RenderSpec but the image and the two prompts, at its largest: 32 labels
# of a 63-character key and a 256-character value (4 bytes a character in UTF-8, plus
# framing: about 35 KiB), the idempotency key (128 characters), placement, post-processing,
# the numbers and the framing of SubmitRenderRequest. tests/unit/test_message_limits.py
# builds that spec and checks it fits.
OTHER_FIELDS_BYTES = 64 * 1024
# UTF-8 takes at most 4 bytes a character; the prompt limits count characters.
UTF8_MAX_BYTES = 4
# The largest answer the gateway sends. FetchArtifact streams chunks of at most 4 MiB
# (`gateway.fetch_chunk_bytes`), so its answers never come near this; a ListRenders page
# (up to 1000 renders, each carrying its spec's prompts and labels) can reach tens of MiB in
# the extreme. This is FarmClient's receive limit (farm/cli/client.py), so the farm's own client
# reads every answer the gateway is willing to send.
MAX_SEND_BYTES = 64 * 1024 * 1024
# What a refused large request is told to wait: a submit with an image takes well under a second.
LARGE_REQUEST_RETRY_S = 1.0


def largest_request_bytes(config: FarmConfig) -> int:
    """The largest request a legitimate spec of a served model makes: its image at the
    model's `max_image_bytes`, both prompts at `max_prompt_chars` of 4-byte characters, and
    `OTHER_FIELDS_BYTES` for the rest."""
    largest = max((m.limits.max_image_bytes + 2 * UTF8_MAX_BYTES * m.limits.max_prompt_chars
                   for m in config.served_models()), default=0)
    return largest + OTHER_FIELDS_BYTES


def max_receive_bytes(config: FarmConfig) -> int:
    """`gateway.max_message_bytes`, else the largest legitimate request; a configured limit
    below that is refused, since it would turn legitimate images away."""
    needed = largest_request_bytes(config)
    configured = config.gateway.max_message_bytes
    if configured is None:
        return needed
    if configured < needed:
        raise ValueError(
            f"gateway.max_message_bytes {configured} is below the largest legitimate request, {needed} bytes "
            f"(the largest max_image_bytes of the served models, their prompts and {OTHER_FIELDS_BYTES} bytes for "
            f"the other fields): lower the models' limits.max_image_bytes instead, or leave it unset")
    return configured


class LargeRequestLimit(grpc.aio.ServerInterceptor):
    """Admits at most `max_in_flight` requests whose body exceeds `large_bytes` at a time;
    the rest are refused with RESOURCE_EXHAUSTED and RetryInfo before they are parsed. It must
    come first among the interceptors: it takes each request's raw bytes and hands the inner
    handler what it expects (the message, where it decodes its own requests, the bytes)."""

    def __init__(self, large_bytes: int, max_in_flight: int, metrics=None):
        self.large_bytes = large_bytes
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0
        """Large requests being handled now (the event loop's only: no lock)."""

    @contextlib.asynccontextmanager
    async def _admitted(self, method: str, raw: bytes, context):
        if len(raw) <= self.large_bytes:
            yield
            return
        if self.in_flight >= self.max_in_flight:
            error = ResourceExhausted(
                f"the gateway is handling {self.max_in_flight} requests larger than {self.large_bytes} bytes "
                f"(gateway.max_concurrent_large_requests); retry shortly", retry_after_s=LARGE_REQUEST_RETRY_S)
            if self.metrics is not None:
                self.metrics.observe(method, error.code, 0.0)
            status = rpc_status.to_status(error_status(error))
            await context.abort(status.code, status.details, status.trailing_metadata)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method
        decode = handler.request_deserializer or (lambda raw: raw)
        behavior = handler.unary_unary or handler.unary_stream

        async def unary(raw: bytes, context):
            async with self._admitted(method, raw, context):
                return await behavior(decode(raw), context)

        async def stream(raw: bytes, context):
            async with self._admitted(method, raw, context):
                async for item in behavior(decode(raw), context):
                    yield item

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
        # A stream written with context.write by a coroutine keeps that form.
        wrapper = stream if inspect.isasyncgenfunction(behavior) else unary
        return grpc.unary_stream_rpc_method_handler(wrapper, None, handler.response_serializer)
