"""What a spec may ask of the newer families and of LoRA adapters: adapters the config
names for a model's family, motion conditioning only where the family takes it, no
prompt for image-only families; each refusal names the field and the limit."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from farm.config import AdapterConfig, FarmConfig, ModelConfig, PriceConfig, Task
from farm.domain.errors import InvalidArgument
from farm.domain.spec import MAX_ADAPTER_WEIGHT, AdapterRequest, RenderSpec, ResolvedSpec
from farm.families import Family
from farm.jobs.validation import resolve_spec
from farm.metering.charging import AttemptMeter
from farm.planning.estimate import estimate_cost

ADAPTERS = [
    AdapterConfig(name="watercolor", source="/adapters/watercolor", families=[Family.LTX_VIDEO], surcharge=0.25),
    AdapterConfig(name="film-grain", source="org/film-grain-lora", families=[Family.LTX_VIDEO, Family.WAN],
                  surcharge=0.5),
    AdapterConfig(name="cog-only", source="/adapters/cog", families=[Family.COGVIDEOX]),
]


def farm_config(tmp_path) -> FarmConfig:
    return FarmConfig(home=tmp_path, adapters=ADAPTERS, models=[
        ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "ltx-dir"},
                    adapters=[AdapterConfig(name="house-style", source="/adapters/house", families=[Family.LTX_VIDEO])]),
        ModelConfig(name="svd", family=Family.STABLE_VIDEO_DIFFUSION, sources={Task.IMAGE_TO_VIDEO: "svd-dir"}),
    ])


@pytest.fixture
def models(tmp_path) -> dict[str, ModelConfig]:
    return {m.name: m for m in farm_config(tmp_path).served_models()}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def ltx(**overrides) -> RenderSpec:
    return RenderSpec(**{"model": "ltx", "task": Task.TEXT_TO_VIDEO, "prompt": "a boat", **overrides})


def svd(**overrides) -> RenderSpec:
    return RenderSpec(**{"model": "svd", "task": Task.IMAGE_TO_VIDEO, "image": png(), **overrides})


def violations(spec: RenderSpec, models) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec, models)
    return {v.field: v.description for v in caught.value.violations}


def test_a_model_offers_its_own_adapters_and_the_farms_of_its_family(models):
    assert [a.name for a in models["ltx"].adapters] == ["house-style", "watercolor", "film-grain"]
    assert models["svd"].adapters == []


def test_adapters_resolve_with_weights_and_their_surcharge(models):
    resolved = resolve_spec(ltx(adapters=(AdapterRequest("watercolor", 0.7), AdapterRequest("film-grain"))), models)
    assert resolved.adapters == (("watercolor", 0.7), ("film-grain", 1.0))
    assert resolved.surcharge == pytest.approx(0.75)
    again = ResolvedSpec.from_json(resolved.to_json())
    assert again.adapters == resolved.adapters and again.surcharge == resolved.surcharge
    assert resolve_spec(ltx(), models).surcharge == 0.0


def test_bad_adapter_requests_name_the_field_and_the_limit(models):
    problems = violations(ltx(adapters=(AdapterRequest("cog-only"), AdapterRequest("watercolor"),
                                        AdapterRequest("watercolor"),
                                        AdapterRequest("film-grain", MAX_ADAPTER_WEIGHT + 1))), models)
    assert "not an adapter of ltx" in problems["spec.adapters[0].name"]
    assert "house-style" in problems["spec.adapters[0].name"]  # the ones it offers
    assert "named twice" in problems["spec.adapters[2].name"]
    assert "-4..4" in problems["spec.adapters[3].weight"]
    too_many = tuple(AdapterRequest(f"a{i}") for i in range(models["ltx"].limits.max_adapters + 1))
    assert "at most 4" in violations(ltx(adapters=too_many), models)["spec.adapters"]


def test_adapter_names_are_unique_in_the_config(tmp_path):
    with pytest.raises(ValueError, match="names must be unique"):
        FarmConfig(home=tmp_path, adapters=ADAPTERS + ADAPTERS[:1])


def test_an_adapters_surcharge_is_on_the_estimate_and_the_meter(models):
    prices = PriceConfig()
    plain = resolve_spec(ltx(seed=1), models)
    styled = resolve_spec(ltx(seed=1, adapters=(AdapterRequest("film-grain"),)), models)
    base = estimate_cost(plain, models["ltx"], None, "CPU", prices).nanodollars
    assert estimate_cost(styled, models["ltx"], None, "CPU", prices).nanodollars == pytest.approx(base * 1.5, abs=10)  # each phase rounds to nanodollars
    timings = [("denoising", "CPU", 100.0)]
    plain_meter, styled_meter = AttemptMeter("CPU"), AttemptMeter("CPU", styled.surcharge)
    plain_cost = sum(c.nanodollars for c in plain_meter.charge(prices, timings).charges)
    styled_cost = sum(c.nanodollars for c in styled_meter.charge(prices, timings).charges)
    assert styled_cost == pytest.approx(plain_cost * 1.5, rel=1e-6)


def test_an_image_only_family_needs_no_prompt_and_refuses_one(models):
    resolved = resolve_spec(svd(), models)
    assert resolved.prompt == ""
    assert "takes no text" in violations(svd(prompt="a boat"), models)["spec.prompt"]
    assert "must not be empty" in violations(ltx(prompt=""), models)["spec.prompt"]


def test_motion_conditioning_is_checked_by_its_family_and_refused_elsewhere(models):
    resolved = resolve_spec(svd(motion_bucket_id=200, noise_aug_strength=0.1, decode_chunk_size=4), models)
    assert (resolved.motion_bucket_id, resolved.noise_aug_strength, resolved.decode_chunk_size) == (200, 0.1, 4)
    problems = violations(svd(motion_bucket_id=256, noise_aug_strength=1.5, decode_chunk_size=0), models)
    assert set(problems) == {"spec.motion.motion_bucket_id", "spec.motion.noise_aug_strength",
                             "spec.motion.decode_chunk_size"}
    assert "takes no motion conditioning" in violations(ltx(motion_bucket_id=100), models)["spec.motion"]


def test_an_adapter_for_a_family_without_a_lora_loader_is_refused_in_the_config():
    with pytest.raises(ValueError, match="cannot load LoRA adapters"):
        AdapterConfig(name="style", source="/adapters/style", families=[Family.STABLE_VIDEO_DIFFUSION])


def test_adapters_on_a_backend_that_cannot_apply_them_are_refused_in_the_config(tmp_path):
    with pytest.raises(ValueError, match="onnx backend cannot apply"):
        FarmConfig(home=tmp_path, adapters=ADAPTERS, models=[
            ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "ltx-dir"},
                        backend={"name": "onnx"})])
