"""GPU memory: the estimate (how it grows, the sizes it reads from a pipeline's files,
its widths against the bytes a full-size pass keeps alive on torch's meta device), the
device table's validation, and refusal at submit over gRPC (routing and claiming only
where a render fits: tests/unit/test_scheduler.py). No Ray, no GPU."""

from __future__ import annotations

import math
import re
import weakref

import grpc
import pytest

from farm.config import GIB, FarmConfig, ModelConfig, PoolConfig, Task
from farm.domain.errors import InvalidArgument
from farm.domain.spec import RenderSpec
from farm.families import Family
from farm.planning import memory
from farm.jobs.validation import resolve_spec
from farm.planning.memory import (
    MemoryPlanner,
    estimate_memory,
    pool_capacity,
    read_footprint,
)

T2V = Task.TEXT_TO_VIDEO


def pooled_config(memory_gib=None, **model) -> FarmConfig:
    """One LTX-Video model (sources not readable here: the published 2B stands in) on an
    H100 pool and an A100 pool, the A100s with 40 GiB."""
    pools = [PoolConfig(device_kind="H100", num_gpus=1, min_replicas=0, max_replicas=4),
             PoolConfig(device_kind="A100", num_gpus=1, min_replicas=0, max_replicas=4, relative_speed=10.0)]
    fields = dict(name="ltx", family=Family.LTX_VIDEO, sources={T2V: "no-such-dir"}, pools=pools)
    fields.update(model)
    return FarmConfig(models=[ModelConfig(**fields)],
                      devices={"memory_gib": memory_gib or {"H100": 80, "A100": 40}})


def resolved(config: FarmConfig, **fields):
    values = dict(model="ltx", task=T2V, prompt="a lighthouse at dusk")
    values.update(fields)
    return resolve_spec(RenderSpec(**values), {m.name: m for m in config.served_models()})


def need_gib(planner: MemoryPlanner, config: FarmConfig, **fields) -> float:
    return planner.estimate(resolved(config, **fields), config.served_models()[0]).need_bytes / GIB


# The estimate ---------------------------------------------------------------------------


def test_the_estimate_grows_with_frames_size_and_guidance():
    config = pooled_config()
    model = config.served_models()[0]
    planner = MemoryPlanner(config)

    def estimate(**fields):
        return planner.estimate(resolved(config, **fields), model)

    base = estimate(width=768, height=512, num_frames=121, guidance_scale=3.0)
    longer, wider = estimate(width=768, height=512, num_frames=241), estimate(width=1280, height=512, num_frames=121)
    for bigger in (longer, wider):
        assert bigger.denoising_bytes > base.denoising_bytes and bigger.decoding_bytes > base.decoding_bytes
        assert bigger.weights_bytes == base.weights_bytes and bigger.need_bytes > base.need_bytes
    # Guidance runs both halves as one batch: twice the transformer's tokens, the same decode.
    unguided = estimate(width=768, height=512, num_frames=121, guidance_scale=1.0)
    assert base.denoising_bytes == 2 * unguided.denoising_bytes
    assert base.decoding_bytes == unguided.decoding_bytes
    # LTX-Video untiled decodes the whole video at once: the decoder's working set, not the
    # transformer's, grows past the weights for long videos.
    long_video = estimate(width=1280, height=1280, num_frames=257)
    assert long_video.decoding_bytes > long_video.weights_bytes > long_video.denoising_bytes
    assert long_video.peak_bytes == long_video.weights_bytes + long_video.decoding_bytes
    # The margin and the CUDA context on top of the peak.
    assert long_video.need_bytes == int(long_video.peak_bytes * 1.15) + memory.CUDA_CONTEXT_BYTES


