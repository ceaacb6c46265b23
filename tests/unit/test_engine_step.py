"""benchmarks/engine_step.py on the CPU: its smoke run for every model family (the tiny models
standing in, one layer, each family's smallest shape), the published configs of every family
built at full size on the meta device (as the GPU run builds them), and a one-layer run at the
published widths of the two cheapest families. No number here describes a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import engine_step
from farm.families import FAMILY_MODULES, Family, family_facts

FAMILIES = list(FAMILY_MODULES)


def run(tmp_path_factory, *options: str) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("engine-step") / "results.json"
    code = engine_step.main(["--allow-cpu", "--steps", "2", "--backends", "eager", "--repeats", "1",
                             "--json", str(out), *options])
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run of every family: one layer, the smallest shape, the tiny models' widths."""
    return run(tmp_path_factory, "--tiny", "--layers", "1", "--shape", "min")


def by_family(results: dict) -> dict[str, dict]:
    return {row["family"]: row for row in results["runs"]}


def test_the_smoke_run_covers_every_family_and_succeeds(smoke):
    code, results = smoke
    assert code == 0, [row.get("error") for row in results["runs"]]
    assert results["smoke_test"] is True and results["tiny"] is True and results["matmul"]["tflops"] > 0
    assert sorted(by_family(results)) == sorted(family.value for family in FAMILIES)
    assert sorted(row["model"] for row in results["runs"]) == sorted(engine_step.MODELS)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_each_family_measured_a_step_a_decode_and_a_render(smoke, family):
    _, results = smoke
    row = by_family(results)[family.value]
    facts = family_facts(family)
    assert "error" not in row and "not_run" not in row, row
    assert row["shape"] == engine_step.smallest_shape(family).spec
    assert row["denoiser"] == facts.denoiser and "stand_in" in row
    # A guided step: one call of batch 2, or two of batch 1.
    assert (row["batch"], row["calls_per_step"]) == ((2, 1) if facts.guidance_batch == 2 else (1, 2))
    assert row["tflop_per_step"] > 0 and row["tflop_counted"] > 0 and row["latent_tokens"] > 0
    assert row["flops_from"] == ("analytic" if family in engine_step.FLOP_FORMULAS else "FlopCounterMode")
    eager = row["backends"]["eager"]
    assert eager["ms_per_step"] > 0 and eager["tflops"] > 0 and eager["fraction_of_matmul"] > 0
    assert eager["relative_error"] < 1e-4  # eager against its own first call
    assert row["vae_decode_s"] > 0 and row["vae_decode_tflop"] > 0
    assert row["vae_tiling"] == engine_step.BENCHES[family].vae_tiling
    assert eager["pipeline_steps"] == 2 and eager["pipeline_s"] > 0
    assert set(eager["pipeline_phases_s"]) == {"prompt_s", "denoise_s", "decode_s", "mp4_s", "whole_s"}
    # What encodes the prompt is said: random embeddings where the published encoder is not built.
    random_embeddings = engine_step.BENCHES[family].embedding_widths is not None
    assert ("random prompt embeddings" in row["prompt"]) == random_embeddings
    assert facts.uses_prompt or row["prompt"].startswith("no text")


# The published models --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_the_published_pipeline_builds_at_full_size(family):
    """What the GPU run builds, on the meta device in bfloat16: the components built from the
    family's PUBLISHED_CONFIGS have the published parameter counts the memory estimate assumes,
    and the pipeline is the class the engine runs."""
    spec = engine_step.MODELS[engine_step.BENCHES[family].name]
    assert spec.family == family.value
    defaults = family_facts(family).defaults
    assert spec.shape == f"{defaults.width}x{defaults.height}x{defaults.num_frames}"
    pipe, config = engine_step.build_pipeline(spec, None, torch.device("meta"), torch.bfloat16)
    assert isinstance(pipe, tuple(engine_step.family_module(family).pipeline_classes().values()))
    published = family_facts(family).memory.published.parameters
    built = engine_step.BENCHES[family].classes
    counted = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in built
               if isinstance(getattr(pipe, name), torch.nn.Module)}
    assert family_facts(family).denoiser in counted
    assert counted == {name: published[name] for name in counted}
    assert config == dict(engine_step.denoiser_of(pipe, spec).config)
    # The prompt embeddings the run makes in place of an encoder not built are as wide as the
    # published encoder's hidden states the denoiser takes.
    widths = engine_step.BENCHES[family].embedding_widths
    if widths is not None:
        assert all(width >= 1024 for width in widths(engine_step.built_configs(pipe, spec)).values())


