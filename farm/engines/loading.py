"""Loading a model's pipelines: the device and dtype a config names, the pipeline class of
each task (the family module's word), `from_pretrained` once per distinct source, and the
hash of the weights that engine builds and checkpoints are keyed by.

Shared by the engine (`farm.engines.pipeline_engine`) and engine builds (`farm.engines.build`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from packaging.version import Version

from farm.config import ModelConfig
from farm.domain.spec import Task
from farm.families import family_module

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Price-table kinds by a substring of the CUDA device name; longer names first so
# that "A100" is not read as "A10", nor "L40S" as "L4".
_GPU_KINDS = ("GH200", "H200", "H100", "B200", "A100", "A10G", "A10", "L40S", "L40", "L4", "A6000", "V100", "T4")

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns).
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def resolve_device(device: str) -> torch.device:
    """The torch device of a config value; auto means cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config value; auto means bfloat16 on a GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}") from None


def detect_device_kind(device: torch.device) -> str:
    """The price-table kind of a device: H100, A100, L40S, ... from the GPU name, or CPU."""
    if device.type != "cuda":
        return "CPU"
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for kind in _GPU_KINDS:
        if kind in upper:
            return kind
    return name.removeprefix("NVIDIA ").strip()


def weights_sha256(model_dirs: list[Path]) -> str:
    """sha256 over every weight file of the given directories, in sorted order, names included."""
    digest = hashlib.sha256()
    for model_dir in model_dirs:
        files = sorted(p for p in model_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        for path in files:
            digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(8 * 1024 * 1024):
                    digest.update(chunk)
    return digest.hexdigest()


def pipeline_class_for(model: ModelConfig, task: Task) -> type[DiffusionPipeline]:
    """The diffusers pipeline class that serves one task of a model's family."""
    classes = family_module(model.family).pipeline_classes()
    try:
        return classes[Task(task)]
    except (KeyError, ValueError):
        served = [t.value for t in classes]
        raise ValueError(
            f"model {model.name} ({model.family.value}) cannot serve task {task!r}; its family serves {served}"
        ) from None


def load_pipelines(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[Task, DiffusionPipeline]:
    """Loads each distinct source once; tasks sharing a source share its components."""
    loaded: dict[str, DiffusionPipeline] = {}
    pipelines: dict[Task, DiffusionPipeline] = {}
    for task, source in model.sources.items():
        pipeline_class = pipeline_class_for(model, task)
        if source in loaded:
            shared = loaded[source]
            pipe = shared if type(shared) is pipeline_class else pipeline_class.from_pipe(shared)
        else:
            pipe = pipeline_class.from_pretrained(source, revision=model.revision, **{_DTYPE_KWARG: dtype}).to(device)
            loaded[source] = pipe
        pipe.set_progress_bar_config(disable=True)
        pipelines[task] = pipe
    return pipelines


def enable_vae_tiling(vae: torch.nn.Module) -> None:
    """Spatial tiles, and temporal ones where the VAE has them (`use_framewise_decoding`;
    a VAE without it may decode a few latent frames at a time on its own)."""
    vae.enable_tiling()
    if hasattr(vae, "use_framewise_decoding"):
        vae.use_framewise_decoding = True


def local_model_dir(source: str, revision: str | None) -> Path:
    """Where a source's files are: the directory itself, or a hub id's snapshot in the local cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    # Only reads the cache that from_pretrained has just filled; never downloads.
    return Path(snapshot_download(source, revision=revision, local_files_only=True))