def test_vae_tiling_bounds_the_decode_and_float32_doubles_everything():
    config = pooled_config()
    tiled = pooled_config(backend={"vae_tiling": True})
    planner, tiled_planner = MemoryPlanner(config), MemoryPlanner(tiled)
    spec = resolved(config, width=1280, height=1280, num_frames=257)
    untiled = planner.estimate(spec, config.served_models()[0])
    with_tiles = tiled_planner.estimate(spec, tiled.served_models()[0])
    assert with_tiles.decoding_bytes < untiled.decoding_bytes / 4
    assert with_tiles.denoising_bytes == untiled.denoising_bytes
    # Tiled, what is left grows with the video (its copies), not with the decoder's tile.
    longer = tiled_planner.estimate(resolved(config, width=1280, height=1280, num_frames=129), tiled.served_models()[0])
    video = memory.VIDEO_COPIES * 3 * 1280 * 1280 * 2
    assert with_tiles.decoding_bytes - longer.decoding_bytes == video * (257 - 129)
    float32 = pooled_config(dtype="float32")
    full = MemoryPlanner(float32).estimate(spec, float32.served_models()[0])
    assert full.weights_bytes == 2 * untiled.weights_bytes and full.decoding_bytes == 2 * untiled.decoding_bytes


def test_sizes_are_read_from_the_pipelines_files(models_dir):
    """The tiny models' parameters as safetensors counts them, their transformer's width
    and VAE's last stage; CogVideoX's two tasks load two pipelines, both counted."""
    from safetensors import safe_open

    from farm.engines.tiny import tiny_model_configs

    models = {m.name: m for m in tiny_model_configs(models_dir)}

    def counted(directory) -> int:
        total = 0
        for path in directory.glob("*/*.safetensors"):
            with safe_open(str(path), "np") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return total

    ltx = read_footprint(models["ltx-video-tiny"])
    [sizes] = ltx.pipelines.values()
    assert sizes.described_by == str(models_dir / "ltx-video-tiny")
    assert set(sizes.parameters) == {"transformer", "text_encoder", "vae"}
    assert ltx.parameters() == counted(models_dir / "ltx-video-tiny") > 0
    assert (sizes.hidden_size, sizes.vae_channels, sizes.vae_patch_size, sizes.joint_text_tokens) == (32, 8, 4, 0)
    cog = read_footprint(models["cogvideox-tiny"])
    assert len(cog.pipelines) == 2
    assert cog.parameters() == counted(models_dir / "cogvideox-tiny") + counted(models_dir / "cogvideox-i2v-tiny")
    assert cog.for_task(Task.IMAGE_TO_VIDEO).described_by.endswith("cogvideox-i2v-tiny")
    assert cog.for_task(T2V).joint_text_tokens == 226  # the tiny transformer keeps the real text length


def test_unreadable_sources_stand_in_as_the_published_model():
    footprint = read_footprint(pooled_config().served_models()[0])
    [sizes] = footprint.pipelines.values()
    assert sizes is memory.PUBLISHED[Family.LTX_VIDEO] and "assumed" in sizes.described_by
    # LTX-Video 2B with T5-XXL in bfloat16: about 13 GiB of weights.
    assert 12.5 < footprint.parameters() * 2 / GIB < 14


def test_a_model_whose_files_appear_later_is_read_again(models_dir, tmp_path):
    import shutil

    now = [0.0]
    later = tmp_path / "ltx"
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={T2V: str(later)})
    planner = MemoryPlanner(FarmConfig(models=[model]), clock=lambda: now[0])
    assert planner.footprint(model).for_task(T2V) is memory.PUBLISHED[Family.LTX_VIDEO]
    shutil.copytree(models_dir / "ltx-video-tiny", later)
    now[0] = memory.REREAD_ASSUMED_S / 2
    assert planner.footprint(model).for_task(T2V) is memory.PUBLISHED[Family.LTX_VIDEO]
    now[0] = memory.REREAD_ASSUMED_S + 1
    read = planner.footprint(model)
    assert read.for_task(T2V).described_by == str(later)
    now[0] = 10 * memory.REREAD_ASSUMED_S
    assert planner.footprint(model) is read  # files read are kept


# The widths against a full-size pass on the meta device --------------------------------


