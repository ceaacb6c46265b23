"""One GPU check of the whole engine stack, sized for one H100 or H200 within 8 minutes.

What it measures, each item on its own (an item that fails records its error and the
check goes on; an item that would not finish within the time budget is recorded as
skipped; a backend this machine cannot run is recorded as not available):

- the card, driver, CUDA, torch and diffusers versions, and the bf16 matrix-product
  rate measured now (`engine_step.matmul_rate`);
- the tiny random-weight pipelines (`farm.engines.tiny`) loaded and rendered whole by
  the engine (`DiffusersEngine.render`, then MP4), with the peak GPU memory the engine
  reports against `farm.planning.memory`'s estimate, and the replica's health check
  (`DiffusersEngine.check_health`, what the Serve deployment calls);
- full-size LTX-Video 2B and CogVideoX-5B with T5-XXL, built from the published
  configs with random weights (`engine_step.build_pipeline`), at 768x512x121 and
  720x480x49: one guided denoising step (batch 2) on eager, compile, fp8 and onnx where
  they run, with TFLOP/s (`engine_step`'s analytic FLOP counts), the fraction of the
  matrix-product rate, and the relative error against eager on the same inputs beside
  the backend's stated tolerance; the engine's decode phase (`family.decode_latents`
  and the uint8 conversion), VAE tiled and untiled; a whole render (prompt to MP4,
  `engine_step.whole_pipeline`, with the published step count unless that would take
  longer than --render-max-s); and the peak GPU memory of each against the estimate.

The cheap items of every model run before the slow ones of any (builds, eager steps,
decodes, renders; then compile, onnx, fp8), and an item starts only while the time
budget (--budget-s, 8 minutes) leaves it the seconds in NEEDS_S. The onnx backend runs
only where ONNX Runtime already has its CUDA or TensorRT provider: onnxruntime-gpu and
TensorRT are too large to carry, so elsewhere it is recorded as not available.

Everything goes to `benchmarks/results/gpu-<card>-<date>.json` (rewritten after every
item, so a run cut short keeps what it measured), then a summary table is printed.
Nothing is estimated in its place: what was not measured says so.

On a GPU machine without registry access, `benchmarks/gpu_check.sh` installs the
carried wheels first and writes the results to $OUT. Prepare them here (`.gpu-bundle/`
is ignored by git; the command prints its size against the 64 MiB a call may carry):

    .venv/bin/python benchmarks/gpu_check.py --bundle .gpu-bundle

then run `bash benchmarks/gpu_check.sh` there with `.gpu-bundle` carried. On a CPU it
refuses, except as a smoke test of this script, which `tests/unit/test_gpu_check.py`
runs: the tiny pipelines stand in for the full-size ones at tiny shapes, in float32;
onnx (CPU provider) is the optimized backend compared with eager, for one model;
torch.compile is left out unless --smoke-compile; no number of it describes a GPU:

    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check-smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # farm and benchmarks from this source tree, also where farm is not installed (a GPU machine).
    sys.path.insert(0, str(ROOT))

SCHEMA = "farm.gpu_check/1"
NOT_MEASURED = "not measured"
OK, ERROR, SKIPPED, NOT_AVAILABLE = "ok", "error", "skipped", "not available"
DEFAULT_BUDGET_S = 480.0
DEFAULT_RESULTS_DIR = ROOT / "benchmarks" / "results"
MIB = 1024**2
CARRY_LIMIT_BYTES = 64 * MIB
# What the GPU machines' image lacks of what this check imports (KINDS.md lists what it
# has: torch, transformers, huggingface-hub, safetensors, numpy, pillow, ...), carried
# as wheels at this venv's versions. typing-extensions: pydantic needs a recent one.
BUNDLE_PACKAGES = ("diffusers", "pydantic", "pydantic-core", "pydantic-settings", "annotated-types",
                   "typing-inspection", "typing-extensions", "python-dotenv", "av")
DEVICE_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
MODEL_NAMES = ("ltx-video-2b", "cogvideox-5b")  # engine_step.MODELS
BACKENDS = ("eager", "compile", "onnx", "fp8")  # fp8 last: it quantizes the transformer in place
# Seconds an item is allowed to start with, at the least: guesses for one H100, not
# measurements, so that an item that cannot finish is skipped instead of cut off.
NEEDS_S = {"build": 60, "step": 20, "decode": 40, "render": 30, "compile": 150, "fp8": 150, "onnx": 300}
# The whole render runs the published step count unless that would take longer than this.
DEFAULT_RENDER_MAX_S = 60.0
# The smoke test: the tiny pipelines stand in for the full-size ones, at these shapes.
SMOKE_SHAPES = {"ltx-video-2b": "128x128x9", "cogvideox-5b": "128x96x9"}
TINY_STAND_IN = {"ltx-video-2b": "ltx-video-tiny", "cogvideox-5b": "cogvideox-tiny"}
SMOKE_STEPS = 2
# The smoke test builds each optimized backend for one model: an ONNX export takes 5-10 s
# on 2 cores (tests/unit/test_backends.py exports both families).
SMOKE_BACKEND_MODEL = "cogvideox-5b"
SMOKE_COMPILE_NOTE = ("smoke on CPU: torch.compile (Inductor, C++) of the one-layer tiny transformers took 20-35 s "
                      "each on the project's 2-core machine; --smoke-compile runs it")


# The results file ---------------------------------------------------------------------------


class Check:
    """The results being gathered, the time budget, and how each item is run and recorded."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"schema": SCHEMA, "complete": False}

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def item(self, where: dict, key: str, measure: Callable[[dict], None], needs_s: float = 0.0,
             label: str = "") -> bool:
        """Runs measure(row) into where[key] unless the budget is spent; records its error
        instead of raising. True when it ran to the end."""
        row = where.setdefault(key, {})
        left = self.remaining()
        if left < needs_s:
            row.update(status=SKIPPED, reason=f"time budget: {max(left, 0):.0f} s of {self.budget_s:.0f} s left, "
                                              f"this item starts only with {needs_s:.0f} s")
            self.log(label or key, row)
            self.save()
            return False
        started = time.perf_counter()
        try:
            measure(row)
            row.setdefault("status", OK)
        except Exception as error:  # noqa: BLE001 - one failed measurement must not end the check
            from farm.engines.backends.backend import BackendUnavailable

            status = NOT_AVAILABLE if isinstance(error, BackendUnavailable) else ERROR
            row.update(status=status, error=f"{type(error).__name__}: {error}")
            free_memory()
        row["wall_s"] = time.perf_counter() - started
        self.log(label or key, row)
        self.save()
        return row["status"] == OK

    def log(self, label: str, row: dict) -> None:
        """One line per item as it ends, so that a run cut short still shows where it was."""
        why = row.get("error") or row.get("reason") or ""
        wall = f" in {row['wall_s']:.1f} s" if "wall_s" in row else ""
        print(f"[{time.monotonic() - self.started:5.0f} s] {label}: {row['status']}{wall}"
              f"{f' ({why})' if why else ''}", flush=True)

    def save(self, complete: bool = False) -> None:
        self.results["complete"] = complete
        self.results["elapsed_s"] = time.monotonic() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        partial.replace(self.out)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """The most GPU memory allocated inside the block, above what was allocated before it
    (`torch.cuda.max_memory_allocated`, what a render's manifest records). None on a CPU."""

    def __init__(self, device):
        self.device = device
        self.before: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def increase(self) -> int | None:
        return None if self.peak is None else self.peak - self.before


