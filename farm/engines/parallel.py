"""Context parallelism: one render's denoiser spread over several devices.

`ParallelEngine` is a `DiffusersEngine` (rank 0, in this process) plus ``degree - 1``
worker processes (ranks 1..N-1) that it starts, each with the same model on its own
device (``cuda:<rank>`` on a GPU node, the CPU otherwise). diffusers' context parallelism
(`ModelMixin.enable_parallelism`) splits the transformer's token sequence over the ranks:
Ulysses (the default) trades the sequence split for a head split with an all-to-all
around each attention; ring passes key/value chunks around instead. Every rank therefore
runs the same `DiffusersEngine.render` on the same request, in lockstep:

- rank 0 sends each worker the request (and a resume checkpoint) over a socket, then
  all ranks render (each encodes the prompt itself). Every stop or preemption check of the engine is a decision rank 0 makes
  and broadcasts (a one-element ``torch.distributed.broadcast``): every rank gets the
  same answers, so every rank leaves the loop at the same step, and the same way
  (cancelled, preempted, finished). The engine's checks inside a step (between the
  transformer's layers) answer "no" without asking, on every rank: a parallel render is
  preempted at step boundaries only.
- only rank 0 decodes: a worker's progress callback stops its render when the engine
  reaches Stage.DECODING, and it reports how its render ended. Rank 0 compares every
  rank's ending with its own; a rank that ended otherwise, died, or did not answer in
  time leaves the engine *broken*: its workers are killed, `render` and `check_health`
  raise, and Serve replaces the replica.
- an exception of rank 0's `on_progress` or of its checks (the workers wait for the
  next decision) does not leave them waiting: it is held, the next stop decision says
  stop, and it is raised when every rank has stopped. A render that fails the same way
  on every rank (e.g. a bad request) leaves the group as it was.

Workers are fresh interpreters (``python -m farm.engines.parallel``) that exit when
their parent is gone (killed or exited; they check twice a second), so a replica leaves
none behind; `close` stops them and waits for them.

Verified on CPU with gloo (tests/unit/test_parallel.py, 2 ranks, the first family's tiny
model, Ulysses, text- and image-to-video): bitwise equal to a single-process render. What
diffusers 0.42.1 needs for that:

- `_resolve_parallel_config` computes ``rank % torch.accelerator.device_count()``, which
  is 0 on a CPU-only torch (ZeroDivisionError); on a CPU device, `enable_context_parallel`
  makes it count 1 for that call (the device it records is not used on the CPU).
- `TemplatedUlyssesAttention` all-gathers a 4-D attention mask along keys but leaves its
  head axis whole, while each rank then holds ``heads / degree`` heads; a masked
  cross-attention fails ("output with shape [2, 1, 8, 128] doesn't match the
  broadcast shape [2, 2, 8, 128]"), on any device (huggingface/diffusers#14316, fix
  proposed in #14317). `enable_context_parallel` gives the attention of the transformer's
  module the rank's own heads of such a mask (exact: the all-to-all hands rank r heads
  ``r*H/N .. (r+1)*H/N - 1``).
- A plan may miss an input (a per-token timestep of image-to-video): the family module
  completes it (`_plan`).

The token sequence (with the text tokens, where the plan splits them too) must divide by the degree; a render
whose does not fails on every rank and is refused with a ValueError.

Not available: ring on the CPU (ring needs each chunk's log-sum-exp; diffusers' only
CPU-capable backend, "native", has none: "Native attention does not support
return_lse=True"); ring with a transformer whose plan splits an attention mask:
diffusers' ring attention uses the local mask for every key chunk, which
is wrong. Not verified here (no GPU): NCCL on GPUs, the "_native_cudnn" and flash
backends, and the speed-up (benchmarks/parallel_step.py measures it).

Only the eager backend without step caching: a compiled or exported transformer has no
parallel hooks, and First-Block Cache decides on each rank's own part of the residual,
so the ranks could disagree about skipping a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from farm.config import ModelConfig
    from farm.domain.engine import (
        DenoiseCheckpoint,
        EngineRequest,
        Progress,
        RenderOutput,
    )
    from farm.engines.pipeline_engine import DiffusersEngine

log = logging.getLogger(__name__)

Mode = Literal["ulysses", "ring"]
MODES = ("ulysses", "ring")
# Attention backends by mode where none is given: Ulysses runs any backend on the whole
# sequence of its heads ("native" is SDPA, on every device); ring needs one that returns
# the log-sum-exp of each chunk (cuDNN attention through SDPA, bf16/fp16 on CUDA).
DEFAULT_ATTENTION_BACKEND = {"ulysses": "native", "ring": "_native_cudnn"}
RING_ON_CPU = ("ring attention needs each key chunk's log-sum-exp, which diffusers' only CPU attention backend "
               "('native') does not return")
# How long a rank waits in a collective, and rank 0 for a worker's answer, before the
# group counts as broken. Ranks run the same work in lockstep, so a healthy one waits
# for milliseconds; a model load on each device happens before any collective.
DEFAULT_TIMEOUT_S = 300.0
# How long a worker may take to start and load the model.
DEFAULT_START_TIMEOUT_S = 900.0
# How often a worker checks that the process that started it is still there.
PARENT_CHECK_S = 0.5


def _on_every_rank(timings: list, degree: int) -> list:
    """Rank 0's phase timings as the device-seconds of the whole group (what metering charges)."""
    from farm.domain.events import PhaseTiming

    return [PhaseTiming(t.phase, t.device_kind, t.seconds * degree) for t in timings]


