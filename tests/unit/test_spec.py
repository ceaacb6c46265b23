"""Spec validation: every field has a limit, and the error names the field and the limit."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from farm.config import Task
from farm.domain.errors import InvalidArgument
from farm.domain.spec import MAX_SEED, RenderSpec, ResolvedSpec
from farm.jobs.validation import resolve_spec
from tests.conftest import sample_models

MODELS = sample_models()


def png(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def spec(**overrides) -> RenderSpec:
    values = dict(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a boat on a lake")
    values.update(overrides)
    return RenderSpec(**values)


def violations(**overrides) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec(**overrides), MODELS)
    return {v.field: v.description for v in caught.value.violations}


def test_defaults_fill_empty_fields():
    resolved = resolve_spec(spec(), MODELS)
    defaults = MODELS["ltx"].defaults
    assert (resolved.width, resolved.height, resolved.num_frames) == (defaults.width, defaults.height, defaults.num_frames)
    assert resolved.num_inference_steps == defaults.num_inference_steps
    assert resolved.guidance_scale == defaults.guidance_scale
    assert 0 <= resolved.seed <= MAX_SEED
    assert resolved.priority == 50


def test_given_values_are_kept_and_round_trip_through_json():
    resolved = resolve_spec(spec(width=512, height=320, num_frames=25, fps=12, num_inference_steps=7,
                                 guidance_scale=0.0, seed=7, priority=90, labels={"team": "ads"}), MODELS)
    again = ResolvedSpec.from_json(resolved.to_json())
    assert again == resolved
    assert (again.width, again.num_frames, again.guidance_scale, again.seed) == (512, 25, 0.0, 7)


def test_unknown_model_lists_served_models():
    problems = violations(model="sora")
    assert "cog" in problems["spec.model"] and "ltx" in problems["spec.model"]


def test_task_the_model_does_not_do():
    problems = violations(model="cog", task=Task.IMAGE_TO_VIDEO, image=png())
    assert "does not do image-to-video" in problems["spec.task"]


def test_missing_task():
    assert "must be set" in violations(task=None)["spec.task"]


@pytest.mark.parametrize("field,value,expected", [
    ("width", 500, "not a multiple of 32"),
    ("height", 4096, "outside 32..1280"),
    ("num_frames", 24, "8*k+1"),
    ("num_frames", 265, "8*k+1 frames from 9 to 257"),
    ("num_inference_steps", 10_000, "outside 2..200"),
    ("num_inference_steps", 0, "outside 2..200"),
    ("width", 0, "outside 32..1280"),
    ("num_frames", 0, "8*k+1"),
    ("fps", 500, "outside 1..60"),
    ("guidance_scale", -1.0, "outside 0..30"),
    ("guidance_scale", float("nan"), "outside 0..30"),
    ("seed", MAX_SEED + 1, f"0..{MAX_SEED}"),
    ("priority", 101, "outside 0..100"),
])
def test_out_of_range_fields_name_the_limit(field, value, expected):
    assert expected in violations(**{field: value})[f"spec.{field}"]


def test_too_few_denoising_steps_for_the_family_are_refused_with_the_reason():
    """One step used to pass for LTX-Video and fail in its scheduler on every attempt
    (IndexError); CogVideoX's schedulers take one step."""
    message = violations(num_inference_steps=1)["spec.num_inference_steps"]
    assert message == ("ltx needs at least 2 denoising steps: LTX-Video's scheduler stretches its timesteps "
                       "to a terminal value, which takes two; got 1")
    assert resolve_spec(spec(num_inference_steps=2), MODELS).num_inference_steps == 2
    assert resolve_spec(spec(model="cog", num_inference_steps=1), MODELS).num_inference_steps == 1
    assert "outside 1..200" in violations(model="cog", num_inference_steps=0)["spec.num_inference_steps"]


