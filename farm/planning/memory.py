"""Peak GPU memory of a render, estimated before it runs, and which pools can hold it.

The gateway refuses at submit a spec that fits none of the GPUs it may run on (naming
the field and the limit) and stores with every other render the memory it needs; the
scheduler sends a render only to pools whose devices hold it. Nothing here imports
torch: the sizes come from the pipelines' files (``config.json`` and the headers of the
``.safetensors`` weights, a few kilobytes each), read once per model.

The estimate is of what ``torch.cuda.max_memory_allocated`` reports over a render (what
every render's manifest records as ``peak_memory_bytes``), in bytes::

    peak = weights + max(denoising, decoding)

weights
    Every parameter of every pipeline the engine keeps on the device (transformer, text
    encoder and VAE; one pipeline per distinct source of the model) at the model's dtype
    (auto: bfloat16, as on every GPU).
denoising
    ``tokens x hidden x (ACTIVATION_WIDTHS x dtype bytes + FLOAT32_WIDTHS x 4)``: the
    activations of one transformer pass. ``tokens`` are the latent tokens (latent frames x
    latent height x latent width, after the transformer's patches), twice with classifier-free
    guidance (both halves run as one batch), plus the text tokens a family's transformer
    attends to jointly with them, if any. Inference keeps no activations for a backward
    pass, so only one block's are alive at a time, and attention is memory-efficient
    (PyTorch's SDPA kernels), so nothing grows with tokens squared: the working set is
    linear in tokens.
decoding
    ``vae_widths x channels x tile frames x tile pixels / patch² x dtype bytes`` for the
    VAE decoder's last stage (full resolution, the widest in memory) over one tile, plus
    ``VIDEO_COPIES x 3 x frames x height x width x dtype bytes`` for the decoded video
    (tiles are blended into a whole video, which is then rescaled). A tile: the frames the
    family's VAE decodes at once, with ``backend.vae_tiling`` or without it, over the
    spatial tile of its tiled decode or the whole frame (the family module's
    ``FACTS.memory`` and ``vae_decode_tile``).

A device holds the render when ``peak x (1 + devices.memory_margin) + CUDA_CONTEXT_BYTES``
is at most its memory (`farm.config.DeviceConfig`); that figure is the render's
``memory_bytes``. The widths and copies below were counted, not measured on a GPU: the
bytes of live tensors through a full-size pass of each published transformer and VAE
on torch's meta device (`tests/unit/test_memory.py` counts them again and holds the
formula to them). A GPU adds what that leaves out: the caching allocator's rounding
and fragmentation, and kernel workspaces (hence the margin).

When the model's files cannot be read where this runs (a hub id not in the local cache),
the family's published model stands in (``FACTS.memory.published``).
Engine backends are not modelled: FP8 layers (smaller weights) and a TensorRT engine
(which holds weights of its own) are estimated as eager.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from pathlib import Path

from farm.config import GIB, DeviceConfig, FarmConfig, ModelConfig
from farm.domain.errors import FieldViolation, InvalidArgument
from farm.domain.spec import ResolvedSpec, Task
from farm.families import FAMILY_MODULES, Family, PipelineSizes, family_facts, family_module

log = logging.getLogger(__name__)

# Hidden-state widths alive at the peak of a transformer block, in the model's dtype:
# the residual stream, the normed input, q, k, v, the attention output and the MLP's
# 4x-wide hidden layer, less what is freed on the way (counted for each family's
# published transformer, as its module says, and rounded up over them: LTX-2's, with its
# audio-to-video cross-attention, keeps about 14.2).
ACTIVATION_WIDTHS = 15
# ... and in float32: rotary tables, cos and sin for every token (counted likewise).
FLOAT32_WIDTHS = 2
# Copies of the decoded video alive while it is blended and rescaled (counted: 3).
VIDEO_COPIES = 3
# What the CUDA context, cuBLAS and cuDNN take outside the caching allocator.
CUDA_CONTEXT_BYTES = 1 * GIB
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# A model whose files could not be read is looked for again after this long.
REREAD_ASSUMED_S = 60.0


# Each family's published model, which stands in where a model's files cannot be read.
PUBLISHED: dict[Family, PipelineSizes] = {family: family_facts(family).memory.published for family in FAMILY_MODULES}


@dataclasses.dataclass(frozen=True)
class ModelFootprint:
    """The pipelines a model's engine loads: one per distinct source, all on the device at once."""

    pipelines: dict[str, PipelineSizes]
    """By source."""
    sources: dict[Task, str]

    def parameters(self) -> int:
        return sum(sum(sizes.parameters.values()) for sizes in self.pipelines.values())

    def for_task(self, task: Task) -> PipelineSizes:
        return self.pipelines[self.sources[task]]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    denoising_bytes: int
    decoding_bytes: int
    peak_bytes: int
    """weights + max(denoising, decoding): comparable with a manifest's peak_memory_bytes."""
    need_bytes: int
    """What a device must hold: the peak with the margin, plus the CUDA context."""

    def describe(self) -> str:
        return (f"weights {_gib(self.weights_bytes)}, denoising {_gib(self.denoising_bytes)}, "
                f"decoding {_gib(self.decoding_bytes)} GiB")