class ParallelGroupBroken(RuntimeError):
    """The ranks no longer run in lockstep (one died, hung, or ended a render otherwise)."""


# -------------------------------------------------------------------------------------
# Enabling diffusers' context parallelism on a transformer (every rank)
# -------------------------------------------------------------------------------------

def context_parallel_unsupported(transformer: torch.nn.Module, degree: int, mode: str,
                                 device: torch.device) -> str | None:
    """Why this transformer cannot be split over `degree` ranks in `mode` here, or None."""
    if mode not in MODES:
        return f"mode must be one of {MODES}, got {mode!r}"
    if degree < 2:
        return f"degree must be at least 2, got {degree}"
    plan = getattr(transformer, "_cp_plan", None)
    if not plan:
        return f"{type(transformer).__name__} has no context-parallel plan (_cp_plan) in diffusers"
    heads = getattr(transformer.config, "num_attention_heads", None)
    if mode == "ulysses" and heads is not None and heads % degree:
        return f"Ulysses splits the attention heads: {heads} heads are not divisible by degree {degree}"
    if mode == "ring":
        if device.type == "cpu":
            return RING_ON_CPU
        split_masks = sorted(name for inputs in plan.values() if isinstance(inputs, dict)
                             for name in inputs if isinstance(name, str) and "mask" in name)
        if split_masks:
            return (f"{type(transformer).__name__} splits an attention mask ({', '.join(split_masks)}) and "
                    "diffusers' ring attention uses each rank's own mask for every key chunk (wrong results); "
                    "use mode='ulysses'")
    return None