def test_a_models_own_step_limits_apply_without_the_familys_reason():
    from farm.config import ModelConfig
    from farm.domain.limits import ModelLimits

    models = {"cog4": ModelConfig(name="cog4", family="cogvideox", sources={Task.TEXT_TO_VIDEO: "d"},
                                  limits=ModelLimits(size_multiple=16, min_steps=4, max_steps=60))}
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec(model="cog4", width=64, height=64, num_frames=9, num_inference_steps=3), models)
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("spec.num_inference_steps", "cog4 needs at least 4 denoising steps; got 3")]
    with pytest.raises(ValueError, match="min_steps 4 > max_steps 3"):
        ModelLimits(min_steps=4, max_steps=3)


def test_frame_count_error_says_which_counts_work():
    message = violations(model="cog", num_frames=13)["spec.num_frames"]
    assert "8*k+1" in message and "9, 17, ..., 49" in message


def test_prompt_limits():
    assert "must not be empty" in violations(prompt="  ")["spec.prompt"]
    limit = MODELS["ltx"].limits.max_prompt_chars
    assert f"maximum is {limit}" in violations(prompt="x" * (limit + 1))["spec.prompt"]
    assert f"maximum is {limit}" in violations(negative_prompt="x" * (limit + 1))["spec.negative_prompt"]


def test_image_to_video_needs_a_decodable_image():
    assert "needs the first frame" in violations(task=Task.IMAGE_TO_VIDEO)["spec.image"]
    assert "cannot be decoded" in violations(task=Task.IMAGE_TO_VIDEO, image=b"not an image")["spec.image"]
    truncated = png(256, 256)[:200]
    assert "cannot be decoded" in violations(task=Task.IMAGE_TO_VIDEO, image=truncated)["spec.image"]
    resolved = resolve_spec(spec(task=Task.IMAGE_TO_VIDEO, image=png()), MODELS)
    assert resolved.image == png()


def test_image_size_limits():
    limits = MODELS["ltx"].limits
    huge = b"\x89PNG" + b"0" * limits.max_image_bytes
    assert f"maximum is {limits.max_image_bytes}" in violations(task=Task.IMAGE_TO_VIDEO, image=huge)["spec.image"]


def test_text_to_video_refuses_an_image():
    assert "only for image-to-video" in violations(image=png())["spec.image"]


def test_labels_and_idempotency_key_limits():
    assert "keys are" in violations(labels={"Bad Key": "x"})["spec.labels['Bad Key']"]
    assert "maximum is 32" in violations(labels={f"k{i}": "v" for i in range(33)})["spec.labels"]
    assert "maximum is 128" in violations(idempotency_key="k" * 129)["spec.idempotency_key"]


def test_every_bad_field_is_reported_at_once():
    problems = violations(width=33, num_frames=10, num_inference_steps=999)
    assert {"spec.width", "spec.num_frames", "spec.num_inference_steps"} <= set(problems)


def test_fingerprint_is_of_the_request_as_sent():
    first = spec(prompt="a")
    assert first.fingerprint() == spec(prompt="a").fingerprint()
    assert first.fingerprint() != spec(prompt="b").fingerprint()
    assert first.fingerprint() != spec(prompt="a", seed=1).fingerprint()


# --------------------------------------------------------------------------- post-processing

from farm.domain.spec import (  # noqa: E402
    ColorReference,
    EncoderSettings,
    PostprocessSpec,
    ResolvedPostprocess,
)


def post_violations(**fields) -> dict[str, str]:
    return violations(postprocess=PostprocessSpec(**fields))


def test_postprocess_defaults_and_round_trip():
    resolved = resolve_spec(spec(fps=24, postprocess=PostprocessSpec(
        target_fps=48, upscale_factor=2, candidates=3,
        color_reference=ColorReference(mean=(55.0, 2.0, -3.0), std=(20.0, 5.0, 6.0)),
        encoder=EncoderSettings(bitrate_kbps=4000, preset="slow"))), MODELS)
    post = resolved.postprocess
    assert (post.interpolation_factor, post.upscale_factor, post.candidates) == (2, 2, 3)
    assert (post.codec, post.crf, post.bitrate_kbps, post.preset) == ("h264", None, 4000, "slow")
    assert post.color_reference.strength == 1.0 and post.color_reference.mean == (55.0, 2.0, -3.0)
    assert post.output_fps(24) == 48 and post.output_frames(121) == 241
    again = ResolvedSpec.from_json(resolved.to_json())
    assert again == resolved and isinstance(again.postprocess, ResolvedPostprocess)
    assert isinstance(again.postprocess.color_reference, ColorReference)