def against_estimate(measured: int | None, estimated: int, what: str) -> dict[str, Any]:
    """A measured peak beside the estimate of the same thing; on a CPU there is no peak to measure."""
    row: dict[str, Any] = {"what": what, "estimate_bytes": int(estimated)}
    if measured is None:
        row.update(measured_bytes=NOT_MEASURED, measured_over_estimate=NOT_MEASURED)
    else:
        row.update(measured_bytes=int(measured), measured_over_estimate=measured / estimated if estimated else None,
                   within_estimate=measured <= estimated)
    return row


# The machine --------------------------------------------------------------------------------


def describe_machine(device) -> dict[str, Any]:
    """Card, driver, CUDA and library versions, and which optional backends this machine has."""
    import diffusers
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    for module in ("triton", "torchao", "onnx", "onnxscript", "onnxruntime", "tensorrt", "av"):
        versions[module] = _module_version(module)
    machine: dict[str, Any] = {"measured_on": device.type, "versions": versions,
                               "cuda_runtime": torch.version.cuda or NOT_MEASURED}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine["card"] = torch.cuda.get_device_name(device)
        machine["gpu"] = {"name": machine["card"], "compute_capability": list(torch.cuda.get_device_capability(device)),
                          "memory_bytes": properties.total_memory, "multiprocessors": properties.multi_processor_count}
        machine.update(_driver())
    else:
        machine["card"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        machine.update(gpu=NOT_MEASURED, driver=NOT_MEASURED, cuda_driver=NOT_MEASURED)
    machine["optional_backends"] = optional_backends()
    return machine


def _module_version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return NOT_AVAILABLE
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as error:  # noqa: BLE001 - a broken install is worth reporting, not fatal
        return f"import fails: {type(error).__name__}: {error}"


def _driver() -> dict[str, str]:
    """The driver's version and the CUDA version it supports, from NVML or nvidia-smi."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            driver = pynvml.nvmlSystemGetDriverVersion()
            return {"driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                    "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}"}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: ask nvidia-smi
        pass
    try:
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"driver": NOT_MEASURED, "cuda_driver": NOT_MEASURED}
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return {"driver": driver.group(1) if driver else NOT_MEASURED,
            "cuda_driver": cuda.group(1) if cuda else NOT_MEASURED}


def optional_backends() -> dict[str, str]:
    """ONNX Runtime's GPU providers and TensorRT are not carried (their wheels exceed what a
    call may carry): the onnx backend is measured only where the machine already has them."""
    found = {}
    if importlib.util.find_spec("onnxruntime") is None:
        found["onnxruntime"] = f"{NOT_AVAILABLE}: onnxruntime is not installed here"
    else:
        import onnxruntime

        found["onnxruntime"] = f"{onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}"
    found["tensorrt"] = (_module_version("tensorrt") if importlib.util.find_spec("tensorrt") else
                         f"{NOT_AVAILABLE}: no tensorrt module here (its wheels are too large to carry)")
    return found


def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    words = re.sub(r"[^a-z0-9]+", "-", card.lower().replace("nvidia", "")).strip("-")
    return words or "gpu"


def results_path(results_dir: Path, card: str, now: datetime.datetime) -> Path:
    path = results_dir / f"gpu-{card_slug(card)}-{now:%Y-%m-%d}.json"
    return path if not path.exists() else path.with_name(f"gpu-{card_slug(card)}-{now:%Y-%m-%d-%H%M%S}.json")


# Shared pieces -----------------------------------------------------------------------------


def engine_request(width: int, height: int, num_frames: int, fps: int, steps: int, guidance_scale: float,
                   model=None):
    """A request as the scheduler would hand it to an engine: text-to-video, or the model's
    first task (with a first frame for image-to-video, and no text where the family takes none)."""
    from benchmarks.engine_step import NEGATIVE_PROMPT, PROMPT
    from farm.cli.demo import first_frame_png
    from farm.config import Task
    from farm.domain.engine import EngineRequest
    from farm.families import family_facts

    task = Task.TEXT_TO_VIDEO if model is None or Task.TEXT_TO_VIDEO in model.tasks else model.tasks[0]
    uses_prompt = model is None or family_facts(model.family).uses_prompt
    return EngineRequest(render_id="gpu-check", attempt=0, task=task, prompt=PROMPT if uses_prompt else "",
                         negative_prompt=NEGATIVE_PROMPT if uses_prompt else "",
                         image=first_frame_png(width, height) if task == Task.IMAGE_TO_VIDEO else None,
                         width=width, height=height, num_frames=num_frames, fps=fps, num_inference_steps=steps,
                         guidance_scale=guidance_scale, seed=0)


def resolved_spec(model, request):
    """The request as the gateway resolves it for this model (what the estimate takes)."""
    from farm.domain.spec import RenderSpec
    from farm.jobs.validation import resolve_spec

    spec = RenderSpec(model=model.name, task=request.task, prompt=request.prompt, image=request.image or b"",
                      width=request.width,
                      height=request.height, num_frames=request.num_frames, fps=request.fps,
                      num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale)
    return resolve_spec(spec, {model.name: model})


def mp4_encoder() -> tuple[Callable[..., bytes], str]:
    """farm's MP4 encoder, or a stand-in that encodes nothing where PyAV is missing."""
    if importlib.util.find_spec("av") is None:
        return (lambda frames, fps: b""), f"{NOT_AVAILABLE}: PyAV is not installed, so renders stop at uint8 frames"
    from farm.postproc.encode import encode_mp4

    return encode_mp4, "included"


