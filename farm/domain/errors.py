"""Errors that cross layers. Each names a gRPC status; the gateway's error interceptor
turns them into statuses with `google.rpc` details. Nothing here imports grpc, so the
job plane can raise them without a dependency on the API layer."""

from __future__ import annotations

import dataclasses

# A bad value is quoted in an answer up to this many characters: the whole answer travels
# in gRPC trailers, which clients cap (8 KiB soft, 16 KiB hard), so echoing a 9,000-character
# value would turn a clear INVALID_ARGUMENT into a RESOURCE_EXHAUSTED with no details.
QUOTED_CHARS = 64
# ... and at most this many bytes of quoted text: repr() writes a control character as up
# to 10 (`\U000e0001`) and UTF-8 takes up to 4 bytes a character, so 64 characters could
# quote as 642 bytes, and the gateway's clipping of a field path (256 bytes) or a description
# (512) would then cut off the path's closing bracket or the rest of the sentence.
QUOTED_BYTES = 128


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclasses.dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class FarmError(Exception):
    code = "INTERNAL"
    retry_after_s: float | None = None
    """Set where retrying later can succeed: the answer carries it as google.rpc RetryInfo."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(FarmError):
    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class NotFound(FarmError):
    code = "NOT_FOUND"


class AlreadyExists(FarmError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(FarmError):
    code = "FAILED_PRECONDITION"


class Unauthenticated(FarmError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(FarmError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, violations: list[QuotaViolation] | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.violations = violations or []
        self.retry_after_s = retry_after_s


class Unavailable(FarmError):
    code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(FarmError):
    code = "DEADLINE_EXCEEDED"


def invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def quoted(value: str, limit: int = QUOTED_CHARS) -> str:
    """`value` quoted for an error message: whole when short, else its first characters
    (at most `limit`, quoting to at most QUOTED_BYTES bytes) and its length, so that an
    answer stays small whatever a client sent."""
    text = repr(value)
    if len(value) <= limit and len(text.encode()) <= QUOTED_BYTES:
        return text
    prefix = value[:limit]
    while len(repr(prefix).encode()) > QUOTED_BYTES:
        prefix = prefix[:-1]
    return f"{prefix!r}... ({len(value)} characters)"


class EngineLost(FarmError):
    """The engine replica running an attempt died or became unreachable: a farm
    fault, so the attempt is requeued and not charged."""

    code = "UNAVAILABLE"


class RenderRejected(Exception):
    """The render cannot be made as asked, wherever it runs (e.g. its clip failed the
    quality gate): unlike a node's fault, trying another node would fail the same way."""
