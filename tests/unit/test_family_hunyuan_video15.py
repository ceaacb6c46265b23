"""HunyuanVideo 1.5 (`farm.families.hunyuan_video15`): its tiny model (real compression, real
text lengths, offline encoders, the saved format), the call its pipeline classes add to
diffusers' (step callback, guidance scale, image-to-video size), a guider with a guided
window resumed bitwise, and its memory constants against the published model. The shared
engine, preemption and families tests cover its render, decode and resume like any family's."""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from farm.config import Task
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderPreempted
from farm.engines import load_engine
from farm.engines.tiny import build_tiny_text_encoder, tiny_model_configs
from farm.families import hunyuan_video15 as hy

T2V, I2V = Task.TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO
TINY = hy.FACTS.tiny


@pytest.fixture(scope="module")
def pipes(models_dir) -> dict:
    """The tiny pipelines loaded as the engine loads them (farm's classes)."""
    classes = hy.pipeline_classes()
    loaded = {task: classes[task].from_pretrained(models_dir / directory) for task, directory in
              TINY.directories.items()}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def picture(height: int = 150, width: int = 200) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def small_call(**overrides) -> dict:
    kwargs = dict(prompt="a red fox running through a snowy forest", negative_prompt="blurry", height=48, width=64,
                  num_frames=5, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                  output_type="latent")
    kwargs.update(overrides)
    return kwargs


# The tiny model ----------------------------------------------------------------------------


def test_the_tiny_pipelines_load_as_diffusers_own_and_keep_the_real_model_s_shape(models_dir, pipes):
    from diffusers import (
        DiffusionPipeline,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
    )

    # The saved format is diffusers' own: its generic loader picks its classes.
    plain = {task: DiffusionPipeline.from_pretrained(models_dir / directory)
             for task, directory in TINY.directories.items()}
    assert type(plain[T2V]) is HunyuanVideo15Pipeline and type(plain[I2V]) is HunyuanVideo15ImageToVideoPipeline
    assert json.loads((models_dir / TINY.directories[T2V] / "model_index.json").read_text())["_class_name"] == \
        "HunyuanVideo15Pipeline"
    # farm's classes are those, with the call the engine needs.
    assert isinstance(pipes[T2V], HunyuanVideo15Pipeline) and type(pipes[T2V]) is not HunyuanVideo15Pipeline
    assert isinstance(pipes[I2V], HunyuanVideo15ImageToVideoPipeline)

    for pipe in pipes.values():
        compression = hy.FACTS.compression
        assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (compression.spatial,
                                                                                   compression.temporal)
        config = pipe.transformer.config
        assert (config.patch_size, config.patch_size_t) == (compression.patch, 1)
        # The noisy latents, the condition latents and the mask.
        assert config.in_channels == 2 * pipe.vae.config.latent_channels + 1
        assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer" and type(pipe.tokenizer_2).__name__ == "ByT5Tokenizer"
    assert pipes[T2V].transformer is not pipes[I2V].transformer
    assert not torch.equal(pipes[T2V].transformer.proj_out.weight, pipes[I2V].transformer.proj_out.weight)


def test_the_tiny_tokenizer_keeps_the_prompt_after_the_template_crop(pipes):
    pipe = pipes[T2V]
    tokenizer = pipe.tokenizer
    # Known words are one token each, after a space as BPE learns them; others fall back to bytes.
    assert tokenizer.tokenize(" red fox forest") == ["Ġred", "Ġfox", "Ġforest"]
    assert tokenizer.tokenize(" qxjv") == ["Ġq", "x", "j", "v"]

    def template_tokens(prompt: str) -> list[int]:
        conversation = [[{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]]
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]

    # The pipeline drops the template's first 108 tokens (the real tokenizer's system part):
    # the tiny one's system part is at least as long, so the user's prompt is never cropped.
    prefix = template_tokens("")
    assert len(prefix) >= pipe.prompt_template_encode_start_idx
    embeds, mask = pipe._get_mllm_prompt_embeds(pipe.text_encoder, tokenizer, "a red fox", torch.device("cpu"),
                                                crop_start=pipe.prompt_template_encode_start_idx)
    assert embeds.shape[:2] == mask.shape == (1, pipe.tokenizer_max_length)
    other, _ = pipe._get_mllm_prompt_embeds(pipe.text_encoder, tokenizer, "a blue cat", torch.device("cpu"),
                                            crop_start=pipe.prompt_template_encode_start_idx)
    assert not torch.equal(embeds, other)