def set_vae_tiling(vae, tiled: bool) -> None:
    """The engine's tiling (`backend.vae_tiling`), or none at all."""
    from farm.engines.pipeline_engine import enable_vae_tiling

    if tiled:
        enable_vae_tiling(vae)
        return
    vae.disable_tiling()
    if hasattr(vae, "use_framewise_decoding"):
        vae.use_framewise_decoding = False


# The tiny pipelines, through the engine a replica runs ------------------------------------------


def check_tiny(check: Check, args, device) -> None:
    from farm.config import DeviceConfig
    from farm.engines import load_engine
    from farm.engines.tiny import make_tiny_models, tiny_model_configs
    from farm.planning.memory import estimate_memory, read_footprint

    tiny = check.results.setdefault("tiny", {})
    health = check.results.setdefault("health", {})
    models_dir = Path(args.tiny_models_dir or Path(tempfile.gettempdir()) / "tiny-models")
    made = check.item(tiny, "make", lambda row: row.update(
        directory=str(models_dir), models=[path.name for path in make_tiny_models(models_dir)]),
        label="tiny models written")
    encode, mp4 = mp4_encoder()
    stand_in_of = {tiny_name: name for name, tiny_name in TINY_STAND_IN.items()}
    for model in tiny_model_configs(models_dir) if made else ():
        model = model.model_copy(update={"device": device.type})
        section = tiny.setdefault(model.name, {})
        loaded: dict[str, Any] = {}

        def load(row):
            loaded["engine"] = engine = load_engine(model)
            row.update(backend=engine.backend, device=str(engine.device), device_kind=engine.device_kind)

        def render(row):
            engine = loaded["engine"]
            defaults = model.defaults
            if args.smoke and model.name in stand_in_of:
                shape = parse_shape(SMOKE_SHAPES[stand_in_of[model.name]])
                request = engine_request(shape.width, shape.height, shape.num_frames, defaults.fps, SMOKE_STEPS,
                                         defaults.guidance_scale, model)
            else:
                # A family without a full-size stand-in here: its tiny defaults.
                steps = SMOKE_STEPS if args.smoke else defaults.num_inference_steps
                request = engine_request(defaults.width, defaults.height, defaults.num_frames, defaults.fps,
                                         steps, defaults.guidance_scale, model)
            started = time.perf_counter()
            output = engine.render(request, on_progress=lambda progress: None, should_stop=lambda: False)
            rendered = time.perf_counter()
            encode(output.frames, request.fps)
            finished = time.perf_counter()
            estimate = estimate_memory(resolved_spec(model, request), model, read_footprint(model),
                                       DeviceConfig().memory_margin)
            row.update(shape=f"{request.width}x{request.height}x{request.num_frames}",
                       steps=request.num_inference_steps, backend=output.backend, render_s=rendered - started,
                       mp4_encode_s=finished - rendered, whole_s=finished - started, mp4_encode=mp4,
                       phases_s={timing.phase: timing.seconds for timing in output.timings},
                       memory=against_estimate(output.peak_memory_bytes, estimate.peak_bytes,
                                               "the engine's peak over the render against the estimated peak"))

        def health_check(row):
            engine = loaded["engine"]
            engine.check_health()
            row.update(what="DiffusersEngine.check_health, which the Serve replica's health check calls",
                       device=str(engine.device), device_kind=engine.device_kind)

        if check.item(section, "load", load, label=f"{model.name} loaded by the engine"):
            check.item(section, "render", render, label=f"{model.name} whole render")
            check.item(health, model.name, health_check, label=f"{model.name} health check")
        else:
            _needs(section, "render", "the engine's load")
            _needs(health, model.name, "the engine's load")
        loaded.clear()
        free_memory()


