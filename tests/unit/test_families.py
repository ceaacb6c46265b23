"""The families' registry: every registered family module offers the whole description,
its limits and defaults hold together, and importing it costs the gateway no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farm.config import ModelConfig, tiny_model_configs
from farm.domain.limits import ModelLimits, RenderDefaults
from farm.families import (
    FAMILY_MODULES,
    Family,
    FamilyFacts,
    FamilyModule,
    LatentCompression,
    MemoryFacts,
    PipelineSizes,
    StepCarry,
    TinyModel,
    checkpoint_schedulers,
    family_facts,
    family_module,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("pipeline_classes", "resumable_pipelines", "call_kwargs", "encode_prompt", "decode_latents",
             "build_tiny_pipelines", "joint_text_tokens", "vae_decode_tile")


def test_every_family_is_registered():
    assert set(FAMILY_MODULES) == set(Family)


@pytest.mark.parametrize("family", list(Family))
def test_a_family_module_offers_the_whole_description(family):
    module = family_module(family)
    assert isinstance(module, FamilyModule)
    assert module.FAMILY is family
    assert all(callable(getattr(module, name)) for name in FUNCTIONS)
    facts = module.FACTS
    assert isinstance(facts, FamilyFacts) and family_facts(family) is facts
    assert isinstance(facts.limits, ModelLimits) and isinstance(facts.defaults, RenderDefaults)
    assert facts.min_steps_reason is None or (facts.limits.min_steps > 1 and facts.min_steps_reason)
    assert isinstance(facts.compression, LatentCompression)
    assert isinstance(facts.memory, MemoryFacts) and isinstance(facts.memory.published, PipelineSizes)
    assert isinstance(facts.tiny, TinyModel) and facts.tiny.directories
    assert facts.checkpoint_schedulers and all(isinstance(c, StepCarry) for c in facts.checkpoint_schedulers.values())


@pytest.mark.parametrize("family", list(Family))
def test_a_familys_limits_and_defaults_validate_and_agree(family):
    facts = family_facts(family)
    limits = ModelLimits.model_validate(facts.limits.model_dump())
    compression = facts.compression
    # Sizes are whole tokens and frame counts whole latent frames.
    assert limits.size_multiple % compression.token_pixels == 0
    assert limits.frame_step % compression.temporal == 0
    for defaults in (facts.defaults, facts.tiny.defaults):
        RenderDefaults.model_validate(defaults.model_dump())
        assert defaults.width % limits.size_multiple == 0 and defaults.height % limits.size_multiple == 0
        assert limits.min_size <= defaults.width <= limits.max_width
        assert limits.min_size <= defaults.height <= limits.max_height
        assert (defaults.num_frames - 1) % limits.frame_step == 0
        assert limits.min_frames <= defaults.num_frames <= limits.max_frames
        assert limits.min_steps <= defaults.num_inference_steps <= limits.max_steps
        assert defaults.fps <= limits.max_fps and defaults.guidance_scale <= limits.max_guidance_scale
    # A model of the family takes them unless its config says otherwise.
    model = ModelConfig(name="m", family=family, sources={next(iter(facts.tiny.directories)): "d"})
    assert model.limits == facts.limits and model.limits is not facts.limits
    assert model.defaults == facts.defaults


def test_the_default_models_are_the_families_tiny_ones(tmp_path):
    models = tiny_model_configs(tmp_path)
    assert [(m.name, m.family) for m in models] == [(family_facts(f).tiny.name, f) for f in FAMILY_MODULES]
    for model in models:
        tiny = family_facts(model.family).tiny
        assert model.sources == {task: str(tmp_path / directory) for task, directory in tiny.directories.items()}
        assert model.defaults == tiny.defaults and model.limits == family_facts(model.family).limits


def test_checkpoint_schedulers_gather_every_familys():
    gathered = checkpoint_schedulers()
    for family in Family:
        assert family_facts(family).checkpoint_schedulers.items() <= gathered.items()


def test_an_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="no model family 'sora'.*known"):
        family_module("sora")


def test_importing_the_families_imports_neither_torch_nor_diffusers():
    modules = ["farm.families", *FAMILY_MODULES.values()]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from farm.families import Family, family_facts\n"
        "for family in Family:\n"
        "    family_facts(family)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
