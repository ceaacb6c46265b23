"""What the sync and asyncio clients share: the API key, TLS credentials, the channel's
options with gRPC's retry policy, the backoff of the retries done in the client, and the
trace context a submit carries."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from farm.client.errors import DataLoss, NoApiKey
from farm.v1 import render_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
# The gateway's largest answer (MAX_SEND_BYTES in farm/api/limits.py); requests beyond its
# receive limit are refused by the gateway, not here.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"].full_name

# Retries. gRPC retries these calls itself (the service config below) when the answer is
# UNAVAILABLE: the gateway could not be reached, a connection broke before the first
# answer, or the gateway could not reach its store. Each is idempotent: asking again
# changes nothing more than the first call did (a cancel whose answer was lost and that
# is asked again is refused, FAILED_PRECONDITION "already CANCELLED"). A stream
# (WatchRender, FetchArtifact) is retried only until the gateway starts answering; after
# that a broken stream is resumed by the caller (`download` and `wait` do).
#
# SubmitRender is not in the policy: a submit whose answer was lost may have queued the
# render, and asking again would render twice, unless the spec has an idempotency key
# (then the gateway answers with the first render). The clients retry a keyed submit
# themselves, with the same backoff.
#
# RESOURCE_EXHAUSTED is not retried, although the gateway says when to retry (RetryInfo):
# gRPC's policy cannot wait what the answer says, only its own backoff, which for a rate
# limit is sooner than the server asked (each early retry is refused again, and counts
# as a call) and for a spent budget (days) pointless; and gRPC itself answers
# RESOURCE_EXHAUSTED for a message over the size limit, which no retry changes. The error
# carries `retry_after_s`; the caller decides whether to wait (`farm batch` does).
IDEMPOTENT_METHODS = ("GetRender", "ListRenders", "WatchRender", "CancelRender", "FetchArtifact", "EstimateCost",
                      "ListModels", "GetUsage")
RETRY_ATTEMPTS = 5
"""Calls in all, the first included (gRPC allows at most 5)."""
FIRST_BACKOFF_S, MAX_BACKOFF_S, BACKOFF_MULTIPLIER = 0.25, 4.0, 2.0
"""Before retry n (from 1) gRPC waits a random time up to min(FIRST * MULTIPLIER^(n-1), MAX):
about 2 s in all on average over 4 retries, at most 3.75 s: enough for a gateway restart or
a store failover, short against the calls' default timeouts."""
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}
"""gRPC's guard against retry storms: each failure costs a token, each success gives back
0.1, and a channel with half its tokens gone or fewer stops retrying until calls succeed
again, so that a farm that is down is not sent five times the calls."""


def service_config() -> str:
    policy = {
        "maxAttempts": RETRY_ATTEMPTS,
        "initialBackoff": f"{FIRST_BACKOFF_S}s",
        "maxBackoff": f"{MAX_BACKOFF_S}s",
        "backoffMultiplier": BACKOFF_MULTIPLIER,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({
        "methodConfig": [{"name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS],
                          "retryPolicy": policy}],
        "retryThrottling": RETRY_THROTTLING,
    })


def backoff_s(retry: int, retry_after_s: float | None = None) -> float:
    """How long to wait before retry `retry` (from 1) of a call retried by the client: what
    the gateway asked for (RetryInfo) where it said, else gRPC's own backoff (a random time
    up to the exponential bound, so that many clients do not retry in step)."""
    if retry_after_s is not None and retry_after_s > 0:
        return retry_after_s
    return random.uniform(0, min(FIRST_BACKOFF_S * BACKOFF_MULTIPLIER ** (retry - 1), MAX_BACKOFF_S))


def find_api_key(home: Path | str | None = None) -> str:
    """$FARM_API_KEY, else the default tenant's key that the farm's first start wrote under
    `home` (default: $FARM_HOME, else ~/.farm). NoApiKey where there is neither."""
    if key := os.environ.get("FARM_API_KEY"):
        return key
    home = Path(home) if home is not None else Path(os.environ.get("FARM_HOME", "~/.farm"))
    key_file = home.expanduser() / "keys" / "default.key"
    try:
        return key_file.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        raise NoApiKey(f"no API key: set FARM_API_KEY or start farm once so that {key_file} exists") from None


def channel_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                        key_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the server's certificate checked against `ca_file` (PEM; None: the
    system's roots), and for mutual TLS the client's certificate chain and key."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file),
                                        certificate_chain=read(cert_file))


def channel_arguments(*, tls: bool, tls_ca_file, tls_cert_file, tls_key_file, tls_server_name,
                      retries: bool, options: Sequence[tuple[str, Any]]
                      ) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """The channel's options and, where TLS is asked for (`tls` or any `tls_*`), its
    credentials (None: plaintext). `options` win over farm's."""
    chosen: dict[str, Any] = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.enable_retries": 1 if retries else 0,
    }
    if retries:
        chosen["grpc.service_config"] = service_config()
    credentials = None
    if tls or any(v is not None for v in (tls_ca_file, tls_cert_file, tls_key_file, tls_server_name)):
        if tls_server_name:
            chosen["grpc.ssl_target_name_override"] = tls_server_name
        credentials = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
    chosen.update(dict(options))
    return list(chosen.items()), credentials


