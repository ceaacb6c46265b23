"""Backends on the tiny random-weight models: ONNX export and ONNX Runtime against eager,
engine builds and their cache, the eager fallback (and refusal) for unbuilt shapes,
First-Block Cache, FP8's refusal on CPU and its layer arithmetic, VAE tiling.

Error measure throughout: max|x - eager| / max|eager| (relative to the reference's
largest magnitude). Stated tolerances:

- ONNX Runtime CPU provider, float32 graph, one transformer call: < 1e-3 (measured ~1e-6);
- a whole 3-step render through the onnx backend: uint8 frames within 1 of eager, mean
  absolute difference below 0.01 (the VAE and scheduler are the same code; only the
  transformer's float32 rounding differs);
- FP8 (e4m3, per-row scales) linear layers of the tiny transformer: < 1.5e-1.

torch.compile on this 2-core CPU takes 20-60 s for one compile of the tiny LTX-Video
transformer (the first compile on a machine is the slowest), so it is tested once,
through a whole build, load and render.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from pydantic import ValidationError

from farm.config import BackendConfig, ModelConfig, Task
from farm.domain.engine import EngineRequest
from farm.engines import load_engine
from farm.engines.backends import ShapeBucket, create_backend, parse_shape
from farm.engines.backends.backend import (
    BackendUnavailable,
    CallMismatch,
    CallSignature,
    capture_transformer_call,
    first_output,
    relative_error,
)
from farm.engines.backends.fp8 import (
    Float8Linear,
    fp8_layer_names,
    quantize_linear_layers,
)
from farm.engines.backends.onnx import ONNX_FILE, OnnxBackend
from farm.engines.build import (
    REFERENCE_OUTPUT_FILE,
    BuildRecord,
    EngineBuildMissing,
    build_engine,
    build_key,
    engine_key_fields,
)
from farm.engines.pipeline_engine import DiffusersEngine
from farm.engines.tiny import tiny_model_configs
from farm.families import Family

ONNX_FLOAT32_TOLERANCE = 1e-3
FP8_TOLERANCE = 1.5e-1
BUILT_SHAPE = ShapeBucket(64, 64, 9, batch=2)
TRANSFORMER_CLASSES = {"ltx-video-tiny": LTXVideoTransformer3DModel, "cogvideox-tiny": CogVideoXTransformer3DModel}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def tiny_models(models_dir) -> dict[str, ModelConfig]:
    return {model.name: model for model in tiny_model_configs(models_dir)}


def with_backend(model: ModelConfig, **backend) -> ModelConfig:
    return model.model_copy(update={"backend": BackendConfig(**backend)})


@pytest.fixture(scope="module")
def onnx_models(tiny_models, cache_dir) -> dict[str, ModelConfig]:
    return {name: with_backend(model, name="onnx", cache_dir=str(cache_dir)) for name, model in tiny_models.items()}


@pytest.fixture(scope="module")
def onnx_builds(onnx_models) -> dict[str, Path]:
    """One text-to-video ONNX build of LTX-Video and CogVideoX at 64x64x9 with guidance (the
    slow part: two exports). The newer families' transformers are not exported here (the
    README's model table says so)."""
    return {
        name: build_engine(onnx_models[name], BUILT_SHAPE, tasks=[Task.TEXT_TO_VIDEO])
        for name in ("ltx-video-tiny", "cogvideox-tiny")
    }


@pytest.fixture(scope="module")
def eager_ltx(tiny_models) -> DiffusersEngine:
    return load_engine(tiny_models["ltx-video-tiny"])


@pytest.fixture(scope="module")
def onnx_ltx(onnx_models, onnx_builds) -> DiffusersEngine:
    return load_engine(onnx_models["ltx-video-tiny"])