def test_the_transformer_attends_to_the_published_text_lengths(pipes):
    """1000 Qwen tokens, 256 ByT5 bytes and 729 SigLIP tokens, whatever the prompt: what
    `joint_text_tokens` tells the memory estimate."""
    seen = []
    for task, extra in ((T2V, {}), (I2V, {"image": picture()})):
        pipe = pipes[task]
        handle = pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
        try:
            with torch.inference_mode():
                pipe(**small_call(num_inference_steps=1, guidance_scale=1.0), **extra)
        finally:
            handle.remove()
    assert seen == [hy.joint_text_tokens({})] * 2 == [1985] * 2
    assert hy.FACTS.memory.published.joint_text_tokens == 1985


def test_the_tiny_model_is_built_the_same_every_time(tmp_path):
    text_encoder, tokenizer = build_tiny_text_encoder()
    digests = []
    for attempt in ("first", "second"):
        pipe = hy.build_tiny_pipelines(text_encoder, tokenizer)[I2V]
        pipe.save_pretrained(tmp_path / attempt)
        files = sorted(p for p in (tmp_path / attempt).rglob("*") if p.is_file())
        digests.append({p.relative_to(tmp_path / attempt).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in files})
    assert digests[0] == digests[1]
    assert {"image_encoder/model.safetensors", "feature_extractor/preprocessor_config.json", "tokenizer/tokenizer.json",
            "tokenizer_2/tokenizer_config.json", "guider/guider_config.json"} <= set(digests[0])


def test_the_pipeline_classes_are_module_attributes_made_once():
    classes = hy.pipeline_classes()
    assert hy.HunyuanVideo15Pipeline is classes[T2V] and hy.HunyuanVideo15ImageToVideoPipeline is classes[I2V]
    assert pickle.loads(pickle.dumps(classes[I2V])) is classes[I2V]
    assert set(hy.resumable_pipelines()) == set(classes.values())
    with pytest.raises(AttributeError):
        hy.NoSuchPipeline  # noqa: B018


# The call farm's classes add -----------------------------------------------------------------


def test_the_call_runs_the_diffusers_loop_unchanged(pipes):
    """farm's class with a guidance scale equals diffusers' own class with that scale in its
    guider, bitwise; the guider and scheduler are left as they were."""
    pipe = pipes[T2V]
    diffusers_class = next(c for c in type(pipe).__mro__ if c.__module__.startswith("diffusers.pipelines."))
    assert diffusers_class.__name__ == type(pipe).__name__
    plain = diffusers_class(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    published_scale = pipe.guider.guidance_scale
    with torch.inference_mode():
        ours = pipe(**small_call(), guidance_scale=3.5).frames
        plain.guider.guidance_scale = 3.5
        try:
            theirs = plain(**small_call()).frames
        finally:
            plain.guider.guidance_scale = published_scale
        at_published = pipe(**small_call()).frames
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, at_published)
    assert pipe.guider.guidance_scale == published_scale == 6.0 and "set_state" not in vars(pipe.guider)
    assert "step" not in vars(pipe.scheduler)