def parse_shape(text: str):
    from farm.engines.backends.shapes import parse_shape as parse

    return parse(text)


# Full-size models -----------------------------------------------------------------------------


@dataclasses.dataclass
class ModelRun:
    """One model of the check: its pipeline, its captured transformer call, and what was measured."""

    name: str
    spec: Any  # engine_step.ModelSpec
    shape: Any  # ShapeBucket
    record: dict
    pipe: Any = None
    sizes: Any = None  # farm.planning.memory.PipelineSizes of the pipeline built here
    router: Any = None
    arguments: dict | None = None
    serving: dict | None = None
    eager_output: Any = None
    flops: float | None = None
    eager_step_s: float | None = None
    weights_bytes: int | None = None
    decode_s: dict = dataclasses.field(default_factory=dict)

    @property
    def family(self):
        from farm.families import Family

        return Family(self.spec.family)

    @property
    def ready(self) -> bool:
        return self.eager_output is not None


class ModelCheck:
    """The measurements of full-size models, one phase of all models at a time, so that the
    cheap and essential ones of every model come before the slow ones of any."""

    def __init__(self, check: Check, args, device, dtype, matmul_tflops: float | None):
        self.check, self.args, self.device, self.dtype = check, args, device, dtype
        self.matmul_tflops = matmul_tflops
        self.encode, self.mp4 = mp4_encoder()

    # Building --------------------------------------------------------------------------------

    def build(self, run: ModelRun, row: dict) -> None:
        import torch

        from benchmarks import engine_step
        from farm.config import Task
        from farm.planning import memory
        from farm.engines.backends.backend import TransformerRouter
        from farm.engines.hf_progress import no_progress_bars
        from farm.engines.pipeline_engine import load_pipelines
        from farm.engines.tiny import tiny_model_configs

        with PeakMemory(self.device) as allocated:
            started = time.perf_counter()
            if self.args.smoke:
                models_dir = Path(self.check.results["tiny"]["make"]["directory"])
                stand_in = next(m for m in tiny_model_configs(models_dir) if m.name == TINY_STAND_IN[run.name])
                source = stand_in.sources[Task.TEXT_TO_VIDEO]
                stand_in = stand_in.model_copy(update={"sources": {Task.TEXT_TO_VIDEO: source}})
                with no_progress_bars():
                    run.pipe = load_pipelines(stand_in, self.device, self.dtype)[Task.TEXT_TO_VIDEO]
                run.sizes = memory.read_pipeline_sizes(Path(source), run.family)
                row["stand_in"] = f"{stand_in.name}, loaded from {source}"
            else:
                run.pipe, _ = engine_step.build_pipeline(run.spec, self.args.layers, self.device, self.dtype)
            seconds = time.perf_counter() - started
            if self.device.type == "cuda":
                run.weights_bytes = torch.cuda.memory_allocated(self.device) - allocated.before
        parameters = {name: sum(p.numel() for p in module.parameters())
                      for name, module in run.pipe.components.items() if isinstance(module, torch.nn.Module)}
        published = memory.PUBLISHED[run.family]
        if not self.args.smoke:
            hidden = run.pipe.transformer.config.num_attention_heads * run.pipe.transformer.config.attention_head_dim
            run.sizes = dataclasses.replace(published, parameters=parameters, hidden_size=hidden,
                                            described_by="the pipeline built here")
        set_vae_tiling(run.pipe.vae, run.spec.vae_tiling)
        run.router = TransformerRouter(run.pipe.transformer)
        row.update(seconds=seconds, layers=run.pipe.transformer.config.num_layers, parameters=parameters,
                   parameters_as_published=parameters == published.parameters,
                   weights_bytes=NOT_MEASURED if run.weights_bytes is None else run.weights_bytes)

    def estimate(self, run: ModelRun, tiled: bool, steps: int = 2):
        """farm.planning.memory's estimate for this pipeline, shape and tiling."""
        from farm.config import BackendConfig, DeviceConfig, ModelConfig, Task
        from farm.planning import memory
        from farm.engines.backends.backend import dtype_name

        source = run.sizes.described_by
        model = ModelConfig(name=run.name, family=run.family, sources={Task.TEXT_TO_VIDEO: source},
                            dtype=dtype_name(self.dtype), backend=BackendConfig(vae_tiling=tiled))
        request = engine_request(run.shape.width, run.shape.height, run.shape.num_frames, run.spec.fps, steps,
                                 run.spec.guidance_scale)
        footprint = memory.ModelFootprint({source: run.sizes}, {Task.TEXT_TO_VIDEO: source})
        return memory.estimate_memory(resolved_spec(model, request), model, footprint, DeviceConfig().memory_margin)

    # One denoising step ---------------------------------------------------------------------------

    def capture(self, run: ModelRun) -> None:
        """The pipeline's own first transformer call at this shape, and its FLOPs."""
        import torch

        from benchmarks import engine_step
        from farm.engines.backends.backend import (
            as_inference_tensors,
            capture_transformer_call,
        )
        from farm.families import Family

        kwargs = {**engine_step.pipeline_kwargs(run.spec, run.shape, 2), "output_type": "latent"}
        with torch.no_grad():
            run.arguments = capture_transformer_call(run.pipe, kwargs)
        run.serving = as_inference_tensors(run.arguments, self.device)
        config = dict(run.pipe.transformer.config)
        hidden = run.arguments["hidden_states"]
        if run.family is Family.LTX_VIDEO:
            tokens, count = hidden.shape[1], engine_step.ltx_transformer_flops
        else:
            frames, _, height, width = hidden.shape[1:]
            tokens = frames * (height // config["patch_size"]) * (width // config["patch_size"])
            count = engine_step.cogvideox_transformer_flops
        run.flops = count(config, tokens, run.arguments["encoder_hidden_states"].shape[1], hidden.shape[0])
        run.record.update(latent_tokens=int(tokens), batch=int(hidden.shape[0]), tflop_per_step=run.flops / 1e12)

    def timed_step(self, run: ModelRun, row: dict, call: Callable[[], Any]) -> Any:
        """Times call (one transformer call on the captured inputs); returns its last output."""
        import torch

        from benchmarks import engine_step

        with torch.inference_mode(), run.router.routed_to(None):
            first, _ = engine_step.timed(call, self.device, repeats=1, warmups=1)
            repeats = self.args.repeats or (2 if self.device.type == "cpu" else max(3, min(10, int(10 / first[0]))))
            seconds, output = engine_step.timed(call, self.device, repeats=repeats, warmups=0)
        step_s = statistics.median(seconds)
        tflops = run.flops / step_s / 1e12
        row.update(ms_per_step=step_s * 1e3, ms_min=min(seconds) * 1e3, repeats=repeats, tflops=tflops,
                   fraction_of_matmul=tflops / self.matmul_tflops if self.matmul_tflops else NOT_MEASURED)
        if run.eager_step_s:
            row["speedup_over_eager"] = run.eager_step_s / step_s
        return output

    def eager_step(self, run: ModelRun, row: dict) -> None:
        from farm.config import BackendConfig
        from farm.engines.backends import create_backend
        from farm.engines.backends.backend import first_output

        self.capture(run)
        transformer = run.pipe.transformer
        with PeakMemory(self.device) as peak:
            output = self.timed_step(run, row, lambda: transformer(**run.serving, return_dict=False))
        run.eager_output = first_output(output).clone()
        run.eager_step_s = row["ms_per_step"] / 1e3
        row["label"] = create_backend(BackendConfig(name="eager"), self.device, self.dtype).label
        row["memory"] = against_estimate(peak.increase, self.estimate(run, run.spec.vae_tiling).denoising_bytes,
                                         "the step's peak above the weights against the estimated denoising bytes")

    def backend_step(self, run: ModelRun, row: dict, name: str) -> None:
        """One optimized backend: built on the captured call, timed, and compared with eager."""
        from benchmarks import engine_step
        from farm.config import BackendConfig
        from farm.engines.backends import create_backend
        from farm.engines.backends.backend import first_output, relative_error

        backend = create_backend(BackendConfig(name=name, onnx_provider=self.args.onnx_provider), self.device,
                                 self.dtype)
        options = types.SimpleNamespace(onnx_provider=self.args.onnx_provider)
        with PeakMemory(self.device) as peak:
            runner, setup_s, label = engine_step.prepare_runner(name, options, run.pipe.transformer, run.arguments,
                                                                run.eager_output, self.device, self.dtype)
            output = self.timed_step(run, row, lambda: runner(**run.serving, return_dict=False))
        error = relative_error(first_output(output), run.eager_output)
        row.update(label=label, setup_s=setup_s, relative_error=error, tolerance=backend.tolerance,
                   matches_eager=bool(error <= backend.tolerance),
                   memory=against_estimate(peak.increase, self.estimate(run, run.spec.vae_tiling).denoising_bytes,
                                           "peak above the weights over the build and the timed steps (compile "
                                           "caches and CUDA graph pools included) against the estimated "
                                           "denoising bytes"))

    def unavailable(self, name: str) -> str | None:
        """Why this machine cannot run a backend at all, or None; costs no build."""
        from farm.config import BackendConfig
        from farm.engines.backends import create_backend
        from farm.engines.backends.backend import BackendUnavailable

        try:
            create_backend(BackendConfig(name=name, onnx_provider=self.args.onnx_provider), self.device,
                           self.dtype).check_available()
        except BackendUnavailable as refusal:
            return str(refusal)
        return None

    # Decoding and whole renders -------------------------------------------------------------------

    def decode(self, run: ModelRun, row: dict, tiled: bool) -> None:
        """The engine's decode phase: the family's decode_latents and the uint8 frames."""
        import torch

        from benchmarks import engine_step
        from farm.engines.pipeline_engine import video_to_uint8_frames
        from farm.families import family_module

        family = family_module(run.family)
        request = engine_request(run.shape.width, run.shape.height, run.shape.num_frames, run.spec.fps, 2,
                                 run.spec.guidance_scale)
        generator = torch.Generator(device=self.device).manual_seed(0)
        # Latents shaped as the pipeline hands them to the decoder (one video of the guided batch).
        hidden = run.arguments["hidden_states"]
        latents = torch.randn(hidden[:1].shape, generator=generator, device=self.device, dtype=hidden.dtype)

        def decode():
            noise = torch.Generator(device=self.device).manual_seed(0)  # LTX-Video's decode-time noise
            video = family.decode_latents(run.pipe, latents, request, noise)
            return video_to_uint8_frames(video, run.pipe.video_processor.config.do_normalize)

        set_vae_tiling(run.pipe.vae, tiled)
        try:
            with torch.inference_mode(), PeakMemory(self.device) as peak:
                seconds, frames = engine_step.timed(decode, self.device, repeats=1, warmups=1)
        finally:
            set_vae_tiling(run.pipe.vae, run.spec.vae_tiling)
        expected = (run.shape.num_frames, run.shape.height, run.shape.width, 3)
        if tuple(frames.shape) != expected:
            raise RuntimeError(f"decoded frames of shape {tuple(frames.shape)}, not {expected}")
        run.decode_s[tiled] = seconds[0]
        row.update(tiled=tiled, seconds=seconds[0],
                   memory=against_estimate(peak.increase, self.estimate(run, tiled).decoding_bytes,
                                           "the decode's peak above the weights against the estimated decoding bytes"))

    def render(self, run: ModelRun, row: dict) -> None:
        """Prompt to MP4 through the pipeline's own call, eager."""
        from benchmarks import engine_step
        from farm.engines.pipeline_engine import frames_to_uint8

        steps = self.render_steps(run)
        with PeakMemory(self.device) as peak:
            seconds = engine_step.whole_pipeline(run.pipe, run.spec, run.shape, steps, run.router, None, self.device,
                                                 frames_to_uint8, self.encode)
        measured = None if peak.increase is None else run.weights_bytes + peak.increase
        row.update(steps=steps, published_steps=run.spec.steps, seconds=seconds, vae_tiling=run.spec.vae_tiling,
                   mp4_encode=self.mp4,
                   memory=against_estimate(measured, self.estimate(run, run.spec.vae_tiling, steps).peak_bytes,
                                           "weights plus the render's peak above them against the estimated peak"))

    def render_steps(self, run: ModelRun) -> int:
        """The published step count, or fewer where that would take longer than --render-max-s."""
        if self.args.smoke:
            return SMOKE_STEPS
        steps = self.args.steps or run.spec.steps
        decode_s = run.decode_s.get(run.spec.vae_tiling, 0.0)
        if run.eager_step_s and steps * run.eager_step_s + decode_s > self.args.render_max_s:
            steps = max(2, int((self.args.render_max_s - decode_s) / run.eager_step_s))
        return steps

    # The phases ---------------------------------------------------------------------------------

    def run(self, names: list[str]) -> None:
        from benchmarks import engine_step

        section = self.check.results.setdefault("models", {})
        runs = []
        for name in names:
            spec = engine_step.MODELS[name]
            shape = parse_shape(SMOKE_SHAPES[name] if self.args.smoke else spec.shape)
            record = section.setdefault(name, {"shape": shape.spec, "guidance_scale": spec.guidance_scale,
                                               "build": {}, "steps": {}, "decode": {}, "render": {}})
            if self.args.smoke:
                record["smoke"] = "the tiny pipeline stands in for the full-size one, at a tiny shape"
            runs.append(ModelRun(name, spec, shape, record))
        for run in runs:
            self.check.item(run.record, "build", lambda row, run=run: self.build(run, row), NEEDS_S["build"],
                            label=f"{run.name} built")
        for run in runs:
            if run.pipe is None:
                _needs(run.record["steps"], "eager", "the build")
                continue
            self.check.item(run.record["steps"], "eager", lambda row, run=run: self.eager_step(run, row),
                            NEEDS_S["step"], label=f"{run.name} {run.shape.spec} step eager")
        for tiled in (True, False):
            key = "tiled" if tiled else "untiled"
            for run in runs:
                if not run.ready:
                    _needs(run.record["decode"], key, "the eager step (its captured call shapes the latents)")
                    continue
                self.check.item(run.record["decode"], key,
                                lambda row, run=run, tiled=tiled: self.decode(run, row, tiled),
                                NEEDS_S["decode"], label=f"{run.name} decode {key}")
        for run in runs:
            if not run.ready:
                _needs(run.record, "render", "the eager step")
                continue
            self.check.item(run.record, "render", lambda row, run=run: self.render(run, row), NEEDS_S["render"],
                            label=f"{run.name} whole render")
        smoke_model = next((r.name for r in runs if r.name == SMOKE_BACKEND_MODEL), runs[0].name if runs else None)
        for name in [b for b in BACKENDS if b != "eager" and b in self.args.backends]:
            reason = self.skip_reason(name)
            for run in runs:
                steps = run.record["steps"]
                if reason:
                    steps[name] = {"status": SKIPPED if name == "compile" and self.args.smoke else NOT_AVAILABLE,
                                   "reason": reason}
                elif self.args.smoke and run.name != smoke_model:
                    steps[name] = {"status": SKIPPED, "reason": f"smoke: optimized backends are built for "
                                                                f"{smoke_model} only, to keep the smoke test short"}
                elif not run.ready:
                    _needs(steps, name, "the eager step (the reference it is compared with)")
                else:
                    self.check.item(steps, name, lambda row, run=run, name=name: self.backend_step(run, row, name),
                                    NEEDS_S[name], label=f"{run.name} {run.shape.spec} step {name}")
        for run in runs:
            if run.router is not None:
                run.router.uninstall()
        runs.clear()
        free_memory()

    def skip_reason(self, name: str) -> str | None:
        if name == "compile" and self.args.smoke and not self.args.smoke_compile:
            return SMOKE_COMPILE_NOTE
        return self.unavailable(name)


def _needs(where: dict, key: str, prerequisite: str) -> None:
    where[key] = {"status": SKIPPED, "reason": f"needs {prerequisite}, which did not succeed"}


# The summary ----------------------------------------------------------------------------------


def summary_rows(results: dict) -> list[dict[str, str]]:
    """One line per measured item, for the table printed last."""
    rows = []

    def add(what: str, row: dict | None, time_s: float | None = None, **columns: str) -> None:
        if not row:
            return
        status = row.get("status", "")
        if row.get("matches_eager") is False:
            status = "MISMATCH"
        memory = row.get("memory") or {}
        peak = ""
        if memory:
            measured = memory["measured_bytes"]
            measured = measured if isinstance(measured, str) else f"{measured / 2**30:.2f}"
            peak = f"{measured} / {memory['estimate_bytes'] / 2**30:.2f}"
        rows.append({"what": what, "status": status, "time": "" if time_s is None else _duration(time_s),
                     "peak_vs_estimate_gib": peak, **columns})

    matmul = results.get("matmul", {})
    add(f"matmul {matmul.get('size', '')}^3 {matmul.get('dtype', '')}", matmul,
        tflops=_number(matmul.get("tflops")))
    for name, model in results.get("tiny", {}).items():
        if name != "make":
            render = model.get("render", {})
            add(f"tiny {name} render {render.get('shape', '')} {render.get('steps', '')} steps", render,
                render.get("whole_s"))
    for name, row in results.get("health", {}).items():
        add(f"health check {name}", row, row.get("wall_s"))
    for name, model in results.get("models", {}).items():
        if "smoke" in model:
            name = f"{name} (tiny)"
        add(f"{name} build", model.get("build"), (model.get("build") or {}).get("seconds"))
        for backend, row in model.get("steps", {}).items():
            error = row.get("relative_error")
            add(f"{name} {model['shape']} step {row.get('label', backend)}", row,
                row["ms_per_step"] / 1e3 if "ms_per_step" in row else None, tflops=_number(row.get("tflops")),
                of_matmul=_percent(row.get("fraction_of_matmul")),
                error_vs_tolerance="" if error is None else f"{error:.1e} / {row['tolerance']:.0e}")
        for tiling, row in model.get("decode", {}).items():
            add(f"{name} decode {tiling}", row, row.get("seconds"))
        render = model.get("render")
        if render:
            add(f"{name} render {render.get('steps', '')} steps", render, render.get("seconds"))
    return rows


def print_summary(results: dict) -> None:
    rows = summary_rows(results)
    columns = [("what", "item"), ("status", "status"), ("time", "time"), ("tflops", "TFLOP/s"),
               ("of_matmul", "of matmul"), ("error_vs_tolerance", "rel.err / tol"),
               ("peak_vs_estimate_gib", "peak / estimate GiB")]
    widths = {key: max(len(title), *(len(row.get(key, "")) for row in rows)) for key, title in columns}
    machine = results.get("machine", {})
    print(f"\n{machine.get('card', '')}: torch {machine.get('versions', {}).get('torch', '')}, diffusers "
          f"{machine.get('versions', {}).get('diffusers', '')}, driver {machine.get('driver', '')}, "
          f"CUDA {machine.get('cuda_driver', '')} (runtime {machine.get('cuda_runtime', '')})")
    print("  ".join(title.ljust(widths[key]) for key, title in columns))
    for row in rows:
        print("  ".join(row.get(key, "").ljust(widths[key]) for key, _ in columns))
    for line in results.get("not_measured", []):
        print(f"not measured: {line}")


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else ""


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else ""


def not_measured(results: dict) -> list[str]:
    """Every item that did not end with a measurement, and why."""
    lines = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if node.get("status") in (ERROR, SKIPPED, NOT_AVAILABLE):
            lines.append(f"{path}: {node['status']}: {node.get('reason') or node.get('error')}")
            return
        for key, value in node.items():
            walk(value, f"{path}.{key}" if path else key)

    walk(results, "")
    return lines


def failures(results: dict) -> list[str]:
    """Errors and backends outside their tolerance: what makes the check exit 1."""
    found = [line for line in not_measured(results) if f": {ERROR}: " in line]
    for name, model in results.get("models", {}).items():
        for backend, row in model.get("steps", {}).items():
            if row.get("matches_eager") is False:
                found.append(f"models.{name}.steps.{backend}: relative error {row['relative_error']:.3e} "
                             f"over the tolerance {row['tolerance']:.1e}")
    return found


# The carried wheels ---------------------------------------------------------------------------


def write_bundle(directory: Path, python_version: str) -> int:
    """Downloads the wheels the GPU machine lacks, at this environment's versions, into directory."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in BUNDLE_PACKAGES:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            print(f"{name} is not installed in {sys.prefix}: run this with the project's venv", file=sys.stderr)
            return 2
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.whl"):  # one version of each: two stop the whole install there
        old.unlink()
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *(f"--platform={name}" for name in WHEEL_PLATFORMS), "--dest", str(directory), *pins]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    wheels = sorted(directory.glob("*.whl"))
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / MIB:7.2f} MiB  {wheel.name}")
    bundle = sum(wheel.stat().st_size for wheel in wheels)
    tree = travelling_tree_bytes(directory)
    total = bundle + (tree or 0)
    print(f"bundle {bundle / MIB:.1f} MiB in {directory}; the working tree beside it "
          f"{'unknown' if tree is None else f'{tree / MIB:.1f} MiB'}; {total / MIB:.1f} of the "
          f"{CARRY_LIMIT_BYTES / MIB:.0f} MiB a device call may carry")
    if total > CARRY_LIMIT_BYTES:
        print("too large to carry: leave av out of BUNDLE_PACKAGES (renders then stop at uint8 frames)",
              file=sys.stderr)
        return 1
    try:
        carried = directory.resolve().relative_to(ROOT)
    except ValueError:
        print(f"{directory} is outside {ROOT}: a device call carries only ignored paths inside the repository",
              file=sys.stderr)
        return 1
    environment = "" if str(carried) == ".gpu-bundle" else f"GPU_CHECK_BUNDLE={carried} "
    print(f"carry it: run(command='{environment}bash benchmarks/gpu_check.sh', carry=['{carried}'], timeout_s=570)")
    return 0


def travelling_tree_bytes(leave_out: Path) -> int | None:
    """Bytes of the files that travel with a device call anyway: tracked, and untracked but not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    leave_out = leave_out.resolve()
    total = 0
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and leave_out not in path.resolve().parents:
            total += path.stat().st_size
    return total


# Entry point ----------------------------------------------------------------------------------


def comma_separated(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke test: the tiny pipelines stand in for the full-size ones, tiny shapes")
    parser.add_argument("--smoke-compile", action="store_true", help="with --smoke, also torch.compile (slow on CPU)")
    parser.add_argument("--out", type=Path, help="the results file (default: benchmarks/results/gpu-<card>-<date>.json "
                                                 "on a GPU; a temporary file for --smoke)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                        help="where the default results file goes (gpu_check.sh gives $OUT on a device machine)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="items that would start later than this many seconds after the start are skipped")
    parser.add_argument("--models", type=comma_separated(MODEL_NAMES), default=list(MODEL_NAMES),
                        help=f"comma-separated, of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--backends", type=comma_separated(BACKENDS), default=list(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--layers", type=int, help="transformer and text encoder depth instead of the published one")
    parser.add_argument("--steps", type=int, help="denoising steps of the full-size whole renders (default: published)")
    parser.add_argument("--render-max-s", type=float, default=DEFAULT_RENDER_MAX_S,
                        help="fewer steps for a whole render predicted to take longer than this")
    parser.add_argument("--repeats", type=int, help="timed transformer calls per backend (median reported)")
    parser.add_argument("--onnx-provider", default="auto", choices=["auto", "tensorrt", "cuda", "cpu"])
    parser.add_argument("--tiny-models-dir", type=Path, help="tiny models already written (default: written afresh)")
    parser.add_argument("--bundle", type=Path, metavar="DIR",
                        help="only download the wheels a GPU machine lacks into DIR (to carry), and exit")
    parser.add_argument("--bundle-python", default=DEVICE_PYTHON, help="the GPU machine's Python, for --bundle")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bundle:
        return write_bundle(args.bundle, args.bundle_python)
    import torch

    from benchmarks import engine_step

    # The smoke test runs on the CPU wherever it runs: it tests this script, not a machine.
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("No GPU here: this check measures GPUs. For a smoke test of the script on CPU, run with --smoke.",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    now = datetime.datetime.now(datetime.timezone.utc)
    machine = describe_machine(device)
    out = args.out or (results_path(args.results_dir, machine["card"], now) if on_gpu else
                       Path(tempfile.gettempdir()) / f"gpu-check-smoke-{now:%Y%m%d-%H%M%S}.json")
    check = Check(out, args.budget_s)
    results = check.results
    results.update(date=now.isoformat(timespec="seconds"), smoke=args.smoke,
                   run={"argv": sys.argv[1:] if argv is None else list(argv), "budget_s": args.budget_s,
                        "dtype": str(dtype).removeprefix("torch.")},
                   machine=machine)
    print(f"{results['date']}  {machine['card']}, torch {machine['versions']['torch']}, diffusers "
          f"{machine['versions']['diffusers']}; results: {out}", flush=True)
    if args.smoke:
        print("SMOKE TEST on CPU with the tiny pipelines at tiny shapes: no number of it describes a GPU.", flush=True)
    matmul: dict = {}

    def measure_matmul(row):
        row.update(engine_step.matmul_rate(device, dtype))
        matmul.update(row)

    check.item(results, "matmul", measure_matmul, label="matrix product rate")
    if matmul:
        print(f"matrix product {matmul['size']}^3 {matmul['dtype']}: {matmul['tflops']:.2f} TFLOP/s", flush=True)
    scratch = tempfile.mkdtemp(prefix="gpu-check-")
    kept_tempdir, tempfile.tempdir = tempfile.tempdir, scratch  # tiny models and engine builds (ONNX exports)
    try:
        check_tiny(check, args, device)
        ModelCheck(check, args, device, dtype, matmul.get("tflops")).run(args.models)
    finally:
        tempfile.tempdir = kept_tempdir
        shutil.rmtree(scratch, ignore_errors=True)
    results["not_measured"] = not_measured(results)
    results["failures"] = failures(results)
    check.save(complete=True)
    print_summary(results)
    for line in results["failures"]:
        print(f"FAILED: {line}")
    print(f"\nwrote {out}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