class LiveBytes:
    """The most bytes of tensor storage alive at once while a call runs (a dispatch mode:
    every op's outputs are counted until the last tensor on their storage is freed).
    Parameters and inputs made before are not counted."""

    def __init__(self, *existing):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self
        self.live, self.current, self.peak = {}, 0, 0
        self.existing = {t.untyped_storage()._cdata for t in existing}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if hasattr(tensor, "untyped_storage"):
                        counter._track(tensor)
                return out

        self.mode = Mode()

    def _track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.existing:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def run(self, call) -> int:
        import torch

        with torch.inference_mode(), self.mode:
            call()
        return self.peak


def efficient_attention(query, key, value, **_):
    """What PyTorch's flash and memory-efficient kernels allocate: the output and a float32
    log-sum-exp per query (the meta device would otherwise take the quadratic math path)."""
    import torch

    torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    return torch.empty(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)


@pytest.fixture
def meta_attention(monkeypatch):
    import torch

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)


def published_config(family: Family, **model) -> tuple[ModelConfig, memory.ModelFootprint]:
    config = ModelConfig(name="m", family=family, sources={T2V: "no-such-dir"}, **model)
    return config, read_footprint(config)


def spec_of(model: ModelConfig, width: int, height: int, frames: int, guidance: float):
    return resolve_spec(RenderSpec(model="m", task=T2V, prompt="x", width=width, height=height, num_frames=frames,
                                   guidance_scale=guidance), {"m": model})


@pytest.mark.parametrize("family, width, height, frames", [(Family.LTX_VIDEO, 768, 512, 121),
                                                           (Family.COGVIDEOX, 720, 480, 49)])
def test_denoising_estimate_covers_a_full_size_transformer_pass(meta_attention, family, width, height, frames):
    """The published transformer at full size, one guided pass (batch 2) in bfloat16: the
    activations it keeps alive are within the estimate, and the estimate within 1.6x."""
    import torch

    from benchmarks.engine_step import COGVIDEOX_TRANSFORMER, LTX_TRANSFORMER

    meta, dtype = torch.device("meta"), torch.bfloat16
    model, footprint = published_config(family)
    spec = spec_of(model, width, height, frames, guidance=5.0)
    if family is Family.LTX_VIDEO:
        from diffusers import LTXVideoTransformer3DModel

        with meta:
            transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER).to(dtype)
        latent = ((frames - 1) // 8 + 1, height // 32, width // 32)

        def call():
            transformer(hidden_states=torch.empty(2, math.prod(latent), 128, dtype=dtype, device=meta),
                        encoder_hidden_states=torch.empty(2, 128, 4096, dtype=dtype, device=meta),
                        timestep=torch.empty(2, dtype=dtype, device=meta),
                        encoder_attention_mask=torch.ones(2, 128, dtype=torch.bool, device=meta),
                        num_frames=latent[0], height=latent[1], width=latent[2], return_dict=False)
    else:
        from diffusers import CogVideoXTransformer3DModel

        with meta:
            transformer = CogVideoXTransformer3DModel(**COGVIDEOX_TRANSFORMER).to(dtype)
        latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
        positions = latent[0] * latent[1] * latent[2] // 4
        rotary = tuple(torch.empty(positions, 64, device=meta) for _ in range(2))

        def call():
            transformer(hidden_states=torch.empty(2, latent[0], 16, latent[1], latent[2], dtype=dtype, device=meta),
                        encoder_hidden_states=torch.empty(2, 226, 4096, dtype=dtype, device=meta),
                        timestep=torch.zeros(2, dtype=torch.long, device=meta), image_rotary_emb=rotary,
                        return_dict=False)

    counted = LiveBytes(*transformer.parameters(), *transformer.buffers()).run(call)
    estimated = estimate_memory(spec, model, footprint, margin=0).denoising_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / GIB, estimated / GIB)


@pytest.mark.parametrize("family, width, height, frames, tiled", [
    (Family.LTX_VIDEO, 512, 512, 41, False), (Family.LTX_VIDEO, 768, 544, 41, True),
    (Family.COGVIDEOX, 720, 480, 17, False)])