def enable_context_parallel(transformer: torch.nn.Module, degree: int, mode: str = "ulysses",
                            attention_backend: str | None = None) -> None:
    """Sets the attention backend and enables diffusers' context parallelism on a
    transformer, with the two work-arounds of the module docstring. torch.distributed
    must be initialised with `degree` ranks; every rank calls this in the same order
    (it creates process groups)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    device = next(transformer.parameters()).device
    reason = context_parallel_unsupported(transformer, degree, mode, device)
    if reason is not None:
        raise ValueError(f"context parallelism: {reason}")
    if not dist.is_initialized() or dist.get_world_size() != degree:
        raise RuntimeError(f"context parallelism over {degree} ranks needs torch.distributed initialised with "
                           f"{degree} ranks")
    transformer.set_attention_backend(attention_backend or DEFAULT_ATTENTION_BACKEND[mode])
    _shard_ulysses_mask_heads(type(transformer).__module__)
    config = ContextParallelConfig(**{f"{mode}_degree": degree})
    with _accelerator_count_for_cpu(device):
        transformer.enable_parallelism(config=config, cp_plan=_plan(transformer))


def _plan(transformer: torch.nn.Module) -> dict:
    """The transformer's context-parallel plan, completed where diffusers 0.42.1's misses an
    input: each family module may complete the plan of its transformer
    (``complete_context_parallel_plan(transformer, plan)``)."""
    from farm.families import FAMILY_MODULES, family_module

    plan = dict(transformer._cp_plan)
    for family in FAMILY_MODULES:
        complete = getattr(family_module(family), "complete_context_parallel_plan", None)
        if complete is not None:
            plan = complete(transformer, plan)
    return plan


@contextlib.contextmanager
def _accelerator_count_for_cpu(device: torch.device) -> Iterator[None]:
    """diffusers 0.42.1 picks its device as ``rank % torch.accelerator.device_count()``,
    a division by zero on a CPU-only torch: on a CPU device, count 1 meanwhile."""
    import torch

    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _shard_ulysses_mask_heads(module_name: str) -> None:
    """Wraps the `dispatch_attention_fn` that a transformer module's attention calls so
    that under Ulysses a 4-D mask with a head axis keeps only this rank's heads
    (huggingface/diffusers#14316). Idempotent; nothing changes without parallelism."""
    module = sys.modules.get(module_name)
    dispatch = getattr(module, "dispatch_attention_fn", None)
    if dispatch is None or getattr(dispatch, "_farm_shards_mask_heads", False):
        return

    def dispatch_attention_fn(query, key, value, attn_mask=None, *args, **kwargs):
        parallel = kwargs.get("parallel_config")
        cp = getattr(parallel, "context_parallel_config", None)
        if (attn_mask is not None and cp is not None and cp.ulysses_degree > 1 and cp.ring_degree == 1
                and not cp.ulysses_anything and attn_mask.ndim == 4 and attn_mask.shape[1] == query.shape[2] > 1):
            # After the all-to-all, rank r holds heads r*H/N .. (r+1)*H/N - 1 (H/N consecutive heads).
            local_heads = query.shape[2] // cp.ulysses_degree
            start = cp._ulysses_local_rank * local_heads
            attn_mask = attn_mask[:, start:start + local_heads]
        return dispatch(query, key, value, attn_mask, *args, **kwargs)

    dispatch_attention_fn._farm_shards_mask_heads = True
    module.dispatch_attention_fn = dispatch_attention_fn


# -------------------------------------------------------------------------------------
# Decisions every rank takes together
# -------------------------------------------------------------------------------------

class _InsideForward:
    """Counts how deep this thread is inside the denoisers' forward calls: the engine's
    checks between layers come from inside, its step-boundary checks from outside."""

    def __init__(self, denoisers: list[torch.nn.Module]):
        self.depth = 0
        for denoiser in denoisers:
            denoiser.register_forward_pre_hook(self._enter)
            denoiser.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth -= 1


class _StepDecisions:
    """The stop and preemption checks one rank hands its engine: rank 0 (the leader)
    asks its own checks and broadcasts each answer; the other ranks take it. Both make
    the same calls in the same order, because the engine takes the same path on every
    rank when its answers agree."""

    def __init__(self, device: torch.device, inside: _InsideForward, leader: bool,
                 should_stop: Callable[[], bool] | None = None,
                 should_preempt: Callable[[], bool] | None = None,
                 on_progress: Callable[[Progress], None] | None = None, degree: int = 1):
        import torch

        self.degree = degree
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._inside, self._leader = inside, leader
        self._should_stop, self._should_preempt, self._on_progress = should_stop, should_preempt, on_progress
        self.held_error: BaseException | None = None
        self.last_step = 0
        inside.depth = 0  # a forward that raised never left

    def _agree(self, decide: Callable[[], bool] | None, if_it_fails: bool) -> bool:
        import torch.distributed as dist

        if self._leader:
            try:
                decision = bool(decide())
            except BaseException as error:
                self.held_error = self.held_error or error
                decision = if_it_fails
            self._flag.fill_(int(decision))
        dist.broadcast(self._flag, src=0)
        return bool(self._flag.item())

    def should_stop(self) -> bool:
        return self._agree(lambda: self.held_error is not None or self._should_stop(), if_it_fails=True)

    def should_preempt(self) -> bool:
        if self._inside.depth > 0:
            return False  # between layers: parallel renders are preempted at step boundaries only
        # A failed check does not preempt; the stop check that follows at the next step stops.
        return self._agree(self._should_preempt, if_it_fails=False)

    def on_progress(self, progress: Progress) -> None:
        from farm.domain.states import Stage

        if progress.stage == Stage.DENOISING:
            self.last_step = progress.step
        if not self._leader:
            if progress.stage == Stage.DECODING:
                raise _DenoisingDone()  # only rank 0 decodes
            return
        if self.held_error is not None:
            return
        if progress.step_seconds:
            # Metered as device-seconds: every rank's device was busy for the step.
            progress = dataclasses.replace(progress, step_seconds=progress.step_seconds * self.degree)
        try:
            self._on_progress(progress)
        except BaseException as error:
            self.held_error = error


class _DenoisingDone(Exception):
    """A worker's render reached its decode, which only rank 0 runs."""


def _ending(error: BaseException | None, last_step: int) -> tuple[str, Any]:
    """How a rank's render ended, in a form every rank's can be compared with."""
    from farm.domain.engine import RenderCancelled, RenderPreempted

    if error is None or isinstance(error, _DenoisingDone):
        return ("denoised", last_step)
    if isinstance(error, RenderCancelled):
        return ("cancelled", error.step)
    if isinstance(error, RenderPreempted):
        return ("preempted", error.step)
    return ("failed", type(error).__name__)


# -------------------------------------------------------------------------------------
# Ranks 1..N-1
# -------------------------------------------------------------------------------------

def _rank_model(model: ModelConfig, rank: int, device_type: str) -> ModelConfig:
    return model.model_copy(update={"device": f"cuda:{rank}" if device_type == "cuda" else device_type})


def _watch_parent(parent_pid: int) -> None:
    """Exits this worker when the process that started it is gone (e.g. killed): a worker
    may be blocked in a collective that would otherwise wait for its timeout."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(3)


def _worker_main(connection) -> None:
    """A worker's life: start-up arguments, load, join the group, then render when told."""
    rank, degree, model_json, device_type, mode, attention_backend, init_method, timeout_s, parent_pid = \
        connection.recv()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="farm-parent-watch").start()
    try:
        import torch
        import torch.distributed as dist

        from farm.config import ModelConfig
        from farm.engines.pipeline_engine import DiffusersEngine

        if device_type == "cuda":
            torch.cuda.set_device(rank)
        engine = DiffusersEngine(_rank_model(ModelConfig.model_validate_json(model_json), rank, device_type))
        connection.send(("loaded", None))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                world_size=degree, timeout=datetime.timedelta(seconds=timeout_s))
        denoisers = _distinct_denoisers(engine)
        for denoiser in denoisers:
            enable_context_parallel(denoiser, degree, mode, attention_backend)
        inside = _InsideForward(denoisers)
        connection.send(("ready", None))
    except BaseException:
        connection.send(("failed", traceback.format_exc()))
        return
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            break  # rank 0 is gone
        if message[0] == "close":
            break
        _, request, resume, cpu_threads, preemptible = message
        decisions = _StepDecisions(engine.device, inside, leader=False)
        error: BaseException | None = None
        try:
            engine.render(request, decisions.on_progress, decisions.should_stop,
                          decisions.should_preempt if preemptible else None, resume=resume, cpu_threads=cpu_threads)
        except BaseException as failure:
            error = failure
        detail = None if error is None or isinstance(error, _DenoisingDone) else repr(error)
        connection.send(("ended", _ending(error, decisions.last_step), detail))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _distinct_denoisers(engine: DiffusersEngine) -> list[torch.nn.Module]:
    """The engine's denoisers, each once, in the same order on every rank."""
    distinct: dict[int, Any] = {}
    for pipe in engine.pipelines.values():
        denoiser = engine.denoiser(pipe)
        distinct.setdefault(id(denoiser), denoiser)
    return list(distinct.values())