def test_postprocess_empty_gets_encoder_defaults_and_none_stays_none():
    assert resolve_spec(spec(), MODELS).postprocess is None
    post = resolve_spec(spec(postprocess=PostprocessSpec()), MODELS).postprocess
    assert post == ResolvedPostprocess(crf=18, preset="veryfast")


@pytest.mark.parametrize("fields,field,expected", [
    (dict(interpolation_factor=1), "interpolation_factor", "outside 2..8"),
    (dict(interpolation_factor=9), "interpolation_factor", "outside 2..8"),
    (dict(interpolation_factor=2, target_fps=48), "target_fps", "not both"),
    (dict(target_fps=24), "target_fps", "above the spec's fps (24)"),
    (dict(target_fps=60), "target_fps", "whole multiple of the spec's fps (24)"),
    (dict(target_fps=24 * 9), "target_fps", "the most is 8x"),
    (dict(interpolation_factor=8), "interpolation_factor", "maximum output is 120 fps"),
    (dict(upscale_factor=5), "upscale_factor", "outside 2..4"),
    (dict(candidates=0), "candidates", "outside 1..8"),
    (dict(candidates=9), "candidates", "outside 1..8"),
    (dict(encoder=EncoderSettings(codec="vp9")), "encoder.codec", "codecs: h264"),
    (dict(encoder=EncoderSettings(crf=52)), "encoder.crf", "outside 0..51"),
    (dict(encoder=EncoderSettings(bitrate_kbps=50)), "encoder.bitrate_kbps", "outside 100..100000"),
    (dict(encoder=EncoderSettings(crf=20, bitrate_kbps=5000)), "encoder.bitrate_kbps", "not both"),
    (dict(encoder=EncoderSettings(preset="ludicrous")), "encoder.preset", "ultrafast, superfast"),
    (dict(color_reference=ColorReference()), "color_reference", "render_id or statistics"),
    (dict(color_reference=ColorReference(render_id="abc")), "color_reference.render_id", "not resolved"),
    (dict(color_reference=ColorReference(mean=(50.0, 0.0), std=(1.0, 1.0, 1.0))), "color_reference.statistics",
     "3 means and 3 stds"),
    (dict(color_reference=ColorReference(mean=(150.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
     "color_reference.statistics.mean", "L mean 150.0 is outside 0..100"),
    (dict(color_reference=ColorReference(mean=(50.0, 0.0, 0.0), std=(1.0, -1.0, 1.0))),
     "color_reference.statistics.std", "a std -1.0 is outside 0..128"),
    (dict(color_reference=ColorReference(mean=(50.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), strength=1.5)),
     "color_reference.strength", "outside 0..1"),
])
def test_bad_postprocess_fields_name_the_field_and_limit(fields, field, expected):
    problems = violations(fps=24, postprocess=PostprocessSpec(**fields))
    assert expected in problems[f"spec.postprocess.{field}"], problems


def test_upscaled_frame_size_has_a_limit():
    problems = violations(width=1280, height=768, postprocess=PostprocessSpec(upscale_factor=4))
    assert "gives 5120x3072" in problems["spec.postprocess.upscale_factor"]
    assert "maximum output is 8294400 pixels" in problems["spec.postprocess.upscale_factor"]


def test_interpolated_frame_count_has_a_limit():
    models = sample_models()
    models["ltx"].limits.postprocess.max_output_frames = 400
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec(num_frames=257, fps=8, postprocess=PostprocessSpec(interpolation_factor=2)), models)
    message = {v.field: v.description for v in caught.value.violations}["spec.postprocess.interpolation_factor"]
    assert "gives 513 frames" in message and "maximum output is 400 frames" in message


def test_postprocess_is_part_of_the_fingerprint():
    plain = spec(prompt="a")
    asked = spec(prompt="a", postprocess=PostprocessSpec(interpolation_factor=2))
    assert plain.fingerprint() != asked.fingerprint()
    assert asked.fingerprint() == spec(prompt="a", postprocess=PostprocessSpec(interpolation_factor=2)).fingerprint()