def test_decoding_estimate_covers_a_full_size_vae_decode(family, width, height, frames, tiled):
    """The published VAE decodes a whole video in bfloat16 (untiled, or tiled as the
    engine sets it up): what it keeps alive is within the estimate, and the estimate
    within 1.6x."""
    import torch

    from benchmarks.engine_step import COGVIDEOX_VAE, LTX_VAE
    from farm.engines.pipeline_engine import enable_vae_tiling

    meta, dtype = torch.device("meta"), torch.bfloat16
    model, footprint = published_config(family, backend={"vae_tiling": tiled})
    if family is Family.LTX_VIDEO:
        from diffusers import AutoencoderKLLTXVideo

        with meta:
            vae = AutoencoderKLLTXVideo(**LTX_VAE).to(dtype)
        latents = (1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    else:
        from diffusers import AutoencoderKLCogVideoX

        with meta:
            vae = AutoencoderKLCogVideoX(**COGVIDEOX_VAE).to(dtype)
        latents = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    if tiled:
        enable_vae_tiling(vae)

    def call():
        video = vae.decode(torch.empty(latents, dtype=dtype, device=meta), return_dict=False)[0]
        assert video.shape[2:] == (frames, height, width)

    counted = LiveBytes(*vae.parameters(), *vae.buffers()).run(call)
    estimated = estimate_memory(spec_of(model, width, height, frames, 1.0), model, footprint, margin=0).decoding_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / GIB, estimated / GIB)


# The device table ------------------------------------------------------------------------


def test_device_memory_is_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"devices.memory_gib\[H100\] must be within 1..4096 GiB, got 0.5"):
        FarmConfig(models=[], devices={"memory_gib": {"H100": 0.5}})
    with pytest.raises(ValueError, match=r"devices.memory_gib\[A100\] must be within 1..4096 GiB, got 1000000.0"):
        FarmConfig(models=[], devices={"memory_gib": {"A100": 1e6}})
    with pytest.raises(ValueError, match=r"devices.memory_gib\[L40S\] must be within .* got nan"):
        FarmConfig(models=[], devices={"memory_gib": {"L40S": float("nan")}})
    with pytest.raises(ValueError, match="memory_margin"):
        FarmConfig(models=[], devices={"memory_margin": -0.1})
    # A GPU pool of a priced kind the table lacks cannot be checked: a start-up error.
    with pytest.raises(ValueError, match=r"pool 'L40S' runs on GPUs .* devices.memory_gib has no 'L40S'"):
        pooled_config(memory_gib={"H100": 80, "A100": 40},
                      pools=[PoolConfig(device_kind="L40S", num_gpus=1)])
    # CPU pools and GPU pools whose kind is detected at start are not checked.
    FarmConfig(models=[ModelConfig(name="m", family=Family.LTX_VIDEO, sources={T2V: "d"}, num_gpus=1)],
               devices={"memory_gib": {}})
    assert FarmConfig(models=[]).devices.memory_gib["A100"] == 80  # a 40 GB farm says so


def test_pool_capacity_follows_the_table_and_the_share_of_a_gpu():
    config = pooled_config()
    model = config.served_models()[0]
    assert pool_capacity(model, "A100", config.devices) == 40 * GIB
    half = ModelConfig(name="m", family=Family.LTX_VIDEO, sources={T2V: "d"},
                       pools=[PoolConfig(device_kind="H100", num_gpus=0.5), PoolConfig(device_kind="CPU")])
    assert pool_capacity(half, "H100", config.devices) == 40 * GIB
    assert pool_capacity(half, "CPU", config.devices) is None
    detected = ModelConfig(name="m", family=Family.LTX_VIDEO, sources={T2V: "d"}, num_gpus=1)
    assert pool_capacity(detected, "H100", config.devices) == 80 * GIB  # the kind the engine detected
    assert pool_capacity(detected, "RTX4090", config.devices) is None


# Refusal at submit -------------------------------------------------------------------------