class _Channel(Connection):
    """A socket connection that pickles plainly: multiprocessing's pickler would hand CPU
    tensors over as shared memory through its resource sharer, which only serves the
    processes that multiprocessing itself started."""

    def send(self, obj: Any) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Worker:
    """Rank `rank`: a `python -m farm.engines.parallel` process and a socket to it. A fresh
    interpreter, not multiprocessing's spawn, which would import the replica's __main__
    (Ray's worker script) again in every worker."""

    def __init__(self, rank: int, arguments: tuple):
        ours, theirs = socket.socketpair()
        # The interpreter's import path, so that the worker finds what this process found.
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.rank = rank
        self.process = subprocess.Popen([sys.executable, "-m", "farm.engines.parallel", str(theirs.fileno())], pass_fds=[theirs.fileno()], env=environment,
                                        stdin=subprocess.DEVNULL)
        theirs.close()
        self.connection = _Channel(ours.detach())
        self.connection.send(arguments)

    def alive(self) -> bool:
        return self.process.poll() is None

    def expect(self, kind: str, deadline: float) -> tuple:
        """The worker's next message, which must be of `kind`; raises ParallelGroupBroken otherwise."""
        while not self.connection.poll(0.2):
            if not self.alive():
                raise ParallelGroupBroken(f"rank {self.rank} (pid {self.process.pid}) exited with code "
                                          f"{self.process.returncode} while rank 0 waited for '{kind}'")
            if time.monotonic() > deadline:
                raise ParallelGroupBroken(f"rank {self.rank} did not answer '{kind}' in time")
        try:
            message = self.connection.recv()
        except (EOFError, OSError) as error:
            raise ParallelGroupBroken(f"rank {self.rank}'s pipe closed: {error}") from None
        if message[0] == "failed":
            raise ParallelGroupBroken(f"rank {self.rank} failed to start:\n{message[1]}")
        if message[0] != kind:
            raise ParallelGroupBroken(f"rank {self.rank} answered {message[0]!r}, not {kind!r}")
        return message


