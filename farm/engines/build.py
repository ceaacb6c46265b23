"""Engine builds: a backend's ahead-of-time artifacts per shape, and the cache replicas load them from.

`build_engine(model, shape)` (what `farm engines build` runs) loads the model's
pipelines, and for each task runs the pipeline at that shape up to its first
transformer call. On exactly that call it

1. computes the eager output (the reference),
2. has the backend build its artifact (ONNX graph, compile caches),
3. loads the artifact as a replica would and runs the same call, and
4. writes the build only if the result is within the backend's tolerance of eager
   (max|built - eager| / max|eager|: 1e-3 in float32, 3e-2 in float16/bfloat16,
   1.5e-1 for FP8), recording the measured error.

Builds live under a cache directory, one directory per key and one subdirectory per
task. The key is a sha256 over everything that makes an artifact reusable: the
weights' sha256, the backend with its options and library versions, the compute
dtype, the shape bucket (width, height, frames, batch), the device architecture
("cpu", or the GPU's compute capability and name) and the First-Block-Cache setting.
A build whose key exists is a cache hit and is not redone.

At start an engine calls `find_builds` with every key field but the shape, and loads
and warms up each build it finds (`DiffusersEngine`); a render whose shape has none
falls back to eager or is refused (`EngineBuildMissing`), as the model's
`backend.missing_build` says. A build whose warm-up output no longer matches the eager
output stored with it is not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.config import ModelConfig
from farm.domain.spec import Task
from farm.engines.backends.shapes import ShapeBucket, parse_shape

if TYPE_CHECKING:
    import torch

    from farm.engines.backends.backend import Backend, CallSignature

log = logging.getLogger(__name__)

ENGINE_FORMAT_VERSION = 1
RECORD_FILE = "engine.json"
SAMPLE_CALL_FILE = "sample-call.pt"
REFERENCE_OUTPUT_FILE = "reference-output.pt"
CALIBRATION_PROMPT = "a red fox running through a snowy forest at dawn, cinematic"
# Recorded in a build for the record; not part of its key (a replica need not have them).
BUILD_TOOLS = ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt",
               "triton", "torchao")
ERROR_MEASURE = "max|built - eager| / max|eager| over one transformer call on the pipeline's inputs"


class EngineBuildMissing(ValueError):
    """A render's shape has no engine build and the model is configured to refuse it."""


class BuildVerificationFailed(RuntimeError):
    """A freshly built artifact does not reproduce the eager output within tolerance."""


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """One task's build, as written in its engine.json."""

    directory: Path
    key: str
    task: Task
    shape: ShapeBucket
    backend: str
    signature: dict[str, Any]
    relative_error: float
    tolerance: float
    fields: dict[str, Any]

    @classmethod
    def read(cls, directory: Path) -> "BuildRecord":
        data = json.loads((directory / RECORD_FILE).read_text())
        return cls(
            directory=directory,
            key=data["key"],
            task=Task(data["task"]),
            shape=ShapeBucket(**data["shape"]),
            backend=data["backend"],
            signature=data["signature"],
            relative_error=data["verification"]["max_relative_error"],
            tolerance=data["verification"]["tolerance"],
            fields=data["fields"],
        )

    def call_signature(self) -> "CallSignature":
        from farm.engines.backends.backend import CallSignature

        return CallSignature.from_json(self.signature)

    def sample_call(self, device: "torch.device") -> dict[str, Any]:
        """The transformer arguments the build was made and verified on, on a device, as
        inference tensors (what a render passes)."""
        import torch

        from farm.engines.backends.backend import as_inference_tensors

        return as_inference_tensors(torch.load(self.directory / SAMPLE_CALL_FILE, weights_only=True), device)

    def reference_output(self) -> "torch.Tensor":
        """The eager transformer's output on the sample call."""
        import torch

        return torch.load(self.directory / REFERENCE_OUTPUT_FILE, weights_only=True)


# Keys -------------------------------------------------------------------------------------


