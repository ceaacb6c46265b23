"""What the farm's answers mean to a program: one exception class per gRPC status, with the
`google.rpc` details the gateway sends decoded into fields.

Each is still a `grpc.RpcError` (and a `grpc.Call`) whose `code()`, `details()` and
`trailing_metadata()` are the answer's own, so code written against plain gRPC keeps
working: `except grpc.RpcError`, `error.code()`, `grpc_status.rpc_status.from_call(error)`.

    try:
        client.submit(spec)
    except InvalidArgument as error:
        error.field_violations      # {"spec.width": "250 is not a multiple of 32", ...}
    except ResourceExhausted as error:
        error.retry_after_s         # from RetryInfo: when the call would be served
        error.quota_violations      # from QuotaFailure: {"tenant:studio/submits": "..."}
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# Where gRPC carries a google.rpc.Status (grpc_status.rpc_status uses the same key).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class NoApiKey(Exception):
    """No API key was given, none is in $FARM_API_KEY, and the default tenant's key file
    does not exist. The message says where the key was looked for."""


class FarmError(grpc.RpcError, grpc.Call):
    """An answer other than OK. `code()`, `details()`, `trailing_metadata()` and
    `initial_metadata()` are those of the call; the google.rpc details it carried are
    decoded into `field_violations` (BadRequest), `quota_violations` (QuotaFailure) and
    `retry_after_s` (RetryInfo)."""

    def __init__(self, code: grpc.StatusCode, details: str | None, trailing_metadata=None, *,
                 initial_metadata=None, debug_error_string: str = ""):
        self._code, self._details = code, details or ""
        # As plain (key, value) pairs: grpc.aio's Metadata and the sync tuples alike, picklable.
        self._trailing_metadata = _pairs(trailing_metadata)
        self._initial_metadata = _pairs(initial_metadata)
        self._debug_error_string = debug_error_string
        self.status = _status_of(trailing_metadata)
        """The google.rpc.Status the answer carried, or None."""
        self.field_violations: dict[str, str] = {}
        """Field -> what is wrong with it and its limit (google.rpc.BadRequest). The field
        "" holds a note of problems left unlisted."""
        self.quota_violations: dict[str, str] = {}
        """What ran out (e.g. "tenant:studio/submits") -> why (google.rpc.QuotaFailure)."""
        self.retry_after_s: float | None = None
        """Seconds to wait before the same call can succeed (google.rpc.RetryInfo); None
        where the answer did not say."""
        for packed in self.status.details if self.status is not None else ():
            if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                packed.Unpack(bad)
                self.field_violations.update({v.field: v.description for v in bad.field_violations})
            elif packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                packed.Unpack(quota)
                self.quota_violations.update({v.subject: v.description for v in quota.violations})
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                packed.Unpack(retry)
                self.retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
        super().__init__(f"{code.name}: {self._details}")

    @classmethod
    def from_call(cls, error: grpc.RpcError) -> FarmError:
        """The typed error for a failed call (sync or grpc.aio); a FarmError is returned as it is."""
        if isinstance(error, FarmError):
            return error
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        kind = _BY_CODE.get(code, FarmError)
        return kind(code, _call(error, "details"), _call(error, "trailing_metadata"),
                    initial_metadata=_call(error, "initial_metadata"),
                    debug_error_string=_call(error, "debug_error_string") or "")

    def __reduce__(self):
        return (type(self), (self._code, self._details, self._trailing_metadata),
                {"_initial_metadata": self._initial_metadata, "_debug_error_string": self._debug_error_string})

    # grpc.Call: the call is over.
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing_metadata

    def initial_metadata(self):
        return self._initial_metadata

    def debug_error_string(self) -> str:
        return self._debug_error_string

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False

    def explain(self) -> list[str]:
        """The answer for a person, one readable line each: the code and message, then
        every field refused and its limit, every quota that ran out, and how long to wait."""
        fields = {f: d for f, d in self.field_violations.items() if f}
        if len(fields) == 1 and len(self.field_violations) == 1:
            [(field, description)] = fields.items()
            lines = [f"{self._code.name}: {field}: {description}"]
        elif self.field_violations:
            lines = [f"{self._code.name}: the request has {len(fields)} bad fields:"]
            lines += [f"  {field}: {description}" for field, description in fields.items()]
            lines += [f"  {note}" for field, note in self.field_violations.items() if not field]
        else:
            lines = [f"{self._code.name}: {self._details}"]
        lines += [f"  {subject}: {description}" for subject, description in self.quota_violations.items()]
        if self.retry_after_s is not None:
            lines.append(f"  retry in {_duration(self.retry_after_s)}")
        return lines


# One class per status a farm call can end with.
class Cancelled(FarmError):
    """The call was cancelled (by this client, or the gateway stopping)."""


class Unknown(FarmError):
    pass


class InvalidArgument(FarmError):
    """The request is wrong: `field_violations` names each field and its limit."""


class DeadlineExceeded(FarmError):
    """The call's timeout passed before the answer."""


class NotFound(FarmError):
    """No such render (or not this tenant's: another tenant's renders are never disclosed)."""


class AlreadyExists(FarmError):
    """The idempotency key was used before for a different spec."""


class PermissionDenied(FarmError):
    pass


class ResourceExhausted(FarmError):
    """A rate limit, a cap on open watches, a full queue or a spent budget (`quota_violations`
    says which); `retry_after_s` when it would be served. Also gRPC's own answer to a
    message over the size limit (then with neither)."""


class FailedPrecondition(FarmError):
    """The render is not in a state for this (e.g. fetching the artifact of an unfinished render)."""


class Aborted(FarmError):
    pass


class OutOfRange(FarmError):
    pass


class Unimplemented(FarmError):
    pass


class Internal(FarmError):
    """A fault of the gateway; the message carries a reference that its log has."""


class Unavailable(FarmError):
    """The gateway cannot be reached, or cannot reach its store (`retry_after_s` then says
    when to try again). Idempotent calls were retried before this was raised."""


class DataLoss(FarmError):
    pass


class Unauthenticated(FarmError):
    """The API key is missing, wrong or revoked."""


_BY_CODE: dict[grpc.StatusCode, type[FarmError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_class(code: grpc.StatusCode) -> type[FarmError]:
    return _BY_CODE.get(code, FarmError)


def _call(error: grpc.RpcError, method: str):
    """`error.method()`, or None where this RpcError lacks it (a bare grpc.RpcError)."""
    function = getattr(error, method, None)
    return function() if callable(function) else None


def _pairs(metadata) -> tuple[tuple[str, str | bytes], ...] | None:
    return None if metadata is None else tuple((key, value) for key, value in metadata)


def _status_of(trailing_metadata) -> status_pb2.Status | None:
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _duration(seconds: float) -> str:
    """`1.5 s`, `12 min 30 s`, `3 h 5 min`, `2 d 4 h`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"
