"""`farm batch`: one shard of a manifest of render specs, run as one pod of a Kubernetes
Indexed Job (deploy/batch/job.yaml, helm/farm/templates/batch-job.yaml).

The manifest is JSONL (a path or an fsspec URL): one render spec per line, with the
fields `farm submit` takes (see `FIELDS`). Line n (counting from 1) belongs to index
(n - 1) % count, so with 3 indexes index 0 takes lines 1, 4, 7, ... Each line is submitted
with an idempotency key made of the job's identity, the line number and a digest of the
line (and of its image): a pod that Kubernetes retries, or a Job re-run under the same
identity, gets the renders it already made back instead of new ones, while an edited line
is a new render. The pod follows its renders to their end, writes one results record per
line, and exits with a code that the Job's podFailurePolicy acts on:

  0   every line's render SUCCEEDED.
  2   the command cannot run at all (usage: flags, no job identity, an index outside the
      count, a manifest missing or too long, a refused API key): every index would fail
      alike, so the policy fails the whole Job.
  65  some lines did not succeed and retrying cannot change that: a line that is not a
      spec, a spec the farm refused, a render that FAILED or was CANCELLED (a retried pod
      would get the same render back). The policy fails this index only.
  75  retryable: the gateway did not answer for --retry-for seconds, --deadline passed, the
      pod was told to stop, or the manifest, an image or the results could not be reached.
      The policy counts it against backoffLimitPerIndex; the retried pod resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import typer

from farm.client import MAX_MESSAGE_BYTES, FarmClient
from farm.client.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FarmError,
    Internal,
    NoApiKey,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unknown,
)
from farm.domain.spec import MAX_IDEMPOTENCY_KEY_CHARS
from farm.v1 import render_pb2 as pb

EXIT_SUCCEEDED = 0
EXIT_USAGE = 2
"""click's own code for a bad command line: one code for everything the user must fix
before any index can run."""
EXIT_FAILED = 65
"""sysexits' EX_DATAERR."""
EXIT_RETRYABLE = 75
"""sysexits' EX_TEMPFAIL."""

MAX_MANIFEST_LINES = 100_000
"""Every pod reads the whole manifest to find its lines: a batch larger than this is
several Jobs (and several manifests)."""
MAX_LINE_BYTES = MAX_MESSAGE_BYTES
"""A line is one request; none may be larger than the farm's largest message. Images
are named by path, so real lines are far shorter."""
MAX_IMAGE_BYTES = MAX_MESSAGE_BYTES

WATCH_SLICE_S = 300.0
"""A watch is reopened (after the last event seen) at least this often, so that a
connection that died silently costs minutes, not the Job's whole deadline."""
CALL_TIMEOUT_S = 60.0
BUSY_WAIT_MAX_S = 60.0
"""A RESOURCE_EXHAUSTED answer asking to retry within this is a busy farm (a full queue, a
rate limit): wait and retry. One asking for longer (a spent budget, which comes back when
its period turns over) refuses the line."""
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

FINAL_STATES = {pb.RENDER_STATE_SUCCEEDED, pb.RENDER_STATE_FAILED, pb.RENDER_STATE_CANCELLED}
_FINAL_NAMES = {pb.RenderState.Name(s).removeprefix("RENDER_STATE_") for s in FINAL_STATES}
# Answers that say the gateway (or something behind it) is away for now, not that the request is bad.
# (The client has retried the idempotent calls, and keyed submits, a few times already.)
TRANSIENT_ERRORS = (Unavailable, DeadlineExceeded, Internal, Unknown, Aborted, Cancelled)
REFUSED_KEY_ERRORS = (Unauthenticated, PermissionDenied)

# States of a line in the results besides the farm's (SUCCEEDED, FAILED, CANCELLED,
# and QUEUED or RUNNING when the pod stopped before the render ended).
INVALID = "INVALID"
"""The line is not a spec (not JSON, an unknown field, a wrong type, an unreadable image)."""
REFUSED = "REFUSED"
"""The farm refused the spec (a bad value, a spent budget, a key used for another spec)."""
NOT_SUBMITTED = "NOT_SUBMITTED"
"""The pod stopped before it could submit the line."""