def read_footprint(model: ModelConfig) -> ModelFootprint:
    """Reads each distinct source of the model (a directory, or a hub id's snapshot in the
    local cache); a source that cannot be read is taken to be its family's published model."""
    pipelines = {}
    for source in dict.fromkeys(model.sources.values()):
        directory = _local_dir(source, model.revision)
        sizes = None
        if directory is not None:
            try:
                sizes = read_pipeline_sizes(directory, model.family)
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("cannot read the sizes of %s (%s); assuming the published %s", directory, error,
                            model.family.value)
        pipelines[source] = sizes or PUBLISHED[model.family]
    return ModelFootprint(pipelines, dict(model.sources))


def read_pipeline_sizes(directory: Path, family: Family) -> PipelineSizes:
    """Sizes of a diffusers pipeline directory (model_index.json and its component folders)."""
    directory = Path(directory)
    index = json.loads((directory / "model_index.json").read_text())
    parameters = {}
    for component in index:
        folder = directory / component
        if component.startswith("_") or not folder.is_dir():
            continue
        count = _parameters_in(folder)
        if count:
            parameters[component] = count
    published = PUBLISHED[family]
    module = family_module(family)
    transformer = _config(directory / module.FACTS.denoiser)
    vae = _config(directory / "vae")
    # A UNet family says what width stands for its activations (a transformer's is heads x head size).
    width = getattr(module, "activation_width", None)
    hidden = width(transformer) if width is not None else \
        transformer.get("num_attention_heads", 0) * transformer.get("attention_head_dim", 0)
    channels = vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or [published.vae_channels]
    joint = module.joint_text_tokens(transformer)
    tile = module.vae_decode_tile(vae)
    return PipelineSizes(
        parameters=parameters, hidden_size=hidden or published.hidden_size, joint_text_tokens=int(joint),
        vae_channels=int(channels[0]), vae_patch_size=int(vae.get("patch_size", 1) or 1), vae_tile=tile,
        described_by=str(directory))


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _parameters_in(folder: Path) -> int:
    """Parameters of one component: from the safetensors headers from_pretrained would
    load, else (older formats) from the size of the weight files at 2 bytes a parameter,
    which over-counts weights stored in float32."""
    files = sorted(p for p in folder.iterdir() if _WEIGHTS.match(p.name))
    if not files:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        return sum(_safetensors_parameters(path) for path in files)
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in _OTHER_WEIGHTS) // 2


def _safetensors_parameters(path: Path) -> int:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path} does not start with a safetensors header")
        header = json.loads(f.read(length))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def _local_dir(source: str, revision: str | None) -> Path | None:
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        # Only the local cache: the gateway never downloads weights.
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not cached here, not a hub id, or no huggingface_hub
        return None


def estimate_memory(spec: ResolvedSpec, model: ModelConfig, footprint: ModelFootprint,
                    margin: float) -> MemoryEstimate:
    """The render's peak device memory by the formula of the module docstring."""
    sizes = footprint.for_task(spec.task)
    dtype_bytes = DTYPE_BYTES.get(model.dtype, 4)
    weights = footprint.parameters() * dtype_bytes
    family = family_facts(model.family)
    batch = family.guidance_batch if spec.guidance_scale > 1 else 1
    pixels = family.compression.token_pixels
    latent_frames = family.compression.latent_frames(spec.num_frames)
    tokens = batch * (latent_frames * math.ceil(spec.height / pixels) * math.ceil(spec.width / pixels)
                      + sizes.joint_text_tokens)
    denoising = tokens * sizes.hidden_size * (ACTIVATION_WIDTHS * dtype_bytes + FLOAT32_WIDTHS * 4)
    frames, height, width = _decode_tile(spec, model, sizes)
    patch = sizes.vae_patch_size
    decoding = (family.memory.vae_widths * sizes.vae_channels * frames * math.ceil(height / patch) * math.ceil(width / patch)
                + VIDEO_COPIES * 3 * spec.num_frames * spec.height * spec.width) * dtype_bytes
    peak = weights + max(denoising, decoding)
    return MemoryEstimate(weights, denoising, decoding, peak, int(peak * (1 + margin)) + CUDA_CONTEXT_BYTES)