# -------------------------------------------------------------------------------------
# Rank 0: the engine the replica uses
# -------------------------------------------------------------------------------------

class ParallelEngine:
    """A `DiffusersEngine` whose renders run over `degree` devices of this node (context
    parallelism); it offers the same `render`, `describe`, `check_health` and attributes.

    One per process (torch.distributed has one default group per process). On a GPU node
    the process must see at least `degree` GPUs (rank r uses cuda:r); on a CPU, every
    rank runs on the CPU (a test of the mechanism, not a speed-up)."""

    def __init__(self, model: ModelConfig, degree: int, mode: Mode = "ulysses", attention_backend: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        import torch
        import torch.distributed as dist

        from farm.engines.loading import resolve_device
        from farm.engines.pipeline_engine import DiffusersEngine

        if mode not in MODES:
            raise ValueError(f"context parallelism: mode must be one of {MODES}, got {mode!r}")
        if degree < 2:
            raise ValueError(f"context parallelism needs a degree of at least 2, got {degree}")
        if model.backend.name != "eager" or model.backend.first_block_cache_threshold is not None:
            raise ValueError(f"model {model.name}: context parallelism runs the eager backend without First-Block "
                             f"Cache (a compiled or exported transformer has no parallel hooks; the step cache "
                             f"decides on each rank's part alone), not {model.backend.name}"
                             + ("" if model.backend.first_block_cache_threshold is None else " with fbc"))
        device_type = resolve_device(model.device).type
        if mode == "ring" and device_type == "cpu":
            raise ValueError(f"model {model.name}: context parallelism: {RING_ON_CPU}")
        if dist.is_initialized():
            raise RuntimeError("context parallelism: torch.distributed is already initialised in this process")
        if device_type == "cuda" and torch.cuda.device_count() < degree:
            raise ValueError(f"model {model.name}: context parallelism over {degree} GPUs, but this process sees "
                             f"{torch.cuda.device_count()}")
        self.degree, self.mode, self.timeout_s = degree, mode, timeout_s
        self.attention_backend = attention_backend or DEFAULT_ATTENTION_BACKEND[mode]
        self.broken: str | None = None
        # How each rank (0 first) ended the last render: ("denoised" | "cancelled" | "preempted", step)
        # or ("failed", the exception's type).
        self.last_endings: list[tuple[str, Any]] = []
        self._closed = False
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        try:
            for rank in range(1, degree):
                self._workers.append(_Worker(rank, (rank, degree, model.model_dump_json(), device_type, mode,
                                                    attention_backend, init_method, timeout_s, os.getpid())))
            if device_type == "cuda":
                torch.cuda.set_device(0)
            self.engine = DiffusersEngine(_rank_model(model, 0, device_type))
            reason = next((r for d in _distinct_denoisers(self.engine)
                           if (r := context_parallel_unsupported(d, degree, mode, self.engine.device))), None)
            if reason is not None:
                raise ValueError(f"model {model.name}: context parallelism: {reason}")
            deadline = time.monotonic() + start_timeout_s
            for worker in self._workers:
                worker.expect("loaded", deadline)
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=0,
                                    world_size=degree, timeout=datetime.timedelta(seconds=timeout_s))
            denoisers = _distinct_denoisers(self.engine)
            for denoiser in denoisers:
                enable_context_parallel(denoiser, degree, mode, attention_backend)
            self._inside = _InsideForward(denoisers)
            for worker in self._workers:
                worker.expect("ready", deadline)
        except BaseException:
            self._stop_workers(graceful=False)
            self._destroy_group()
            raise
        log.info("%s: context parallel (%s) over %d ranks on %s", model.name, mode, degree, device_type)

    # The engine's attributes (model, device, device_kind, backend, supports_checkpoint, ...).
    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet: a failure in __init__
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def render(
        self,
        request: EngineRequest,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        should_preempt: Callable[[], bool] | None = None,
        resume: DenoiseCheckpoint | None = None,
        cpu_threads: int | None = None,
    ) -> RenderOutput:
        """`DiffusersEngine.render` over every rank; raises ParallelGroupBroken (and
        breaks the engine) when the ranks did not end the render the same way."""
        with self._lock:
            self._check_usable()
            preemptible = should_preempt is not None
            try:
                for worker in self._workers:
                    worker.connection.send(("render", request, resume, cpu_threads, preemptible))
            except (OSError, ValueError) as error:
                self._break(f"a worker's pipe is closed: {error}")
                raise ParallelGroupBroken(self.broken) from error
            decisions = _StepDecisions(self.engine.device, self._inside, leader=True, should_stop=should_stop,
                                       should_preempt=should_preempt, on_progress=on_progress,
                                       degree=self.degree)
            output, error = None, None
            try:
                output = self.engine.render(request, decisions.on_progress, decisions.should_stop,
                                            decisions.should_preempt if preemptible else None, resume=resume,
                                            cpu_threads=cpu_threads)
            except BaseException as failure:
                error = failure
            if error is not None and hasattr(error, "timings"):
                error.timings = _on_every_rank(error.timings, self.degree)
            mine = _ending(error, decisions.last_step)
            self.last_endings = [mine]
            deadline = time.monotonic() + self.timeout_s
            try:
                for worker in self._workers:
                    _, theirs, detail = worker.expect("ended", deadline)
                    self.last_endings.append(theirs)
                    if theirs != mine:
                        raise ParallelGroupBroken(f"rank {worker.rank} ended the render {theirs} ({detail}), "
                                                  f"rank 0 {mine}")
            except ParallelGroupBroken as broken:
                self._break(str(broken))
                raise broken from error
            if decisions.held_error is not None:
                raise decisions.held_error
            if isinstance(error, AssertionError) and "divisible by mesh size" in str(error):
                raise ValueError(f"this render cannot be split over {self.degree} ranks: its token sequence is not "
                                 f"divisible by {self.degree} (diffusers: {error})") from error
            if error is not None:
                raise error
            output.notes.append(f"context parallel ({self.mode}) over {self.degree} {self.engine.device_kind} "
                                f"devices")
            output.timings = _on_every_rank(output.timings, self.degree)
            return output

    def check_health(self) -> None:
        self._check_usable()
        for worker in self._workers:
            if not worker.alive():
                self._break(f"rank {worker.rank} (pid {worker.process.pid}) exited with code "
                            f"{worker.process.returncode}")
                raise ParallelGroupBroken(self.broken)
        self.engine.check_health()

    def describe(self) -> dict:
        return {
            **self.engine.describe(),
            "context_parallel": {
                "degree": self.degree,
                "mode": self.mode,
                "attention_backend": self.attention_backend,
                "preemption": "at step boundaries",
                "broken": self.broken,
            },
        }

    def close(self) -> None:
        """Stops and joins the workers and leaves the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._stop_workers(graceful=self.broken is None)
            self._destroy_group()

    def __enter__(self) -> ParallelEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this parallel engine is closed")
        if self.broken is not None:
            raise ParallelGroupBroken(f"context parallel group is broken: {self.broken}")

    def _break(self, reason: str) -> None:
        log.error("%s: context parallel group broken: %s", self.engine.model_name, reason)
        self.broken = reason
        self._stop_workers(graceful=False)

    def _stop_workers(self, graceful: bool) -> None:
        for worker in self._workers:
            if graceful and worker.alive():
                with contextlib.suppress(OSError, ValueError):
                    worker.connection.send(("close",))
        for worker in self._workers:
            if graceful:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(10)
            if worker.alive():
                worker.process.kill()
                worker.process.wait(10)
            worker.connection.close()

    def _destroy_group(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


if __name__ == "__main__":
    # A worker: `python -m farm.engines.parallel <fd of its socket to rank 0>`.
    _worker_main(_Channel(int(sys.argv[1])))