TASKS = {"t2v": pb.TASK_TEXT_TO_VIDEO, "i2v": pb.TASK_IMAGE_TO_VIDEO,
         "text-to-video": pb.TASK_TEXT_TO_VIDEO, "image-to-video": pb.TASK_IMAGE_TO_VIDEO}
# A line's fields: the options of `farm submit` (name -> RenderSpec field), with its default
# task and its meaning of 0 ("the model's default") for the sizes. `model` is required: a
# batch that silently fell back to `farm submit`'s tiny default would render on random weights.
STRING_FIELDS = {"model": "model", "prompt": "prompt", "negative_prompt": "negative_prompt"}
DEFAULT_IS_ZERO_FIELDS = {"width": "width", "height": "height", "frames": "num_frames", "fps": "fps",
                          "steps": "num_inference_steps"}
INTEGER_FIELDS = {**DEFAULT_IS_ZERO_FIELDS, "seed": "seed", "priority": "priority"}
MESSAGE_FIELDS = {"postprocess": pb.PostprocessSpec, "placement": pb.Placement}
"""Not `farm submit` options, but part of a spec: written as the protobuf JSON mapping of
their messages (e.g. {"upscale_factor": 2})."""
FIELDS = sorted([*STRING_FIELDS, *INTEGER_FIELDS, *MESSAGE_FIELDS, "task", "image", "guidance", "labels"])
# What someone used to the RenderSpec message may write instead.
FIELD_HINTS = {"num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance",
               "negative-prompt": "negative_prompt"}


class UsageError(Exception):
    """The command cannot run at all (EXIT_USAGE)."""


class GaveUp(Exception):
    """This pod stops; a retried one can do better (EXIT_RETRYABLE)."""


class LineError(Exception):
    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def owns(self, line_number: int) -> bool:
        return (line_number - 1) % self.count == self.index


def resolve_shard(index: int | None, count: int | None) -> Shard:
    """The shard from --index/--count (or JOB_COMPLETION_INDEX, FARM_BATCH_COMPLETIONS). Neither
    given: the whole manifest (index 0 of 1). An index without its count is refused: it would
    silently leave lines to indexes that never run."""
    if index is None and count is None:
        return Shard(0, 1)
    if count is None:
        raise UsageError(f"index {index} needs the completion count: --count or FARM_BATCH_COMPLETIONS "
                         f"(the Job's spec.completions)")
    if count < 1:
        raise UsageError(f"the completion count must be at least 1; got {count}")
    if index is None:
        if count != 1:
            raise UsageError(f"a count of {count} needs the index: --index or JOB_COMPLETION_INDEX")
        index = 0
    if not 0 <= index < count:
        raise UsageError(f"index {index} is outside 0..{count - 1} (the count is {count}): is "
                         f"FARM_BATCH_COMPLETIONS the Job's spec.completions?")
    return Shard(index, count)