def request(task: Task = Task.TEXT_TO_VIDEO, **overrides) -> EngineRequest:
    fields = dict(
        render_id="r-1", attempt=1, task=task, prompt="a red fox running through a snowy forest",
        negative_prompt="blurry", image=None, width=64, height=64, num_frames=9, fps=24,
        num_inference_steps=3, guidance_scale=3.0, seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


def render(engine: DiffusersEngine, **overrides):
    return engine.render(request(**overrides), lambda progress: None, lambda: False)


# Shapes and configuration -----------------------------------------------------------------


def test_parse_shape_reads_width_height_frames_and_explains_mistakes():
    assert parse_shape("768x512x121") == ShapeBucket(768, 512, 121, 2)
    assert parse_shape(" 720X480X49 ", batch=1) == ShapeBucket(720, 480, 49, 1)
    for text in ("768x512", "768x512x121x2", "wide", "", "0x512x121", "-8x512x121"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHTxFRAMES|positive"):
            parse_shape(text)
    with pytest.raises(ValueError, match="batch"):
        parse_shape("64x64x9", batch=3)
    assert ShapeBucket.for_render(64, 64, 9, guidance_scale=3.0).batch == 2
    assert ShapeBucket.for_render(64, 64, 9, guidance_scale=1.0).batch == 1


def test_backend_config_defaults_and_combinations(monkeypatch, tmp_path):
    config = BackendConfig()
    assert (config.name, config.first_block_cache_threshold, config.missing_build) == ("eager", None, "eager")
    assert config.onnx_provider == "auto" and config.vae_tiling is False
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    assert config.resolved_cache_dir == tmp_path / "engine-cache"
    assert BackendConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir == tmp_path / "x"
    with pytest.raises(ValidationError, match="onnx"):
        BackendConfig(name="onnx", first_block_cache_threshold=0.1)
    with pytest.raises(ValidationError):
        BackendConfig(name="tensorrt")


def test_build_refuses_shapes_the_model_cannot_render(onnx_models, cache_dir):
    with pytest.raises(ValueError, match="frames must be 8k\\+1"):
        build_engine(onnx_models["ltx-video-tiny"], "64x64x10", cache_dir)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_engine(onnx_models["ltx-video-tiny"], "70x64x9", cache_dir)
    with pytest.raises(ValueError, match="needs no build"):
        build_engine(with_backend(onnx_models["ltx-video-tiny"], name="eager"), "64x64x9", cache_dir)


# ONNX against eager -----------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["ltx-video-tiny", "cogvideox-tiny"])
def test_onnx_export_on_cpu_provider_matches_eager_transformer(models_dir, onnx_builds, model_name):
    record = BuildRecord.read(onnx_builds[model_name] / Task.TEXT_TO_VIDEO.value)
    assert record.backend == "onnx-cpu-float32" and record.shape == BUILT_SHAPE
    assert record.relative_error < ONNX_FLOAT32_TOLERANCE <= record.tolerance

    # A transformer loaded on its own, not the one the build used.
    transformer = TRANSFORMER_CLASSES[model_name].from_pretrained(
        models_dir / model_name, subfolder="transformer"  # the text-to-video directory is named after the model
    ).eval()
    backend = OnnxBackend(BackendConfig(name="onnx"), torch.device("cpu"), torch.float32)
    runner = backend.load(transformer, record.call_signature(), record.directory)
    assert runner.session.get_providers() == ["CPUExecutionProvider"]

    sample = record.sample_call(torch.device("cpu"))
    # Other inputs than the export saw: the graph must compute, not replay, its sample.
    generator = torch.Generator().manual_seed(7)
    varied = dict(sample)
    varied["hidden_states"] = torch.randn(sample["hidden_states"].shape, generator=generator)
    varied["encoder_hidden_states"] = torch.randn(sample["encoder_hidden_states"].shape, generator=generator)
    varied["timestep"] = torch.full_like(sample["timestep"], 321)
    if model_name == "ltx-video-tiny":
        varied["rope_interpolation_scale"] = (8 / 12, 32, 32)  # another frame rate: a graph input
    for arguments in (sample, varied):
        with torch.inference_mode():
            eager = transformer(**arguments, return_dict=False)[0]
            built = runner(**arguments, return_dict=False)[0]
            as_output_object = runner(**arguments).sample
        assert built.dtype == eager.dtype and built.shape == eager.shape
        assert relative_error(built, eager) < ONNX_FLOAT32_TOLERANCE
        torch.testing.assert_close(as_output_object, built)

    wrong = dict(sample, hidden_states=sample["hidden_states"][:1])
    with pytest.raises(CallMismatch, match="hidden_states"):
        runner(**wrong, return_dict=False)


def test_whole_render_through_onnx_matches_eager(eager_ltx, onnx_ltx):
    assert onnx_ltx.backend == "onnx-cpu-float32"
    assert onnx_ltx.built_shapes(Task.TEXT_TO_VIDEO) == [BUILT_SHAPE]
    built = render(onnx_ltx)
    eager = render(eager_ltx)
    assert built.backend == "onnx-cpu-float32" and built.notes == []
    assert eager.backend == "eager-float32" and eager.notes == []
    difference = np.abs(built.frames.astype(np.int16) - eager.frames.astype(np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01
    description = onnx_ltx.describe()
    assert description["backend"] == "onnx-cpu-float32"
    assert description["built_shapes"]["text-to-video"] == [BUILT_SHAPE.describe()]
    assert description["backend_details"]["provider"] == "cpu"


def test_image_to_video_build_joins_the_same_key_and_matches_eager(onnx_models, onnx_builds, eager_ltx):
    # LTX-Video's image-to-video pipeline gives the transformer a per-token timestep:
    # another graph, built beside the text-to-video one under the same key.
    from PIL import Image

    text_graph = onnx_builds["ltx-video-tiny"] / Task.TEXT_TO_VIDEO.value / ONNX_FILE
    written = text_graph.stat().st_mtime_ns
    directory = build_engine(onnx_models["ltx-video-tiny"], BUILT_SHAPE, tasks=[Task.IMAGE_TO_VIDEO])
    assert directory == onnx_builds["ltx-video-tiny"] and text_graph.stat().st_mtime_ns == written
    record = BuildRecord.read(directory / Task.IMAGE_TO_VIDEO.value)
    timestep = next(a for a in record.signature["arguments"] if a["name"] == "timestep")
    assert len(timestep["tensors"][0]["shape"]) == 2  # (batch, tokens)

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    engine = load_engine(onnx_models["ltx-video-tiny"])
    assert engine.built_shapes(Task.IMAGE_TO_VIDEO) == [BUILT_SHAPE]
    built = render(engine, task=Task.IMAGE_TO_VIDEO, image=buffer.getvalue())
    eager = render(eager_ltx, task=Task.IMAGE_TO_VIDEO, image=buffer.getvalue())
    assert built.backend == "onnx-cpu-float32"
    difference = np.abs(built.frames.astype(np.int16) - eager.frames.astype(np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_whole_cogvideox_render_through_onnx_matches_eager(tiny_models, onnx_models, onnx_builds):
    built = render(load_engine(onnx_models["cogvideox-tiny"]))
    eager = render(load_engine(tiny_models["cogvideox-tiny"]))
    assert built.backend == "onnx-cpu-float32"
    difference = np.abs(built.frames.astype(np.int16) - eager.frames.astype(np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01


# Builds and their cache -------------------------------------------------------------------


def test_build_key_changes_with_shape_and_backend_and_a_second_build_is_a_hit(onnx_models, onnx_builds, eager_ltx,
                                                                               monkeypatch):
    cpu = torch.device("cpu")
    onnx = create_backend(BackendConfig(name="onnx"), cpu, torch.float32)
    compiled = create_backend(BackendConfig(name="compile"), cpu, torch.float32)
    onnx_fields = engine_key_fields(eager_ltx.weights_sha256, onnx, None)
    compile_fields = engine_key_fields(eager_ltx.weights_sha256, compiled, None)
    assert onnx_fields["device"] == "cpu" and "onnxruntime" in onnx_fields["versions"]
    keys = {
        build_key(onnx_fields, BUILT_SHAPE),
        build_key(onnx_fields, ShapeBucket(96, 64, 9, 2)),
        build_key(onnx_fields, ShapeBucket(64, 96, 9, 2)),
        build_key(onnx_fields, ShapeBucket(64, 64, 17, 2)),
        build_key(onnx_fields, ShapeBucket(64, 64, 9, 1)),
        build_key(compile_fields, BUILT_SHAPE),
        build_key(engine_key_fields("0" * 64, onnx, None), BUILT_SHAPE),
    }
    assert len(keys) == 7
    assert build_key(onnx_fields, BUILT_SHAPE) == build_key(dict(onnx_fields), ShapeBucket(64, 64, 9))

    directory = onnx_builds["ltx-video-tiny"]
    assert directory.name.endswith(build_key(onnx_fields, BUILT_SHAPE)[:16])
    graph = directory / Task.TEXT_TO_VIDEO.value / ONNX_FILE
    written = graph.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cache hit loaded the pipeline or built again")

    # A hit hashes the weights only: no load, no export.
    monkeypatch.setattr("farm.engines.loading.load_pipelines", must_not_run)
    monkeypatch.setattr("farm.engines.build._build_one", must_not_run)
    again = build_engine(onnx_models["ltx-video-tiny"], "64x64x9", tasks=[Task.TEXT_TO_VIDEO])
    assert again == directory
    assert graph.stat().st_mtime_ns == written


def test_unbuilt_shape_falls_back_to_eager_with_a_note(eager_ltx, onnx_ltx):
    for overrides in (dict(width=96), dict(guidance_scale=1.0)):
        output = render(onnx_ltx, **overrides)
        assert output.backend == "eager-float32"
        assert len(output.notes) == 1
        assert "no onnx-cpu-float32 engine is built for text-to-video" in output.notes[0]
        assert "ran on eager-float32 instead" in output.notes[0]
        # The fallback is the eager path itself: identical frames.
        np.testing.assert_array_equal(output.frames, render(eager_ltx, **overrides).frames)


def test_unbuilt_shape_is_refused_when_configured(onnx_models, onnx_builds):
    model = onnx_models["ltx-video-tiny"]
    refusing = model.model_copy(update={"backend": model.backend.model_copy(update={"missing_build": "refuse"})})
    engine = load_engine(refusing)
    assert render(engine).backend == "onnx-cpu-float32"  # the built shape still renders
    events = []
    with pytest.raises(EngineBuildMissing) as refused:
        engine.render(request(width=96), events.append, lambda: False)
    message = str(refused.value)
    assert "96x64x9" in message
    assert "farm engines build --model ltx-video-tiny --backend onnx --shape 96x64x9" in message
    assert events == []  # refused before any work


def test_a_build_that_no_longer_matches_eager_is_not_used(onnx_models, onnx_builds, tmp_path):
    import shutil

    copied = tmp_path / "cache"
    shutil.copytree(onnx_builds["ltx-video-tiny"], copied / onnx_builds["ltx-video-tiny"].name)
    reference = copied / onnx_builds["ltx-video-tiny"].name / Task.TEXT_TO_VIDEO.value / REFERENCE_OUTPUT_FILE
    torch.save(torch.load(reference) + 1.0, reference)
    engine = load_engine(with_backend(onnx_models["ltx-video-tiny"], name="onnx", cache_dir=str(copied)))
    assert engine.built_shapes(Task.TEXT_TO_VIDEO) == []
    assert len(engine.rejected_builds) == 1 and "differs from eager" in engine.rejected_builds[0]
    assert render(engine).backend == "eager-float32"


def test_onnx_provider_for_a_gpu_is_refused_on_a_cpu_engine(tiny_models):
    model = with_backend(tiny_models["ltx-video-tiny"], name="onnx", onnx_provider="tensorrt")
    with pytest.raises(BackendUnavailable, match="runs on a GPU"):
        load_engine(model)


# First-Block Cache ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_ltx(models_dir, tmp_path_factory) -> ModelConfig:
    """The tiny LTX-Video with a 3-block transformer: First-Block Cache needs two or more blocks."""
    tiny = LTXPipeline.from_pretrained(models_dir / "ltx-video-tiny")
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel.from_config({**tiny.transformer.config, "num_layers": 3})
    pipe = LTXPipeline(scheduler=tiny.scheduler, vae=tiny.vae, text_encoder=tiny.text_encoder,
                       tokenizer=tiny.tokenizer, transformer=transformer)
    directory = tmp_path_factory.mktemp("deep") / "ltx-video-deep"
    pipe.save_pretrained(directory)
    return ModelConfig(name="ltx-video-deep", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: str(directory)})


def render_counting_blocks(engine: DiffusersEngine, steps: int) -> tuple[np.ndarray, int]:
    """Frames of a render, and how many times a block's self-attention actually ran."""
    calls = []
    transformer = engine.pipeline(Task.TEXT_TO_VIDEO).transformer
    handles = [block.attn1.register_forward_pre_hook(lambda *_: calls.append(1))
               for block in transformer.transformer_blocks]
    try:
        frames = render(engine, num_inference_steps=steps).frames
    finally:
        for handle in handles:
            handle.remove()
    return frames, len(calls)


def test_first_block_cache_at_threshold_zero_equals_eager_and_skips_blocks_when_large(deep_ltx):
    steps = 4
    eager_frames, eager_calls = render_counting_blocks(load_engine(deep_ltx), steps)
    assert eager_calls == 3 * steps

    never_skipping = load_engine(with_backend(deep_ltx, first_block_cache_threshold=0.0))
    assert never_skipping.backend == "eager-float32+fbc0"
    frames, calls = render_counting_blocks(never_skipping, steps)
    np.testing.assert_array_equal(frames, eager_frames)
    assert calls == eager_calls

    skipping = load_engine(with_backend(deep_ltx, first_block_cache_threshold=1e6))
    frames, calls = render_counting_blocks(skipping, steps)
    # Step 1 runs all three blocks; every later step only the first.
    assert calls == 3 + (steps - 1)
    assert frames.shape == eager_frames.shape
    output = render(skipping)
    assert output.backend == "eager-float32+fbc1e+06"
    # The state is reset per render: the same render twice gives the same frames.
    np.testing.assert_array_equal(render(skipping).frames, output.frames)


def test_first_block_cache_needs_two_blocks(tiny_models):
    with pytest.raises(ValueError, match="at least 2 transformer blocks"):
        load_engine(with_backend(tiny_models["ltx-video-tiny"], first_block_cache_threshold=0.1))


# FP8 --------------------------------------------------------------------------------------


def test_fp8_refuses_on_cpu_with_a_clear_message(tiny_models, cache_dir):
    model = with_backend(tiny_models["ltx-video-tiny"], name="fp8", cache_dir=str(cache_dir))
    with pytest.raises(BackendUnavailable, match="FP8 tensor cores.*runs on cpu"):
        load_engine(model)
    with pytest.raises(BackendUnavailable, match="FP8 tensor cores"):
        build_engine(model, "64x64x9")


def test_fp8_linear_layer_arithmetic_on_cpu(models_dir, eager_ltx):
    # torch._scaled_mm has a CPU kernel: the layer's arithmetic (not its speed) is checked here.
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 128)
    x = torch.randn(2, 10, 64)
    for granularity in ("row", "tensor"):
        fp8 = Float8Linear(linear, granularity)
        assert fp8.weight.dtype == torch.float8_e4m3fn
        assert relative_error(fp8(x), linear(x)) < 0.05

    transformer = LTXVideoTransformer3DModel.from_pretrained(models_dir / "ltx-video-tiny", subfolder="transformer")
    names = fp8_layer_names(transformer)
    assert names and all(name.startswith("transformer_blocks.") for name in names)
    assert "proj_in" not in names and "proj_out" not in names
    # The pipeline's own first call at 64x64x9 with guidance.
    arguments = capture_transformer_call(
        eager_ltx.pipeline(Task.TEXT_TO_VIDEO),
        dict(prompt="a fox", width=64, height=64, num_frames=9, num_inference_steps=2, output_type="latent"),
    )
    with torch.inference_mode():
        eager = first_output(transformer(**arguments, return_dict=False))
        assert quantize_linear_layers(transformer, "row", "scaled_mm") == len(names)
        quantized = first_output(transformer(**arguments, return_dict=False))
    error = relative_error(quantized, eager)
    assert 0 < error < FP8_TOLERANCE


# VAE tiling -------------------------------------------------------------------------------


def test_vae_tiling_decodes_in_temporal_tiles(tiny_models):
    engine = load_engine(with_backend(tiny_models["ltx-video-tiny"], vae_tiling=True))
    vae = engine.pipeline(Task.TEXT_TO_VIDEO).vae
    assert vae.use_tiling and vae.use_framewise_decoding
    decoder_calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda *_: decoder_calls.append(1))
    try:
        output = render(engine, num_frames=33, num_inference_steps=2)
    finally:
        handle.remove()
    assert output.frames.shape == (33, 64, 64, 3)
    assert len(decoder_calls) > 1  # 5 latent frames decode in overlapping temporal tiles


# torch.compile ----------------------------------------------------------------------------


def test_compile_build_matches_eager(tiny_models, eager_ltx, tmp_path):
    model = with_backend(tiny_models["ltx-video-tiny"], name="compile", cache_dir=str(tmp_path))
    directory = build_engine(model, BUILT_SHAPE, tasks=[Task.TEXT_TO_VIDEO])
    record = BuildRecord.read(directory / Task.TEXT_TO_VIDEO.value)
    assert record.backend == "compile-float32" and record.relative_error < ONNX_FLOAT32_TOLERANCE
    engine = load_engine(model)
    assert engine.built_shapes(Task.TEXT_TO_VIDEO) == [BUILT_SHAPE]
    built, eager = render(engine), render(eager_ltx)
    assert built.backend == "compile-float32"
    difference = np.abs(built.frames.astype(np.int16) - eager.frames.astype(np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01
    assert CallSignature.from_json(record.signature).output_dtype == "float32"