def refusal(planner: MemoryPlanner, config: FarmConfig, kinds: list[str], **fields):
    with pytest.raises(InvalidArgument) as raised:
        planner.place(resolved(config, **fields), config.served_models()[0], kinds)
    [violation] = raised.value.violations
    return violation


def test_a_spec_that_fits_no_gpu_names_the_field_to_change_and_the_limit():
    config = pooled_config()
    planner = MemoryPlanner(config)
    # 1280x1280x257 needs about 68 GiB: it fits the H100s only.
    need, kinds = planner.place(resolved(config, width=1280, height=1280, num_frames=257),
                                config.served_models()[0], ["H100", "A100"])
    assert kinds == ["H100"] and 60 * GIB < need < 80 * GIB
    violation = refusal(planner, config, ["A100"], width=1280, height=1280, num_frames=257,
                        require_device_kind="A100")
    assert violation.field == "spec.num_frames"
    assert "the GPU it requires (A100) has 40.0 GiB" in violation.description
    assert f"needs about {need / GIB:.1f} GiB" in violation.description
    # The frame count it offers is the most that fits: one step more does not.
    most = int(re.search(r"at most (\d+) frames fit", violation.description).group(1))
    assert need_gib(planner, config, width=1280, height=1280, num_frames=most) <= 40
    assert need_gib(planner, config, width=1280, height=1280, num_frames=most + 8) > 40


def test_too_large_a_frame_or_too_large_a_model_is_named_as_such():
    # 17 GiB holds LTX-Video's weights with a small render, not 1280x704 even at 9 frames.
    config = pooled_config(memory_gib={"H100": 17, "A100": 17})
    planner = MemoryPlanner(config)
    assert need_gib(planner, config, width=32, height=32, num_frames=9) <= 17
    violation = refusal(planner, config, ["H100", "A100"], width=1280, height=704, num_frames=9)
    assert violation.field == "spec.width" and "even at 9 frames; ask for a smaller size" in violation.description
    assert "the largest GPU it may run on" in violation.description
    assert refusal(planner, config, ["H100"], width=704, height=1280, num_frames=9).field == "spec.height"
    # 16 GiB cannot hold the weights: no spec would fit, and the refusal says why.
    small = pooled_config(memory_gib={"H100": 16, "A100": 16})
    violation = refusal(MemoryPlanner(small), small, ["H100"], width=256, height=256, num_frames=9)
    assert violation.field == "spec.model" and "its weights alone take about 13." in violation.description


@pytest.fixture
def gateway(tmp_path):
    """The gateway in this process, its store in tmp_path; the default tenant's client."""
    from tests.gateway import serving

    config = pooled_config().model_copy(update={"home": tmp_path})
    config.gateway.port = config.gateway.metrics_port = 0
    with serving(config) as local:
        yield local.client, local.store


def test_submit_and_estimate_refuse_over_grpc_with_the_field_and_leave_nothing(gateway):
    from farm.v1 import render_pb2 as pb
    from tests.gateway import bad_request_fields

    client, store = gateway
    tenant = store.tenant_by_name("default")
    spec = pb.RenderSpec(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, prompt="a lighthouse", width=1280, height=1280,
                         num_frames=257, placement=pb.Placement(require_device_kind="A100"))
    for call in (client.submit, client.estimate):
        with pytest.raises(grpc.RpcError) as error:
            call(spec)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = bad_request_fields(error.value)
        assert list(fields) == ["spec.num_frames"]
        assert "A100) has 40.0 GiB" in fields["spec.num_frames"] and "at most" in fields["spec.num_frames"]
    assert store.list(tenant.id, page_size=10)[0] == [] and store.ledger_total_nanodollars() == 0
    # Without the requirement it fits the H100s: accepted, its need stored, its cost on them.
    spec.placement.require_device_kind = ""
    assert client.estimate(spec).device_kind == "H100"
    render = client.submit(spec)
    record = store.get(tenant.id, render.id)
    assert 60 * GIB < record.spec.memory_bytes < 80 * GIB