def idempotency_key(job_id: str, line_number: int, line_digest: str) -> str:
    """`batch/<job, readable>/<job digest>/<line>/<line digest>`: the same for every pod of
    the job that submits the line, different for another job, another line or an edited
    line. The readable part is cut to keep the key within MAX_IDEMPOTENCY_KEY_CHARS; the
    digest of the whole identity keeps two long identities with a common start apart."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "-", job_id)[:40]
    job_digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    key = f"batch/{readable}/{job_digest}/{line_number}/{line_digest[:24]}"
    assert len(key) <= MAX_IDEMPOTENCY_KEY_CHARS, key
    return key


def line_digest(text: bytes, image: bytes = b"") -> str:
    digest = hashlib.sha256(text)
    if image:
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ManifestLine:
    number: int
    text: bytes
    """Without its line ending."""
    too_long: int = 0
    """Where the line is longer than the limit, the limit (and the text is empty)."""


def read_manifest(url: str, shard: Shard, max_lines: int = MAX_MANIFEST_LINES,
                  max_line_bytes: int = MAX_LINE_BYTES) -> list[ManifestLine]:
    """The shard's non-blank lines, read in one pass holding at most one line (of at most
    `max_line_bytes`) besides them. A manifest of more than `max_lines` lines is refused
    whole (UsageError): every index would refuse it alike."""
    import fsspec

    owned: list[ManifestLine] = []
    number = 0
    try:
        with fsspec.open(url, "rb") as stream:
            while text := stream.readline(max_line_bytes + 1):
                number += 1
                if number > max_lines:
                    raise UsageError(f"{url} has more than {max_lines} lines; split the batch into several "
                                     f"Jobs with a manifest each")
                too_long = len(text) > max_line_bytes and not text.endswith(b"\n")
                rest = text if too_long else b""
                while rest and not rest.endswith(b"\n"):  # the rest of a long line, read and dropped
                    rest = stream.readline(1 << 20)
                if not shard.owns(number):
                    continue
                if too_long:
                    owned.append(ManifestLine(number, b"", too_long=max_line_bytes))
                elif text.strip():
                    owned.append(ManifestLine(number, text.rstrip(b"\r\n")))
    except FileNotFoundError:
        raise UsageError(f"manifest {url} not found") from None
    except (ValueError, ImportError) as error:  # no such protocol, or its package is missing
        raise UsageError(f"manifest {url}: {error}") from None
    except OSError as error:
        raise GaveUp(f"manifest {url} could not be read: {error}") from None
    return owned


def parse_line(line: ManifestLine, manifest_url: str) -> tuple[pb.RenderSpec, bytes]:
    """The line's spec (without its idempotency key) and its image; LineError names the
    field that is wrong."""
    from google.protobuf import json_format

    if line.too_long:
        raise LineError("", f"is longer than {line.too_long} bytes, the farm's message limit")
    try:
        data = json.loads(line.text)
    except UnicodeDecodeError:
        raise LineError("", "is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise LineError("", f"is not JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(data, dict):
        raise LineError("", f"must be a JSON object (a render spec); got {type(data).__name__}")
    for name in data:
        if name == "idempotency_key":
            raise LineError(name, "is set by farm batch, from the job's identity and the line")
        if name not in FIELDS:
            hint = f" (farm batch calls it {FIELD_HINTS[name]!r})" if name in FIELD_HINTS else ""
            raise LineError(name, f"is not a field{hint}; fields: {', '.join(FIELDS)}")

    if "model" not in data:
        raise LineError("model", "is required (the farm's models: farm models list)")
    spec = pb.RenderSpec(task=pb.TASK_TEXT_TO_VIDEO)
    for name, field in STRING_FIELDS.items():
        if name in data:
            if not isinstance(data[name], str):
                raise LineError(name, f"must be a string; got {json.dumps(data[name])[:64]}")
            setattr(spec, field, data[name])
    if "task" in data:
        if data["task"] not in TASKS:
            raise LineError("task", f"{json.dumps(data['task'])[:64]} is not one of {', '.join(sorted(TASKS))}")
        spec.task = TASKS[data["task"]]
    for name, field in INTEGER_FIELDS.items():
        value = data.get(name)
        if value is None or (name in DEFAULT_IS_ZERO_FIELDS and value == 0):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LineError(name, f"must be an integer; got {json.dumps(value)[:64]}")
        try:
            setattr(spec, field, value)
        except ValueError:
            raise LineError(name, f"{value} is out of range") from None
    if data.get("guidance") is not None:
        value = data["guidance"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LineError("guidance", f"must be a number; got {json.dumps(value)[:64]}")
        spec.guidance_scale = value
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise LineError("labels", "must be an object of strings, such as {\"shot\": \"12\"}")
    spec.labels.update(labels)
    for name, message_class in MESSAGE_FIELDS.items():
        if name in data:
            try:
                getattr(spec, name).CopyFrom(json_format.ParseDict(data[name], message_class()))
            except json_format.ParseError as error:
                raise LineError(name, str(error)[:256]) from None
    image = b""
    if data.get("image"):
        image = _read_image(data["image"], manifest_url)
        spec.image = image
    return spec, image


def _read_image(name: Any, manifest_url: str) -> bytes:
    """An image named by a path or URL; a relative one is beside the manifest."""
    import fsspec

    if not isinstance(name, str):
        raise LineError("image", "must be a path or URL (relative to the manifest's folder)")
    url = name if "://" in name or name.startswith("/") else posixpath.join(posixpath.dirname(manifest_url), name)
    try:
        with fsspec.open(url, "rb") as stream:
            image = stream.read(MAX_IMAGE_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise LineError("image", f"{url} cannot be read") from None
    except (ValueError, ImportError) as error:
        raise LineError("image", f"{url}: {error}") from None
    if len(image) > MAX_IMAGE_BYTES:
        raise LineError("image", f"{url} is larger than {MAX_IMAGE_BYTES} bytes")
    return image


@dataclasses.dataclass
class LineResult:
    """One line's record in the results file."""

    line: int
    state: str
    render_id: str = ""
    cost_dollars: float = 0.0
    artifact_uri: str = ""
    error: str = ""
    idempotency_key: str = ""

    def update(self, render: pb.Render) -> None:
        self.render_id = render.id
        self.state = pb.RenderState.Name(render.state).removeprefix("RENDER_STATE_")
        self.cost_dollars = render.cost.total_dollars
        self.artifact_uri = render.artifact_uri
        self.error = render.error