def _decode_tile(spec: ResolvedSpec, model: ModelConfig, sizes: PipelineSizes) -> tuple[int, int, int]:
    """(frames, height, width) the VAE decoder's last stage works on at once."""
    tiled = model.backend.vae_tiling
    memory = family_facts(model.family).memory
    at_once = memory.tiled_decode_frames if tiled else memory.decode_frames
    frames = spec.num_frames if at_once is None else min(spec.num_frames, at_once)
    if not tiled:
        return frames, spec.height, spec.width
    return frames, min(spec.height, sizes.vae_tile[0]), min(spec.width, sizes.vae_tile[1])


def pool_capacity(model: ModelConfig, device_kind: str, devices: DeviceConfig) -> int | None:
    """Bytes one replica of the model's pool of this kind may use; None when not checked
    (a CPU pool, or a GPU kind `devices.memory_gib` does not list). A replica with a
    fraction of a GPU gets that fraction; farm's engines use one device however many
    GPUs a replica reserves."""
    pools = model.resolved_pools()
    pool = next((p for p in pools if p.device_kind == device_kind), None)
    pool = pool or next((p for p in pools if p.device_kind == "auto"), None)
    if pool is None or not pool.num_gpus:
        return None
    memory = devices.memory_bytes(device_kind)
    return None if memory is None else int(memory * min(pool.num_gpus, 1.0))


def fits(need_bytes: int | None, capacity: int | None) -> bool:
    return need_bytes is None or capacity is None or need_bytes <= capacity


class MemoryPlanner:
    """The gateway's side: each model's footprint, read once (again after a while when
    a source could not be read: its files may not be written yet), and the submit check."""

    def __init__(self, config: FarmConfig, clock=time.monotonic):
        self.devices = config.devices
        self._footprints: dict[str, tuple[float, ModelFootprint]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def footprint(self, model: ModelConfig) -> ModelFootprint:
        with self._lock:
            now = self._clock()
            cached = self._footprints.get(model.name)
            assumed = cached is not None and any(s in PUBLISHED.values() for s in cached[1].pipelines.values())
            if cached is None or (assumed and now - cached[0] > REREAD_ASSUMED_S):
                cached = self._footprints[model.name] = (now, read_footprint(model))
            return cached[1]

    def estimate(self, spec: ResolvedSpec, model: ModelConfig) -> MemoryEstimate:
        return estimate_memory(spec, model, self.footprint(model), self.devices.memory_margin)

    def place(self, spec: ResolvedSpec, model: ModelConfig, kinds: list[str]) -> tuple[int, list[str]]:
        """(bytes the render needs, the kinds among `kinds` whose devices hold it). Raises
        InvalidArgument naming the field to change when no kind holds it."""
        estimate = self.estimate(spec, model)
        capacities = {kind: pool_capacity(model, kind, self.devices) for kind in kinds}
        fitting = [kind for kind, capacity in capacities.items() if fits(estimate.need_bytes, capacity)]
        if fitting or not kinds:
            return estimate.need_bytes, fitting
        raise InvalidArgument([self._violation(spec, model, estimate, capacities)])

    def _violation(self, spec: ResolvedSpec, model: ModelConfig, estimate: MemoryEstimate,
                   capacities: dict[str, int]) -> FieldViolation:
        kind = max(capacities, key=lambda k: capacities[k])
        limit = capacities[kind]
        gpu = (f"the GPU it requires ({kind}) has" if spec.require_device_kind
               else f"the largest GPU it may run on ({kind}) has")
        gpu = f"{gpu} {_gib(limit)} GiB"
        needs = (f"needs about {_gib(estimate.need_bytes)} GiB of GPU memory ({estimate.describe()}, plus a "
                 f"{self.devices.memory_margin:.0%} margin and the CUDA context); {gpu}")
        limits = model.limits
        assert limits is not None
        smallest = dataclasses.replace(spec, num_frames=limits.min_frames, width=limits.min_size,
                                       height=limits.min_size)
        if self.estimate(smallest, model).need_bytes > limit:
            return FieldViolation("spec.model", f"no render of {model.name} fits: its weights alone take about "
                                                f"{_gib(estimate.weights_bytes)} GiB; {gpu}")
        size = f"{spec.width}x{spec.height}"
        frames = self._most_frames(spec, model, limit)
        if frames:
            return FieldViolation("spec.num_frames", f"{spec.num_frames} frames at {size} {needs}; at {size} "
                                                     f"at most {frames} frames fit")
        field = "spec.width" if spec.width >= spec.height else "spec.height"
        return FieldViolation(field, f"{size} {needs} even at {limits.min_frames} frames; ask for a smaller size")

    def _most_frames(self, spec: ResolvedSpec, model: ModelConfig, limit: int) -> int | None:
        """The most frames (a count the model accepts) that fit at the spec's size, or None."""
        limits = model.limits
        assert limits is not None
        for frames in range(spec.num_frames - limits.frame_step, limits.min_frames - 1, -limits.frame_step):
            if self.estimate(dataclasses.replace(spec, num_frames=frames), model).need_bytes <= limit:
                return frames
        return None


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"