def test_the_step_callback_sees_every_step_and_can_replace_the_latents(pipes):
    pipe = pipes[T2V]
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append((index, float(timestep), tensors["latents"].clone()))
        return {"latents": torch.zeros_like(tensors["latents"])} if index == 2 else {}

    with torch.inference_mode():
        uncalled = pipe(**small_call()).frames
        replaced = pipe(**small_call(), callback_on_step_end=callback,
                        callback_on_step_end_tensor_inputs=["latents"]).frames
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == [float(t) for t in pipe.scheduler.timesteps]
    assert torch.equal(seen[2][2], uncalled)  # the last step's output, before the callback replaced it
    assert torch.equal(replaced, torch.zeros_like(uncalled))
    assert "step" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(**small_call(), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_the_callback_can_stop_the_loop(pipes):
    pipe = pipes[T2V]
    steps = []

    def stop_after_one(pipeline, index, timestep, tensors):
        steps.append(index)
        pipeline._interrupt = True
        return {}

    with torch.inference_mode():
        pipe(**small_call(), callback_on_step_end=stop_after_one)
    assert steps == [0]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_guidance_scale_of_one_or_less_runs_one_pass_a_step(pipes, scale):
    pipe = pipes[T2V]
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.inference_mode():
            pipe(**small_call(negative_prompt=None), guidance_scale=scale)
            unguided = len(calls)
            pipe(**small_call(negative_prompt=None), guidance_scale=2.0)
    finally:
        handle.remove()
    assert (unguided, len(calls) - unguided) == (3, 6)
    assert pipe.guider._enabled is True


def test_image_to_video_renders_the_requested_size(pipes):
    pipe = pipes[I2V]
    with torch.inference_mode():
        frames = pipe(image=picture(150, 200), **small_call(height=32, width=80, output_type="np")).frames
        assert frames.shape == (1, 5, 32, 80, 3)
        # Without a size the pipeline picks its bucket for the image's aspect ratio at the
        # training resolution (target_size 640: 480p).
        latents = pipe(image=picture(150, 200), **small_call(height=None, width=None, num_inference_steps=1,
                                                             guidance_scale=1.0)).frames
    assert "calculate_default_height_width" not in vars(pipe.video_processor)
    bucket = pipe.video_processor.calculate_default_height_width(height=150, width=200, target_size=pipe.target_size)
    assert bucket == (544, 720) and latents.shape[-2:] == (544 // 16, 720 // 16)
    with pytest.raises(ValueError, match="both"):
        pipe(image=picture(), **small_call(width=None))
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(image=picture(), **small_call(height=40))


# The engine's side ---------------------------------------------------------------------------


def request(task: Task = T2V, **overrides) -> EngineRequest:
    image = None
    if task == I2V:
        buffer = io.BytesIO()
        picture().save(buffer, format="PNG")
        image = buffer.getvalue()
    fields = dict(render_id="r-1", attempt=1, task=task, prompt='a sign that reads "Open late", neon',
                  negative_prompt="", image=image, width=64, height=48, num_frames=9, fps=24,
                  num_inference_steps=4, guidance_scale=4.0, seed=11)
    fields.update(overrides)
    return EngineRequest(**fields)


def test_encode_prompt_gives_what_the_call_would_encode(pipes):
    pipe = pipes[T2V]
    with torch.inference_mode():
        guided = hy.encode_prompt(pipe, request(), torch.device("cpu"))
        own = pipe.encode_prompt(prompt='a sign that reads "Open late", neon', device=torch.device("cpu"),
                                 dtype=pipe.transformer.dtype)
        empty = pipe.encode_prompt(prompt="", device=torch.device("cpu"), dtype=pipe.transformer.dtype)
        unguided = hy.encode_prompt(pipe, request(guidance_scale=1.0), torch.device("cpu"))
    names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    for name, tensor, empty_tensor in zip(names, own, empty):
        assert torch.equal(guided[name], tensor) and torch.equal(guided[f"negative_{name}"], empty_tensor)
    # Quoted text reaches the ByT5 glyph encoder; a prompt without quotes gives zeros there.
    assert guided["prompt_embeds_mask_2"].sum() == len('Text "Open late". ') + 1  # and ByT5's </s>
    assert guided["prompt_embeds_2"].abs().sum() > 0 and guided["negative_prompt_embeds_2"].abs().sum() == 0
    assert set(unguided) == set(names)
    assert hy.call_kwargs(request(), None) == dict(height=48, width=64, num_frames=9, num_inference_steps=4,
                                                   guidance_scale=4.0)
    assert hy.call_kwargs(request(I2V), picture())["image"].size == (200, 150)


def test_a_guider_with_a_guided_window_resumes_bitwise(models_dir, tmp_path):
    """A guider that guides only the last half of the steps (``start`` 0.5): the resumed
    call's loop counts its steps from 0, and farm's call adds the steps before the resume
    (the scheduler's begin index), so the resume guides the same steps."""
    source = tmp_path / "windowed"
    shutil.copytree(models_dir / TINY.directories[T2V], source)
    guider_config = source / "guider" / "guider_config.json"
    guider_config.write_text(json.dumps({**json.loads(guider_config.read_text()), "start": 0.5}))
    model = next(m for m in tiny_model_configs(models_dir) if m.family == hy.FAMILY)
    engine = load_engine(model.model_copy(update={"sources": {T2V: str(source)}}))
    assert engine.supports_checkpoint and engine.pipeline(T2V).guider._start == 0.5

    passes = []
    handle = engine.pipeline(T2V).transformer.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        uninterrupted = engine.render(request(), lambda p: None, lambda: False)
        assert len(passes) == 2 + 2 * 2  # steps 1-2 unguided, 3-4 guided
        steps = [0]

        def on_progress(progress) -> None:
            steps.append(progress.step)

        with pytest.raises(RenderPreempted) as preempted:
            engine.render(request(), on_progress, lambda: False, should_preempt=lambda: steps[-1] >= 2)
        assert preempted.value.step == 2
        passes.clear()
        resumed = engine.render(request(), lambda p: None, lambda: False,
                                resume=DenoiseCheckpoint.from_bytes(preempted.value.checkpoint.to_bytes()))
        # Steps 3-4 guided, as uninterrupted: counted from the resumed call's first step,
        # the guider would see 2 steps of which the first is outside its window.
        assert len(passes) == 2 * 2
    finally:
        handle.remove()
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)


# Memory ------------------------------------------------------------------------------------


def test_published_parameters_are_the_published_configs_counted_on_the_meta_device():
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    with torch.device("meta"):
        components = {
            # The diffusers conversion script's 480p transformer and its default VAE.
            "transformer": HunyuanVideo15Transformer3DModel(
                in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=3584, text_embed_2_dim=1472,
                image_embed_dim=1152, rope_axes_dim=(16, 56, 56), target_size=640),
            "vae": AutoencoderKLHunyuanVideo15(),
            # Qwen2.5-VL-7B-Instruct's language model.
            "text_encoder": Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
                vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
            # ByT5-small's encoder.
            "text_encoder_2": T5EncoderModel(T5Config(
                vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)),
            # SigLIP so400m-patch14-384's vision model.
            "image_encoder": SiglipVisionModel(SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14)),
        }
    counted = {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}
    published = hy.FACTS.memory.published
    assert published.parameters == counted
    assert round(counted["transformer"] / 1e9, 1) == 8.3  # the model card's 8.3B
    assert published.hidden_size == components["transformer"].config.num_attention_heads * 128
    assert published.vae_channels == components["vae"].config.block_out_channels[0]