def results_url(results: str, shard: Shard) -> str:
    """Where the shard writes its results: `{index}` in `results` replaced by the index;
    else `results` is a folder (or prefix) that gets results-<index>.jsonl; a .jsonl path
    is taken as it is only by a batch of one index (several would overwrite it)."""
    if "{index}" in results:
        return results.replace("{index}", str(shard.index))
    if results.endswith(".jsonl"):
        if shard.count > 1:
            raise UsageError(f"--results {results} would be written by all {shard.count} indexes: name a folder, "
                             f"or put {{index}} in the name")
        return results
    return f"{results.rstrip('/')}/results-{shard.index}.jsonl"


def check_results_url(url: str) -> None:
    """A results location that can never be written is refused before anything is submitted."""
    from fsspec.core import url_to_fs

    try:
        url_to_fs(url)
    except (ValueError, ImportError) as error:
        raise UsageError(f"--results {url}: {error}") from None


def write_results(url: str | None, results: Iterable[LineResult]) -> None:
    """The records as JSONL, in line order; a local file is replaced whole (a reader never
    sees half of it), as an object store's is by its upload."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    body = "".join(json.dumps(dataclasses.asdict(r), sort_keys=True) + "\n" for r in results).encode()
    if url is None:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return
    fs, path = url_to_fs(url)
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
            partial = f"{path}.partial"
            with fs.open(partial, "wb") as stream:
                stream.write(body)
            os.replace(partial, path)
        else:
            with fs.open(path, "wb") as stream:
                stream.write(body)
    except OSError as error:
        raise GaveUp(f"results {url} could not be written: {error}") from None


def _status(error: FarmError) -> str:
    return f"{error.code().name}: {error.details()}"


def _field_violations(error: FarmError) -> str:
    """The BadRequest field violations of an answer as `field: description; ...`."""
    return "; ".join(f"{field}: {description}" if field else description
                     for field, description in error.field_violations.items())


def _busy_delay(error: FarmError) -> float | None:
    """How long a busy farm (a full queue, a rate limit) asks to wait; None where the answer
    is not that, or asks for longer than BUSY_WAIT_MAX_S (a spent budget)."""
    if isinstance(error, ResourceExhausted) and error.retry_after_s is not None \
            and error.retry_after_s <= BUSY_WAIT_MAX_S:
        return error.retry_after_s
    return None


class BatchRun:
    """Submits a shard's lines and follows their renders. Trouble that passes (the gateway
    away, a busy farm) is waited out; the gateway away for longer than `retry_for_s`, or
    `deadline_s` passed, ends the run with GaveUp."""

    def __init__(self, client: FarmClient, job_id: str, manifest_url: str, *, retry_for_s: float = 300.0,
                 deadline_s: float = 0.0, max_in_flight: int = 0, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.client, self.job_id, self.manifest_url = client, job_id, manifest_url
        self.retry_for_s, self.max_in_flight = retry_for_s, max_in_flight
        self.log, self.clock, self.sleep = log, clock, sleep
        self.deadline = clock() + deadline_s if deadline_s > 0 else None
        self.trouble_since: float | None = None
        self.backoff = FIRST_BACKOFF_S

    def run(self, lines: list[ManifestLine], results: dict[int, LineResult]) -> None:
        """Fills `results` (line number -> record) as it goes, so that a caller that catches
        GaveUp still writes what is known."""
        for line in lines:
            results[line.number] = LineResult(line.number, NOT_SUBMITTED)
        in_flight: deque[LineResult] = deque()
        for line in lines:
            result = results[line.number]
            try:
                spec, image = self._parse(line)
            except LineError as error:
                result.state, result.error = INVALID, str(error)
                self.log(f"line {line.number}: {error}")
                continue
            spec.idempotency_key = result.idempotency_key = idempotency_key(
                self.job_id, line.number, line_digest(line.text, image))
            if self._submit(spec, result, in_flight) and result.state not in _FINAL_NAMES:
                in_flight.append(result)
            while self.max_in_flight and len(in_flight) >= self.max_in_flight:
                self._follow(in_flight.popleft())
        while in_flight:
            self._follow(in_flight.popleft())

    def _parse(self, line: ManifestLine) -> tuple[pb.RenderSpec, bytes]:
        while True:
            self._check_deadline()
            try:
                return parse_line(line, self.manifest_url)
            except OSError as error:  # its image's store is away; a missing image is a LineError
                self._trouble(f"line {line.number}: image: {error}")

    def _submit(self, spec: pb.RenderSpec, result: LineResult, in_flight: deque[LineResult]) -> bool:
        while True:
            self._check_deadline()
            try:
                render = self.client.submit(spec, timeout=CALL_TIMEOUT_S)
            except FarmError as error:
                if isinstance(error, REFUSED_KEY_ERRORS):
                    raise UsageError(f"the gateway refused the API key: {_status(error)}") from None
                delay = _busy_delay(error)
                if delay is not None:
                    self._answered()
                    if in_flight:  # the farm is busy: see one of ours to its end meanwhile
                        oldest = in_flight.popleft()
                        self.log(f"line {result.line}: farm busy ({error.details()}); following line "
                                 f"{oldest.line} meanwhile")
                        self._follow(oldest)
                    else:
                        self._wait(delay, f"line {result.line}: farm busy ({error.details()})")
                    continue
                if isinstance(error, TRANSIENT_ERRORS):
                    self._trouble(f"line {result.line}: submit: {_status(error)}")
                    continue
                result.state = REFUSED
                result.error = _field_violations(error) or _status(error)
                self.log(f"line {result.line}: refused: {result.error}")
                return False
            self._answered()
            result.update(render)
            self.log(f"line {result.line}: {render.id} {result.state}")
            return True

    def _follow(self, result: LineResult) -> None:
        """Watches the render to its final state, resuming after the last event seen when
        the stream breaks or its slice of time ends, then records the final render."""
        last_sequence = 0
        while True:
            self._check_deadline()
            slice_s = WATCH_SLICE_S if self.deadline is None else min(WATCH_SLICE_S, self.deadline - self.clock())
            stream = self.client.watch(result.render_id, after_sequence=last_sequence, timeout=max(slice_s, 0.1))
            try:
                for event in stream:
                    self._answered()
                    last_sequence = event.sequence
                    if event.state in FINAL_STATES:
                        break
            except FarmError as error:
                # DEADLINE_EXCEEDED: the slice ended (a long wait in the queue, or a connection
                # that died silently); the get below tells which.
                if not isinstance(error, DeadlineExceeded):
                    if self._lost(error, result, "watch"):
                        return
                    continue
            finally:
                stream.cancel()  # a no-op once the stream ended
            try:
                render = self.client.get(result.render_id, timeout=CALL_TIMEOUT_S)
            except FarmError as error:
                if self._lost(error, result, "get"):
                    return
                continue
            self._answered()
            if render.state in FINAL_STATES:
                result.update(render)
                self.log(f"line {result.line}: {render.id} {result.state} ${result.cost_dollars:.6f}"
                         + (f": {render.error}" if render.error else ""))
                return

    def _lost(self, error: FarmError, result: LineResult, call: str) -> bool:
        """Waits out a passing trouble (False: try again); records an answer that will not
        change (True: the line is done with)."""
        if isinstance(error, REFUSED_KEY_ERRORS):
            raise UsageError(f"the gateway refused the API key: {_status(error)}") from None
        delay = _busy_delay(error)
        if delay is not None:  # too many watches or reads at once
            self._answered()
            self._wait(delay, f"line {result.line}: {call} {result.render_id}: farm busy ({error.details()})")
            return False
        if isinstance(error, (*TRANSIENT_ERRORS, ResourceExhausted)):
            self._trouble(f"line {result.line}: {call} {result.render_id}: {_status(error)}")
            return False
        result.state, result.error = REFUSED, _status(error)
        self.log(f"line {result.line}: {call} {result.render_id}: {result.error}")
        return True

    def _answered(self) -> None:
        self.trouble_since, self.backoff = None, FIRST_BACKOFF_S

    def _trouble(self, what: str) -> None:
        """The gateway did not answer: wait a little longer each time, up to retry_for_s in all."""
        now = self.clock()
        if self.trouble_since is None:
            self.trouble_since = now
        if now - self.trouble_since >= self.retry_for_s:
            raise GaveUp(f"{what}; no answer for {now - self.trouble_since:.0f} s (--retry-for {self.retry_for_s:g})")
        self._wait(self.backoff, what)
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)

    def _wait(self, seconds: float, why: str) -> None:
        if self.deadline is not None and self.clock() + seconds > self.deadline:
            raise GaveUp(f"{why}; the deadline passes before a retry")
        self.log(f"{why}; retrying in {seconds:.1f} s")
        self.sleep(seconds)

    def _check_deadline(self) -> None:
        if self.deadline is not None and self.clock() >= self.deadline:
            raise GaveUp("the deadline (--deadline) passed")



def exit_code(results: Iterable[LineResult]) -> int:
    return EXIT_SUCCEEDED if all(r.state == "SUCCEEDED" for r in results) else EXIT_FAILED


class _Stopped(Exception):
    pass


# SIGTERM only raises this flag: an exception raised by a signal handler in the middle of
# a gRPC call can leave the channel's locks held, and the pod then never exits. The batch
# runs in a thread of its own (`_until_stopped`); the main thread looks at the flag.
_stop_requested = threading.Event()
STOP_POLL_S = 0.2


def _stop(signum, frame) -> None:
    _stop_requested.set()


def _until_stopped(work: Callable[[], None]) -> None:
    """Runs `work` in a thread and returns when it does (raising what it raised), or raises
    _Stopped as soon as SIGTERM asked to stop; closing the client then ends its calls."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as error:  # handed to the main thread
            failure.append(error)

    worker = threading.Thread(target=target, name="batch", daemon=True)
    worker.start()
    while worker.is_alive():
        if _stop_requested.is_set():
            raise _Stopped()
        worker.join(STOP_POLL_S)
    if failure:
        raise failure[0]