def device_architecture(device: "torch.device") -> str:
    """cpu, or cuda-sm<major><minor>-<GPU name>: TensorRT engines and CUDA graphs are per GPU model."""
    import torch

    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cuda-sm{major}{minor}-{name}"


def engine_key_fields(
    weights_sha256: str, backend: "Backend", first_block_cache_threshold: float | None
) -> dict[str, Any]:
    """Every key field but the shape: what a replica matches builds against at start."""
    import diffusers

    from farm.engines.backends.backend import dtype_name

    fields = backend.key_fields()
    versions = dict(fields.pop("versions", {}))
    # diffusers' model code is what gets exported or compiled, and its pipelines make the calls.
    versions["diffusers"] = diffusers.__version__
    return {
        "format_version": ENGINE_FORMAT_VERSION,
        "weights_sha256": weights_sha256,
        "dtype": dtype_name(backend.dtype),
        "device": device_architecture(backend.device),
        "first_block_cache_threshold": first_block_cache_threshold,
        **fields,
        "versions": versions,
    }


def build_key(base_fields: dict[str, Any], shape: ShapeBucket) -> str:
    """sha256 of the key fields with the shape, in canonical JSON."""
    canonical = json.dumps({**base_fields, "shape": shape.as_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_directory(cache_dir: Path, model_name: str, backend_name: str, shape: ShapeBucket, key: str) -> Path:
    """Where a key's builds live: readable name first, the key's first 16 hex digits last."""
    return Path(cache_dir) / f"{model_name}-{backend_name}-{shape.spec}-b{shape.batch}-{key[:16]}"


def find_builds(cache_dir: Path, base_fields: dict[str, Any]) -> list[BuildRecord]:
    """Every complete build under cache_dir whose key fields, shape aside, equal base_fields."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    records = []
    for record_path in sorted(cache_dir.glob(f"*/*/{RECORD_FILE}")):
        if any(part.startswith(".") for part in record_path.relative_to(cache_dir).parts):
            continue  # a build still being written (or retired)
        try:
            record = BuildRecord.read(record_path.parent)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable engine build %s: %s", record_path.parent, error)
            continue
        fields = {name: value for name, value in record.fields.items() if name != "shape"}
        if fields == base_fields and record.key == build_key(base_fields, record.shape):
            records.append(record)
    return records


def lookup_build(cache_dir: Path, model_name: str, backend_name: str, base_fields: dict[str, Any],
                 shape: ShapeBucket, task: Task) -> BuildRecord | None:
    """The build of one task at one shape, if it exists."""
    key = build_key(base_fields, shape)
    directory = build_directory(cache_dir, model_name, backend_name, shape, key) / Task(task).value
    if not (directory / RECORD_FILE).is_file():
        return None
    return BuildRecord.read(directory)


# Building ---------------------------------------------------------------------------------


def check_shape(model: ModelConfig, shape: ShapeBucket) -> None:
    """Raises ValueError when the model's limits do not allow renders of this shape."""
    limits = model.limits
    problems = []
    for name, value, largest in (("width", shape.width, limits.max_width), ("height", shape.height, limits.max_height)):
        if value % limits.size_multiple or not limits.min_size <= value <= largest:
            problems.append(f"{name} must be a multiple of {limits.size_multiple} within {limits.min_size}..{largest}")
    if (shape.num_frames - 1) % limits.frame_step or not limits.min_frames <= shape.num_frames <= limits.max_frames:
        problems.append(
            f"frames must be {limits.frame_step}k+1 within {limits.min_frames}..{limits.max_frames}"
        )
    if problems:
        raise ValueError(f"model {model.name} cannot render {shape.spec}: " + "; ".join(problems))


def build_engine(
    model: ModelConfig,
    shape: ShapeBucket | str,
    cache_dir: str | Path | None = None,
    *,
    tasks: Iterable[Task] | None = None,
    force: bool = False,
) -> Path:
    """Builds the model's configured backend for one shape (every task, or `tasks`); returns
    the key's directory. Existing builds are kept (a cache hit) unless `force`."""
    import torch

    from farm.engines.backends import create_backend
    from farm.engines.backends.backend import CallSignature, complete_arguments
    from farm.engines.hf_progress import no_progress_bars
    from farm.engines.loading import (
        load_pipelines,
        local_model_dir,
        resolve_device,
        resolve_dtype,
        weights_sha256,
    )
    from farm.families import family_module

    if isinstance(shape, str):
        shape = parse_shape(shape)
    check_shape(model, shape)
    wanted_tasks = [Task(task) for task in (tasks if tasks is not None else model.tasks)]
    unknown = [task.value for task in wanted_tasks if task not in model.sources]
    if unknown:
        raise ValueError(f"model {model.name} does not serve {unknown} (it serves {[t.value for t in model.tasks]})")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else model.backend.resolved_cache_dir

    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    backend = create_backend(model.backend, device, dtype)
    if not backend.builds_per_shape:
        raise ValueError(f"the {backend.name} backend needs no build: it runs every shape as loaded")
    backend.check_available()

    sources = sorted(set(model.sources.values()))
    weights = weights_sha256([local_model_dir(source, model.revision) for source in sources])
    base_fields = engine_key_fields(weights, backend, model.backend.first_block_cache_threshold)
    key = build_key(base_fields, shape)
    key_dir = build_directory(cache_dir, model.name, backend.name, shape, key)
    missing = [task for task in wanted_tasks if force or not (key_dir / task.value / RECORD_FILE).is_file()]
    if not missing:
        log.info("engine build %s is in the cache", key_dir)
        return key_dir

    if device.type == "cpu":
        torch.set_num_threads(model.cpu_threads or os.cpu_count() or 1)
    family = family_module(model.family)
    if family.FACTS.denoiser != "transformer":
        raise ValueError(f"model {model.name}: ahead-of-time engine builds export a transformer; the "
                         f"{model.family.value} family denoises with a {family.FACTS.denoiser} (use the eager, "
                         "compile or fp8 backend)")
    with no_progress_bars():
        pipelines = load_pipelines(model, device, dtype)
    key_dir.mkdir(parents=True, exist_ok=True)
    # Every reference comes from the eager model, so capture them all before any backend
    # changes a transformer (a family's tasks may share one).
    calls = {task: _capture_with_reference(pipelines[task], family, model, task, shape, device) for task in missing}
    for transformer in {id(pipelines[task].transformer): pipelines[task].transformer for task in missing}.values():
        backend.prepare(transformer)
        if model.backend.first_block_cache_threshold is not None:
            from farm.engines.backends.first_block_cache import apply_first_block_cache

            apply_first_block_cache(transformer, model.backend.first_block_cache_threshold)
    for task in missing:
        started = time.perf_counter()
        transformer = pipelines[task].transformer
        arguments, reference = calls[task]
        signature = CallSignature.of_call(
            complete_arguments(transformer, arguments), reference, getattr(backend, "graph_dtype", None)
        )
        staging = key_dir / f".{task.value}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            _build_one(backend, transformer, arguments, reference, staging)
            error = _verify(backend, transformer, signature, arguments, reference, staging)
            record = {
                "format_version": ENGINE_FORMAT_VERSION,
                "key": key,
                "fields": {**base_fields, "shape": shape.as_dict()},
                "model": model.name,
                "task": task.value,
                "backend": backend.label,
                "shape": shape.as_dict(),
                "signature": signature.to_json(),
                "verification": {
                    "max_relative_error": error,
                    "tolerance": backend.tolerance,
                    "against": f"eager-{base_fields['dtype']}",
                    "measure": ERROR_MEASURE,
                },
                "build_seconds": round(time.perf_counter() - started, 3),
                "built_at": time.time(),
                "built_with": _installed_versions(BUILD_TOOLS),
            }
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
            _move_into_place(staging, key_dir / task.value, replace=force)
            log.info("built %s for %s %s in %.1f s (relative error %.2e)", backend.label, task.value,
                     shape.describe(), record["build_seconds"], error)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return key_dir


def _capture_with_reference(pipe, family, model: ModelConfig, task: Task, shape: ShapeBucket,
                            device: "torch.device") -> tuple[dict[str, Any], "torch.Tensor"]:
    """The pipeline's first transformer call at this shape, and the eager output on it."""
    import torch
    from PIL import Image

    from farm.domain.engine import EngineRequest
    from farm.engines.backends.backend import (
        capture_transformer_call,
        class_forward,
        first_output,
    )

    guidance = 1.0
    if shape.guided:
        guidance = model.defaults.guidance_scale if model.defaults.guidance_scale > 1.0 else 3.0
    request = EngineRequest(
        render_id="engine-build", attempt=1, task=task, prompt=CALIBRATION_PROMPT, negative_prompt="",
        image=None, width=shape.width, height=shape.height, num_frames=shape.num_frames, fps=model.defaults.fps,
        num_inference_steps=2, guidance_scale=guidance, seed=0,
    )
    image = Image.new("RGB", (shape.width, shape.height), (128, 128, 128)) if task == Task.IMAGE_TO_VIDEO else None
    call_kwargs = family.call_kwargs(request, image)
    with torch.inference_mode():
        prompt_kwargs = family.encode_prompt(pipe, request, device)
    # Outside inference mode: the captured tensors feed torch.export and torch.compile.
    with torch.no_grad():
        arguments = capture_transformer_call(
            pipe,
            {**call_kwargs, **prompt_kwargs, "generator": torch.Generator(device=device).manual_seed(0),
             "output_type": "latent", "return_dict": False},
        )
        with _cache_context(pipe.transformer):
            reference = first_output(class_forward(pipe.transformer)(**arguments, return_dict=False)).clone()
    return arguments, reference


def _build_one(backend: "Backend", transformer, arguments: dict[str, Any], reference: "torch.Tensor",
               staging: Path) -> None:
    import torch

    from farm.engines.backends.backend import arguments_to

    with _cache_context(transformer):
        backend.build(transformer, arguments, reference, staging)
    torch.save(arguments_to(arguments, torch.device("cpu")), staging / SAMPLE_CALL_FILE)
    torch.save(reference.cpu(), staging / REFERENCE_OUTPUT_FILE)


def _verify(backend: "Backend", transformer, signature: "CallSignature", arguments: dict[str, Any],
            reference: "torch.Tensor", staging: Path) -> float:
    """Loads the artifact as a replica would, runs the sample call, and checks it against eager."""
    import torch

    from farm.engines.backends.backend import (
        as_inference_tensors,
        first_output,
        relative_error,
    )
    from farm.engines.backends.first_block_cache import reset_first_block_cache

    runner = backend.load(transformer, signature, staging)
    arguments = as_inference_tensors(arguments, backend.device)
    with torch.inference_mode(), _cache_context(transformer):
        for _ in range(backend.warmup_calls):
            output = first_output(runner(**arguments, return_dict=False))
        error = relative_error(output, reference)
    reset_first_block_cache(transformer)
    if not error <= backend.tolerance:
        raise BuildVerificationFailed(
            f"the {backend.label} build differs from eager by {error:.3e} ({ERROR_MEASURE}); "
            f"its tolerance is {backend.tolerance:.1e}. Nothing was written."
        )
    return error


def _installed_versions(packages: Iterable[str]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _cache_context(transformer):
    """The step-cache context the pipelines open around each call (needed once First-Block Cache is on)."""
    import contextlib

    if hasattr(transformer, "cache_context"):
        return transformer.cache_context("farm-engine-build")
    return contextlib.nullcontext()


def _move_into_place(staging: Path, target: Path, replace: bool) -> None:
    if target.exists():
        if not replace:
            return  # another builder finished the same key first; theirs is as good
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        staging.rename(target)
    except OSError:
        if not (target / RECORD_FILE).is_file():
            raise


__all__ = [
    "BuildRecord",
    "BuildVerificationFailed",
    "EngineBuildMissing",
    "ShapeBucket",
    "build_engine",
    "build_key",
    "check_shape",
    "engine_key_fields",
    "find_builds",
    "lookup_build",
    "parse_shape",
]