@pytest.mark.parametrize("height, width, frames, tiled", [(256, 256, 17, False), (480, 848, 9, False),
                                                          (480, 848, 17, True)])
def test_the_vae_decode_keeps_about_seven_copies_of_its_last_stage(height, width, frames, tiled):
    """The published VAE's decode in bfloat16 on the meta device: what it keeps alive, over
    the decoded video's copies, in copies of its last stage (128 channels) over a tile."""
    from diffusers import AutoencoderKLHunyuanVideo15

    from tests.unit.test_memory import LiveBytes, efficient_attention

    meta, dtype = torch.device("meta"), torch.bfloat16
    with meta:
        vae = AutoencoderKLHunyuanVideo15().to(dtype)
    if tiled:
        vae.enable_tiling()
    latents = (1, 32, (frames - 1) // 4 + 1, height // 16, width // 16)

    def call():
        video = vae.decode(torch.empty(latents, dtype=dtype, device=meta), return_dict=False)[0]
        assert video.shape[2:] == (frames, height, width)

    with pytest.MonkeyPatch.context() as patch:
        # As PyTorch's memory-efficient kernel allocates (the causal mask is counted: the VAE makes it).
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)
        counted = LiveBytes(*vae.parameters(), *vae.buffers()).run(call)
    tile = hy.vae_decode_tile(dict(vae.config)) if tiled else (height, width)
    tile = (min(height, tile[0]), min(width, tile[1]))
    video = 3 * 3 * frames * height * width * 2
    widths = (counted - video) / (hy.FACTS.memory.published.vae_channels * frames * math.prod(tile) * 2)
    assert 6.0 < widths <= hy.FACTS.memory.vae_widths


def test_a_transformer_block_keeps_what_the_estimate_allows_a_pass_of_one(tmp_path):
    """The published transformer's width and text encoders' widths with one block, in
    bfloat16 on the CPU (its reordering of the text tokens indexes by mask, which the meta
    device cannot), at a small size: bytes alive per token (video and joint text) and hidden
    unit, against the estimate's 13 widths in bfloat16 and 2 in float32."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from farm.planning.memory import ACTIVATION_WIDTHS, FLOAT32_WIDTHS
    from tests.unit.test_memory import LiveBytes, efficient_attention

    dtype = torch.bfloat16
    with torch.device("meta"):
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=1,
            num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
            rope_axes_dim=(16, 56, 56), target_size=640)
    transformer = transformer.to_empty(device="cpu").to(dtype)
    for parameter in transformer.parameters():
        parameter.data.normal_(0, 0.02)
    latent = (2, 480 // 16, 848 // 16)  # 5 frames at 480p
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    inputs = dict(hidden_states=tensor(1, 65, *latent), timestep=torch.full((1,), 500.0, dtype=dtype),
                  encoder_hidden_states=tensor(1, 1000, 3584),
                  encoder_attention_mask=(torch.arange(1000) < 100).to(dtype)[None],
                  encoder_hidden_states_2=tensor(1, 256, 1472),
                  encoder_attention_mask_2=(torch.arange(256) < 12).to(dtype)[None],
                  image_embeds=tensor(1, 729, 1152), return_dict=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)
        existing = [value for value in inputs.values() if isinstance(value, torch.Tensor)]
        counted = LiveBytes(*transformer.parameters(), *transformer.buffers(), *existing).run(
            lambda: transformer(**inputs))
    tokens = math.prod(latent) + hy.joint_text_tokens(dict(transformer.config))
    per_unit = counted / (tokens * hy.FACTS.memory.published.hidden_size)
    assert 20 < per_unit <= ACTIVATION_WIDTHS * 2 + FLOAT32_WIDTHS * 4