def run_batch(client_factory: Callable[[], FarmClient], manifest: str, job_id: str, shard: Shard,
              results: str | None, *, retry_for_s: float = 300.0, deadline_s: float = 0.0, max_in_flight: int = 0,
              log: Callable[[str], None] = print) -> int:
    """One shard of the batch from start to results file; returns the exit code."""
    try:
        if not job_id:
            raise UsageError("no job identity: --job-id or FARM_BATCH_JOB_ID (in a Job, its name or uid from the "
                             "downward API), so that a retried pod submits under the same idempotency keys")
        url = results_url(results, shard) if results is not None else None
        if url is not None:
            check_results_url(url)
        lines = read_manifest(manifest, shard)
    except UsageError as error:
        log(f"error: {error}")
        return EXIT_USAGE
    except (GaveUp, _Stopped) as error:
        log(f"error: {error or 'told to stop (SIGTERM)'}")
        return EXIT_RETRYABLE
    log(f"index {shard.index} of {shard.count} (job {job_id}): {len(lines)} lines of {manifest}")
    outcome: dict[int, LineResult] = {}
    code = None
    try:
        if _stop_requested.is_set():
            raise _Stopped()
        with client_factory() as client:
            batch = BatchRun(client, job_id, manifest, retry_for_s=retry_for_s, deadline_s=deadline_s,
                             max_in_flight=max_in_flight, log=log)
            _until_stopped(lambda: batch.run(lines, outcome))
    except UsageError as error:
        log(f"error: {error}")
        return EXIT_USAGE
    except GaveUp as error:
        log(f"stopping, to be retried: {error}")
        code = EXIT_RETRYABLE
    except _Stopped:
        log("stopping, to be retried: told to stop (SIGTERM)")
        code = EXIT_RETRYABLE
    records = [outcome[n] for n in sorted(outcome)]
    try:
        write_results(url, records)
    except GaveUp as error:
        log(f"error: {error}")
        return EXIT_RETRYABLE
    if code is None:
        code = exit_code(records)
    states: dict[str, int] = {}
    for record in records:
        states[record.state] = states.get(record.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no lines"
    log(f"index {shard.index}: {summary}; results in {url or 'stdout'}; exit {code}")
    return code


def batch_command(make_client: Callable[[str, Optional[str], Optional[Path]], FarmClient]) -> Callable[..., None]:
    """The `farm batch` command; `make_client(target, api_key, config_path)` connects as the
    other commands do (the `farm` command's TLS options), so this module needs none of them."""

    def batch(
        manifest: str = typer.Argument(..., help="JSONL of render specs, one a line, with the fields of `farm submit`: "
                                                 "a path or an fsspec URL (s3://...)."),
        results: Optional[str] = typer.Option(
            None, "--results", envvar="FARM_BATCH_RESULTS",
            help="Folder or fsspec URL prefix for results-<index>.jsonl (or a name with {index}); default: stdout."),
        job_id: Optional[str] = typer.Option(
            None, "--job-id", envvar="FARM_BATCH_JOB_ID",
            help="The job's identity, part of every idempotency key: the same for every retry of the job's pods."),
        index: Optional[int] = typer.Option(None, "--index", envvar="JOB_COMPLETION_INDEX", min=0,
                                            help="This shard; default: the Indexed Job's JOB_COMPLETION_INDEX."),
        count: Optional[int] = typer.Option(None, "--count", envvar="FARM_BATCH_COMPLETIONS", min=1,
                                            help="How many shards: the Job's spec.completions."),
        retry_for: float = typer.Option(300.0, "--retry-for", min=0,
                                        help="Seconds to keep retrying a gateway that does not answer; then exit 75."),
        deadline: float = typer.Option(0.0, "--deadline", min=0,
                                       help="Stop after this many seconds and exit 75 (0: no deadline)."),
        max_in_flight: int = typer.Option(0, "--max-in-flight", min=0,
                                          help="Renders submitted and not yet ended at once (0: no limit)."),
        target: str = typer.Option("127.0.0.1:50051", "--target", envvar="FARM_TARGET", help="Gateway address."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FARM_API_KEY",
                                              help="API key (default: the default tenant's)."),
        config_path: Optional[Path] = typer.Option(None, "--config", "-c", envvar="FARM_CONFIG",
                                                   help="farm YAML config file."),
    ):
        """Run one shard of a manifest of renders (one pod of an Indexed Job); exit 0: all
        succeeded, 2: unusable command or manifest, 65: some lines failed (not retryable),
        75: retryable."""
        def connect() -> FarmClient:
            try:
                return make_client(target, api_key, config_path)
            except (NoApiKey, typer.BadParameter, ValueError) as error:  # no API key; half a TLS pair
                raise UsageError(str(error)) from None

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        try:
            shard = resolve_shard(index, count)
        except UsageError as error:
            log(f"error: {error}")
            raise typer.Exit(EXIT_USAGE) from None
        _stop_requested.clear()
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            code = run_batch(connect, manifest, job_id or "", shard, results,
                             retry_for_s=retry_for, deadline_s=deadline, max_in_flight=max_in_flight, log=log)
        finally:
            signal.signal(signal.SIGTERM, previous)
        raise typer.Exit(code)

    return batch