def test_layers_cap_every_depth_and_keep_the_widths():
    configs = engine_step.published_configs(Family.LTX_2, 1)
    assert configs["transformer"]["num_layers"] == 1
    assert configs["transformer"]["num_attention_heads"] == 32  # the published width
    assert configs["vae"]["layers_per_block"] == (1, 1, 1, 1, 1)
    assert (configs["connectors"]["video_connector_num_layers"], configs["connectors"]["text_proj_in_factor"]) == (1, 2)
    unet = engine_step.published_configs(Family.ANIMATEDIFF, 1)
    assert unet["unet"]["layers_per_block"] == 1 and unet["motion_adapter"]["motion_layers_per_block"] == 1
    assert engine_step.published_configs(Family.WAN, None)["transformer"]["num_layers"] == 40


@pytest.fixture(scope="module")
def published_widths(tmp_path_factory):
    """One layer at the published widths: LTX-Video (a transformer, T5-XXL's width) and Stable
    Video Diffusion (a UNet, the CLIP image encoder), the two cheapest on a CPU (the seven
    families together take minutes there: the published text lengths cost the same at any shape)."""
    return run(tmp_path_factory, "--layers", "1", "--shape", "min", "--family", "ltx-video,stable-video-diffusion")


def test_a_one_layer_run_at_the_published_widths(published_widths):
    code, results = published_widths
    assert code == 0, [row.get("error") for row in results["runs"]]
    rows = by_family(results)
    assert sorted(rows) == ["ltx-video", "stable-video-diffusion"] and results["tiny"] is False
    ltx, svd = rows["ltx-video"], rows["stable-video-diffusion"]
    assert ltx["layers"] == 1 and ltx["parameters"]["transformer"] > 1e8 and ltx["parameters"]["text_encoder"] > 3e8
    assert ltx["built_from_published_configs"] == ["text_encoder", "transformer", "vae"]
    assert svd["layers"] == 1 and svd["parameters"]["unet"] > 1e9
    assert not ltx["parameters_as_published"]  # one layer
    for row in rows.values():
        eager = row["backends"]["eager"]
        assert eager["ms_per_step"] > 0 and eager["pipeline_s"] > 0 and row["vae_decode_s"] > 0
    # LTX-Video's analytic count agrees with FlopCounterMode's (which sees no attention on a CPU).
    assert ltx["tflop_counted"] == pytest.approx(ltx["tflop_per_step"] - ltx["tflop_attention"], rel=1e-3)


# The command line -------------------------------------------------------------------------


def test_full_size_on_a_cpu_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    assert engine_step.main(["--family", "wan"]) == 2
    assert engine_step.main(["--allow-cpu", "--shape", "min", "--family", "wan"]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_families_and_models_are_chosen():
    args = engine_step.parse_args(["--family", "wan,animatediff"])
    assert args.models == ["wan2.1-t2v-14b", "animatediff-v1-5-3"]
    assert engine_step.parse_args([]).models == list(engine_step.MODELS)
    assert engine_step.parse_args(["--models", "cogvideox-5b"]).models == ["cogvideox-5b"]
    with pytest.raises(SystemExit):
        engine_step.parse_args(["--family", "sora"])
    with pytest.raises(SystemExit):
        engine_step.parse_args(["--family", "wan", "--models", "cogvideox-5b"])


def test_a_shape_outside_a_familys_limits_is_not_run():
    spec = engine_step.MODELS["cogvideox-5b"]
    assert engine_step.shape_problem(Family.COGVIDEOX, engine_step.render_shape(spec, "64x64x13"))
    assert engine_step.shape_problem(Family.COGVIDEOX, engine_step.render_shape(spec, None)) is None
