"""LoRA adapters through the engine: a render names adapters from its model's config; the
replica applies them for that render only, records them in its output (and so the
manifest), and a preempted render with an adapter resumes to the same frames."""

from __future__ import annotations

import numpy as np
import pytest

from farm.config import AdapterConfig, Task
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderPreempted
from farm.engines import load_engine
from farm.engines.tiny import tiny_model_configs
from farm.families import Family
from tests.unit.test_adapters import _save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    """The tiny LTX-Video engine with two random adapters in its config."""
    from diffusers import LTXPipeline

    root = tmp_path_factory.mktemp("engine-adapters")
    model = next(m for m in tiny_model_configs(models_dir) if m.family == Family.LTX_VIDEO)
    pipe = LTXPipeline.from_pretrained(model.sources[Task.TEXT_TO_VIDEO])
    adapters = [
        AdapterConfig(name=name, source=str(_save_adapter(LTXPipeline, pipe.transformer, root / name, seed=seed,
                                                          rank=4, alpha=8).source), families=[Family.LTX_VIDEO])
        for name, seed in (("watercolor", 1), ("film-grain", 2))
    ]
    return load_engine(model.model_copy(update={"adapters": adapters}))


@pytest.fixture(scope="module")
def plain(models_dir):
    """The same model with no adapters configured: the base weights never touched."""
    return load_engine(next(m for m in tiny_model_configs(models_dir) if m.family == Family.LTX_VIDEO))


def request(adapters=(), **overrides) -> EngineRequest:
    fields = dict(render_id="r", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a boat on a lake", negative_prompt="",
                  image=None, width=64, height=64, num_frames=9, fps=24, num_inference_steps=4, guidance_scale=3.0,
                  seed=7, adapters=tuple(adapters))
    fields.update(overrides)
    return EngineRequest(**fields)


def frames(engine, req: EngineRequest, **kwargs) -> np.ndarray:
    return engine.render(req, lambda p: None, lambda: False, **kwargs).frames


def test_an_adapter_changes_the_video_and_each_render_gets_only_its_own(engine, plain):
    base = frames(plain, request())
    watercolor = frames(engine, request([("watercolor", 1.0)]))
    assert not np.array_equal(watercolor, base)
    # A, then B, then none, then A again: each as if alone; none is the untouched model.
    film = frames(engine, request([("film-grain", 0.8)]))
    assert not np.array_equal(film, watercolor) and not np.array_equal(film, base)
    np.testing.assert_array_equal(frames(engine, request()), base)
    np.testing.assert_array_equal(frames(engine, request([("watercolor", 1.0)])), watercolor)
    # Both at once is yet another video.
    both = frames(engine, request([("watercolor", 1.0), ("film-grain", 0.8)]))
    assert not np.array_equal(both, watercolor) and not np.array_equal(both, film)


def test_the_output_records_each_adapter_with_its_weight_and_hash(engine):
    output = engine.render(request([("film-grain", 0.5)]), lambda p: None, lambda: False)
    [record] = output.adapters
    assert record["name"] == "film-grain" and record["weight"] == 0.5 and len(record["sha256"]) == 64
    assert engine.render(request(), lambda p: None, lambda: False).adapters == []
    assert "film-grain" in engine.describe()["adapters"]["known"]


def test_a_preempted_render_with_an_adapter_resumes_to_the_same_frames(engine):
    req = request([("watercolor", 1.0)])
    uninterrupted = frames(engine, req)
    steps = []
    with pytest.raises(RenderPreempted) as raised:
        engine.render(req, lambda p: steps.append(p.step), lambda: False,
                      should_preempt=lambda: max(steps, default=0) >= 2)
    # Another render in between, without the adapter, must not disturb the resume.
    frames(engine, request())
    resumed = frames(engine, req, resume=DenoiseCheckpoint.from_bytes(raised.value.checkpoint.to_bytes()))
    np.testing.assert_array_equal(resumed, uninterrupted)


def test_a_checkpoint_made_with_other_adapters_is_refused(engine):
    steps = []
    with pytest.raises(RenderPreempted) as raised:
        engine.render(request([("watercolor", 1.0)]), lambda p: steps.append(p.step), lambda: False,
                      should_preempt=lambda: max(steps, default=0) >= 2)
    with pytest.raises(ValueError, match="adapters"):
        frames(engine, request([("film-grain", 1.0)]), resume=raised.value.checkpoint)


def test_an_adapter_the_model_does_not_offer_fails_before_any_work(engine):
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.render(request([("sepia", 1.0)]), lambda p: None, lambda: False)