def bearer(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def trace_metadata(traceparent: str | None) -> tuple[tuple[str, str], ...]:
    """The W3C trace context a submit carries: `traceparent` as given; else, where the
    OpenTelemetry API is installed and the caller is inside a valid span, the current
    context as the application's propagator writes it; else nothing."""
    if traceparent:
        return (("traceparent", traceparent),)
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return ()
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    # gRPC metadata keys are lower case; a propagator may write e.g. B3's X-B3-TraceId.
    return tuple((key.lower(), value) for key, value in carrier.items() if isinstance(value, str))


def usage_request(since, until, group_by: int | str) -> pb.GetUsageRequest:
    """`since`/`until` as datetimes (naive ones are UTC) or Timestamps; `group_by` a
    UsageGrouping or its short name (model, device, day, phase)."""
    import datetime as dt

    from google.protobuf.timestamp_pb2 import Timestamp

    if isinstance(group_by, str):
        group_by = pb.UsageGrouping.Value(f"USAGE_GROUPING_{group_by.upper()}")
    request = pb.GetUsageRequest(group_by=group_by)
    for field, moment in (("since", since), ("until", until)):
        if moment is None:
            continue
        if isinstance(moment, dt.datetime):
            stamp = Timestamp()
            stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC))
            moment = stamp
        getattr(request, field).CopyFrom(moment)
    return request


class Destination:
    """Where `download` writes: a path, written to `<path>.partial` and renamed over the path
    once whole (a reader never sees half an artifact; a `.partial` left by a download that
    died is resumed from its end), or a binary file, written from its position on, which
    stands for the artifact's byte `offset`."""

    def __init__(self, destination, offset: int = 0):
        self.path: Path | None = None
        if isinstance(destination, (str, os.PathLike)):
            if offset:
                raise ValueError("a path resumes from its .partial file by itself; offset is for a file object")
            self.path = Path(destination)
            self.partial = self.path.with_name(self.path.name + ".partial")
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.partial, "ab")
            offset = self.file.tell()
        else:
            self.file = destination
        self.start = self.written = offset
        """`written`: the artifact's bytes written so far, the offset to ask for next."""

    def write(self, chunk: pb.ArtifactChunk) -> None:
        if chunk.offset != self.written:
            raise DataLoss(grpc.StatusCode.DATA_LOSS, f"the gateway sent bytes from {chunk.offset}; "
                                                      f"expected {self.written}")
        self.file.write(chunk.data)
        self.written += len(chunk.data)

    def restart(self) -> bool:
        """The `.partial` holds more bytes than the artifact has: it is another's, so start
        again from 0. False where that cannot be done (a file object)."""
        if self.path is None or self.start == 0:
            return False
        self.file.seek(0)
        self.file.truncate()
        self.start = self.written = 0
        return True

    def finish(self) -> None:
        if self.path is not None:
            self.file.close()
            os.replace(self.partial, self.path)
        else:
            self.file.flush()

    def close(self) -> None:
        """Keeps what was written (a path's `.partial`) for the next download to resume."""
        if self.path is not None and not self.file.closed:
            self.file.close()


def submit_pause(retries: bool, spec: pb.RenderSpec, attempt: int, error, deadline: float) -> float | None:
    """After UNAVAILABLE on submit attempt `attempt` (from 1): seconds to wait before the
    next, or None to give up. Only a spec with an idempotency key is submitted again."""
    if not (retries and spec.idempotency_key) or attempt >= RETRY_ATTEMPTS:
        return None
    pause = backoff_s(attempt, error.retry_after_s)
    return pause if time.monotonic() + pause < deadline else None


def resume_pause(failures: int, error, deadline: float) -> float | None:
    """After `failures` broken streams in a row that brought nothing new: seconds to wait
    before resuming, or None to give up."""
    if failures >= RETRY_ATTEMPTS:
        return None
    pause = backoff_s(failures, error.retry_after_s)
    return pause if time.monotonic() + pause < deadline else None


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def finished(target: Destination, total: int | None, before: int) -> bool:
    """After a FetchArtifact stream ended without an error: whether the artifact is whole
    (then it is put in place); False to ask for the rest. `total`: the size the chunks
    said (None: no chunk came, the bytes already written were the whole artifact)."""
    if total is None or target.written >= total:
        target.finish()
        return True
    if target.written == before:
        raise DataLoss(grpc.StatusCode.DATA_LOSS, f"the artifact's stream ended at byte {target.written} of {total}")
    return False
