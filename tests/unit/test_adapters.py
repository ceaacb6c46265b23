"""LoRA adapters per request (farm.engines.adapters) on farm's tiny LTX-Video and CogVideoX.

Random LoRA adapters are made here with peft on the tiny transformers and saved with the
pipelines' own `save_lora_weights`; renders go through the pipeline directly (latents after
two steps) and are compared bitwise with fresh pipelines that never saw the cache.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from farm.engines.adapters import AdapterCache, AdapterError, AdapterSource

# peft warns whenever a second adapter joins a model: that is what the cache does on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a red fox running through snow"


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    """The tiny LTX-Video directory and three adapters: a (rank 4, alpha 8), b (rank 8), c (rank 2, to_q/to_k only)."""
    from diffusers import LTXPipeline

    from farm.engines.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("adapters-ltx")
    (model_dir,) = make_tiny_models(root / "models", families=["ltx-video"])
    pipe = LTXPipeline.from_pretrained(model_dir)
    adapters = {
        "a": _save_adapter(LTXPipeline, pipe.transformer, root / "a", seed=1, rank=4, alpha=8),
        "b": _save_adapter(LTXPipeline, pipe.transformer, root / "b", seed=2, rank=8, alpha=8),
        "c": _save_adapter(LTXPipeline, pipe.transformer, root / "c", seed=3, rank=2, alpha=2,
                           targets=["to_q", "to_k"]),
    }
    return model_dir, adapters


def _save_adapter(pipeline_class, transformer, directory, seed, rank, alpha, targets=TARGETS):
    """A random LoRA (init_lora_weights=False: it changes the output) saved in diffusers' format; removed again."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="making")
    layers = get_peft_model_state_dict(transformer, adapter_name="making")
    pipeline_class.save_lora_weights(directory, transformer_lora_layers=layers,
                                     transformer_lora_adapter_metadata=config.to_dict())
    transformer.delete_adapters("making")
    assert not getattr(transformer, "peft_config", None)
    return AdapterSource(name=directory.name, source=str(directory))


def _fresh_ltx(model_dir):
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe) -> torch.Tensor:
    """Two steps at a small size, fixed seed: the latents (classifier-free guidance on)."""
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        return pipe(prompt=PROMPT, width=64, height=64, num_frames=9, num_inference_steps=2, guidance_scale=3.0,
                    generator=generator, output_type="latent", return_dict=False)[0]


def _render_with(cache, pipe, requested):
    """As the engine does it: the adapters applied inside the render's inference mode."""
    with torch.inference_mode(), cache.applied(pipe, requested) as records:
        return _render(pipe), records


def _cache(pipe, adapters, max_bytes=1 << 30, **kwargs) -> AdapterCache:
    return AdapterCache({"t2v": pipe}, "transformer", adapters, max_bytes, **kwargs)


@pytest.fixture(scope="module")
def references(ltx):
    """Each output from a fresh pipeline: none (never touched by adapters), a, b, a at 0.5, a+b."""
    model_dir, adapters = ltx
    outputs = {"none": _render(_fresh_ltx(model_dir))}
    for key, requested in {"a": (("a", 1.0),), "b": (("b", 1.0),), "a@0.5": (("a", 0.5),),
                           "a+b": (("a", 1.0), ("b", 1.0))}.items():
        pipe = _fresh_ltx(model_dir)
        outputs[key], _ = _render_with(_cache(pipe, adapters), pipe, requested)
    return outputs


def _sha256(adapter: AdapterSource) -> str:
    path = f"{adapter.source}/pytorch_lora_weights.safetensors"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_adapter_changes_the_output_and_none_is_the_base_model(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    output, records = _render_with(cache, pipe, (("a", 1.0),))
    assert not torch.equal(output, references["none"])
    assert torch.equal(output, references["a"])
    assert records == [{"name": "a", "source": adapters["a"].source, "revision": None, "weight": 1.0,
                        "sha256": _sha256(adapters["a"])}]
    # After the block no adapter is active, even outside the cache.
    assert torch.equal(_render(pipe), references["none"])
    output, records = _render_with(cache, pipe, ())
    assert records == [] and torch.equal(output, references["none"])
    assert [entry["name"] for entry in cache.describe()["loaded"]] == ["a"]


def test_switching_gives_each_adapters_own_output(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    for key, requested in [("a", (("a", 1.0),)), ("b", (("b", 1.0),)), ("none", ()), ("a", (("a", 1.0),)),
                           ("a+b", (("b", 1.0), ("a", 1.0))), ("b", (("b", 1.0),)), ("none", ())]:
        output, _ = _render_with(cache, pipe, requested)
        assert torch.equal(output, references[key]), key
    described = cache.describe()
    assert described["loads"] == 2 and described["evictions"] == 0  # each loaded once, then switched


def test_weights_scale_the_effect(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    zero, records = _render_with(cache, pipe, (("a", 0.0),))
    assert torch.equal(zero, references["none"])
    assert records[0]["weight"] == 0.0 and records[0]["sha256"] == _sha256(adapters["a"])
    half, _ = _render_with(cache, pipe, (("a", 0.5),))
    full, _ = _render_with(cache, pipe, (("a", 1.0),))
    assert torch.equal(half, references["a@0.5"]) and torch.equal(full, references["a"])
    base = references["none"]
    assert 0 < (half - base).norm() < (full - base).norm()
    # diffusers' own weighting, on a pipeline the cache never saw, gives the same bits.
    direct = _fresh_ltx(model_dir)
    direct.load_lora_weights(adapters["a"].source, adapter_name="a")
    direct.set_adapters(["a"], adapter_weights=[0.5])
    assert torch.equal(_render(direct), half)


def test_two_adapters_at_once_in_any_order(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    both, records = _render_with(cache, pipe, (("b", 1.0), ("a", 1.0)))
    assert [record["name"] for record in records] == ["a", "b"]  # applied, and recorded, in name order
    assert torch.equal(both, references["a+b"])
    assert not torch.equal(both, references["a"]) and not torch.equal(both, references["b"])


def test_eviction_keeps_the_cache_bounded_and_reloads(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    sizes = {}
    for name in ("a", "b"):
        probe_pipe = _fresh_ltx(model_dir)
        probe = _cache(probe_pipe, adapters)
        with probe.applied(probe_pipe, ()):
            assert probe.describe()["bytes"] == 0  # () loads nothing
        with probe.applied(probe_pipe, ((name, 1.0),)):
            pass
        sizes[name] = probe.describe()["bytes"]
    assert sizes["b"] > sizes["a"] > 0  # rank 8 vs rank 4 on the same layers

    cache = _cache(pipe, adapters, max_bytes=sizes["b"])  # room for one of them
    for key in ["a", "b", "a", "b"]:
        output, _ = _render_with(cache, pipe, ((key, 1.0),))
        assert torch.equal(output, references[key]), key
        described = cache.describe()
        assert described["bytes"] <= sizes["b"]
        assert [entry["name"] for entry in described["loaded"]] == [key]
        assert len(pipe.transformer.peft_config) == 1
    assert described["loads"] == 4 and described["evictions"] == 3
    # Both at once fit only during the render; afterwards the cache is back within its bound.
    output, _ = _render_with(cache, pipe, (("a", 1.0), ("b", 1.0)))
    assert torch.equal(output, references["a+b"])
    assert cache.describe()["bytes"] <= sizes["b"]
    # With no room at all every adapter is dropped after its render; the base stays untouched.
    pipe2 = _fresh_ltx(model_dir)
    empty = _cache(pipe2, adapters, max_bytes=0)
    output, _ = _render_with(empty, pipe2, (("a", 1.0),))
    assert torch.equal(output, references["a"])
    assert empty.describe()["loaded"] == [] and not getattr(pipe2.transformer, "peft_config", None)
    assert torch.equal(_render_with(empty, pipe2, ())[0], references["none"])
    assert torch.equal(_render_with(empty, pipe2, (("a", 1.0),))[0], references["a"])


def test_unknown_and_malformed_requests(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    unknown = r"unknown adapter\(s\) \['nope'\].*knows \['a', 'b', 'c'\]"
    with pytest.raises(ValueError, match=unknown), cache.applied(pipe, (("a", 1.0), ("nope", 1.0))):
        pass
    with pytest.raises(AdapterError, match="more than once"), cache.applied(pipe, (("a", 1.0), ("a", 0.5))):
        pass
    with pytest.raises(AdapterError, match="finite"), cache.applied(pipe, (("a", float("nan")),)):
        pass
    assert cache.describe()["loaded"] == [] and not getattr(pipe.transformer, "peft_config", None)
    assert torch.equal(_render(pipe), references["none"])


def test_a_broken_adapter_fails_clearly_and_leaves_the_cache_consistent(ltx, references, tmp_path):
    model_dir, adapters = ltx
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    # A LoRA for layers this model does not have.
    from safetensors.torch import save_file

    alien = tmp_path / "alien"
    alien.mkdir()
    save_file({"transformer.no_such_block.proj.lora_A.weight": torch.ones(2, 32),
               "transformer.no_such_block.proj.lora_B.weight": torch.ones(32, 2)},
              str(alien / "pytorch_lora_weights.safetensors"))
    missing = AdapterSource("missing", str(tmp_path / "missing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    known = {**adapters, "broken": AdapterSource("broken", str(broken)), "alien": AdapterSource("alien", str(alien)),
             "missing": missing, "pickled": AdapterSource("pickled", str(pickled), weight_name="lora.bin")}
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, known)
    assert torch.equal(_render_with(cache, pipe, (("a", 1.0),))[0], references["a"])
    for name, reason in [("broken", "could not be loaded"), ("alien", "could not be loaded"),
                         ("missing", "neither a directory"), ("pickled", "not a .safetensors")]:
        with pytest.raises(ValueError, match=reason) as failure, cache.applied(pipe, (("b", 1.0), (name, 1.0))):
            pytest.fail("the render must not start")
        assert repr(name) in str(failure.value)
        # Only the good adapters are loaded, none is active, and they still work.
        assert sorted(pipe.transformer.peft_config) == sorted(
            cache._peft_names[n] for n in ("a", "b")), name
        assert torch.equal(_render(pipe), references["none"])
        assert torch.equal(_render_with(cache, pipe, (("a", 1.0),))[0], references["a"])
    assert [entry["name"] for entry in cache.describe()["loaded"]] == ["b", "a"]


def test_a_hub_adapter_comes_from_the_hub_cache(ltx, references, tmp_path, monkeypatch):
    """Offline, as every machine here: a hub id resolves to its snapshot in the huggingface_hub cache."""
    import shutil

    from huggingface_hub import constants

    model_dir, adapters = ltx
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--fox-lora"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(f"{adapters['a'].source}/pytorch_lora_weights.safetensors", repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    known = {"fox": AdapterSource("fox", "someone/fox-lora"), "gone": AdapterSource("gone", "someone/gone")}
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, known)
    output, records = _render_with(cache, pipe, (("fox", 1.0),))
    assert torch.equal(output, references["a"])
    assert records == [{"name": "fox", "source": "someone/fox-lora", "revision": commit, "weight": 1.0,
                        "sha256": _sha256(adapters["a"])}]
    not_found = r"'gone' \(someone/gone\): its weight file cannot be found"
    with pytest.raises(AdapterError, match=not_found), cache.applied(pipe, (("gone", 1.0),)):
        pass


def test_an_error_in_the_render_leaks_no_adapter(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters)
    with pytest.raises(RuntimeError, match="render failed"), cache.applied(pipe, (("a", 1.0), ("b", 0.5))):
        raise RuntimeError("render failed")
    assert torch.equal(_render(pipe), references["none"])
    assert torch.equal(_render_with(cache, pipe, (("a", 1.0),))[0], references["a"])


def test_pipelines_sharing_a_denoiser_load_each_adapter_once(ltx, references):
    from diffusers import LTXImageToVideoPipeline

    model_dir, adapters = ltx
    t2v = _fresh_ltx(model_dir)
    i2v = LTXImageToVideoPipeline(**t2v.components)
    cache = AdapterCache({"t2v": t2v, "i2v": i2v}, "transformer", adapters, 1 << 30)
    with cache.applied(i2v, (("a", 1.0),)):
        pass
    assert torch.equal(_render_with(cache, t2v, (("a", 1.0),))[0], references["a"])
    described = cache.describe()
    assert described["loads"] == 1 and [(e["name"], e["denoiser"]) for e in described["loaded"]] == [("a", 0)]
    assert list(t2v.transformer.peft_config) == [cache._peft_names["a"]]


def test_hotswap_switches_adapters_in_fixed_slots(ltx, references):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters, hotswap=True, hotswap_slots=2)
    first = {}
    for key, requested in [("a", (("a", 1.0),)), ("b", (("b", 1.0),)), ("none", ()), ("a+b", (("a", 1.0), ("b", 1.0))),
                           ("c", (("c", 1.0),)), ("a@0.5", (("a", 0.5),)), ("a", (("a", 1.0),)),
                           ("b", (("b", 1.0),)), ("none", ())]:
        output, records = _render_with(cache, pipe, requested)
        assert [r["name"] for r in records] == [name for name, _ in requested]
        if key in first:  # a switch back gives the same bits as the first time
            assert torch.equal(output, first[key]), key
        first[key] = output
        if key == "none":
            assert torch.equal(output, references["none"])  # x + 0: the base model's values
        elif key in references:
            # Padded to the slots' rank the matmuls sum more (zero) terms: equal up to rounding.
            torch.testing.assert_close(output, references[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(first["c"], references["none"]) and not torch.equal(first["c"], first["a"])
    # Never more than the two slots in the model; every slot at the largest known rank (8).
    assert sorted(pipe.transformer.peft_config) == ["farm_slot_0", "farm_slot_1"]
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.lora_A["farm_slot_0"].weight.shape[0] == 8
    described = cache.describe()
    assert described["target_rank"] == 8 and described["swaps"] >= 3 and len(described["slots"]) == 2
    with pytest.raises(AdapterError, match="at most 2"), cache.applied(pipe, (("a", 1.0), ("b", 1.0), ("c", 1.0))):
        pass


def test_hotswap_rejects_an_adapter_above_the_slot_rank(ltx):
    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters, hotswap=True, target_rank=4)
    assert torch.is_tensor(_render_with(cache, pipe, (("a", 1.0),))[0])
    too_large = "rank 8, above the hot-swap slots' rank 4"
    with pytest.raises(AdapterError, match=too_large), cache.applied(pipe, (("b", 1.0),)):
        pass


def test_hotswap_rejects_an_adapter_for_layers_the_slot_lacks(ltx, references, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir, adapters = ltx
    # a's weights in the original LTX-Video trainers' key format, which diffusers converts on load.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    weights = load_file(f"{adapters['a'].source}/pytorch_lora_weights.safetensors")
    save_file({"diffusion_model." + key.removeprefix("transformer."): value for key, value in weights.items()},
              str(legacy / "lora.safetensors"))
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, {**adapters, "legacy": AdapterSource("legacy", str(legacy))}, hotswap=True)
    only_c, _ = _render_with(cache, pipe, (("c", 1.0),))  # the slot is made from c: to_q and to_k only
    with pytest.raises(AdapterError, match="'a'.*targets layers the hot-swap slots lack.*attn1.to_out.0"), \
            cache.applied(pipe, (("a", 1.0),)):
        pytest.fail("the render must not start")
    assert torch.equal(_render_with(cache, pipe, ())[0], references["none"])
    assert torch.equal(_render_with(cache, pipe, (("c", 1.0),))[0], only_c)
    # Caught by diffusers only (after its key conversion), which then deletes the slot: the slots are remade.
    with pytest.raises(AdapterError, match="'legacy'.*could not be hot-swapped in"), \
            cache.applied(pipe, (("legacy", 1.0),)):
        pytest.fail("the render must not start")
    assert cache.describe()["slots"] == [] and not getattr(pipe.transformer, "peft_config", None)
    assert torch.equal(_render_with(cache, pipe, ())[0], references["none"])
    assert torch.equal(_render_with(cache, pipe, (("c", 1.0),))[0], only_c)
    assert torch.equal(_render_with(cache, pipe, ())[0], references["none"])


def test_hotswap_does_not_recompile_a_compiled_forward(ltx, references):
    """Dynamo (with a counting backend that runs its graphs eagerly: no Inductor, so quick) traces
    the forward once with the slots in place; switching adapters and weights adds no graph."""
    from torch._dynamo.testing import CompileCounter

    from farm.engines.backends.backend import TransformerRouter, class_forward

    model_dir, adapters = ltx
    pipe = _fresh_ltx(model_dir)
    cache = _cache(pipe, adapters, hotswap=True)
    cache.prepare_hotswap(pipe)  # the engine would do this before its backend compiles
    # The slots cover the widest adapter's layers (a and b: to_q/k/v/out; c only to_q/k), so c fits too.
    assert cache.describe()["slots"][0]["adapter"] == "a"
    eager = {key: _render_with(cache, pipe, requested)[0]
             for key, requested in [("a", (("a", 1.0),)), ("b", (("b", 1.0),)), ("none", ())]}
    torch._dynamo.reset()
    counter = CompileCounter()
    router = TransformerRouter(pipe.transformer)
    compiled = torch.compile(class_forward(pipe.transformer), backend=counter, dynamic=False)
    try:
        with router.routed_to(compiled):
            assert torch.equal(_render_with(cache, pipe, (("a", 1.0),))[0], eager["a"])
            traced = counter.frame_count
            assert traced > 0
            for key, requested in [("b", (("b", 1.0),)), ("none", ()), ("a", (("a", 1.0),)),
                                   ("c", (("c", 1.0),)), ("b", (("b", 1.0),))]:
                output = _render_with(cache, pipe, requested)[0]
                if key in eager:
                    assert torch.equal(output, eager[key]), key
            assert counter.frame_count == traced
    finally:
        router.uninstall()
        torch._dynamo.reset()


def test_the_same_cache_serves_cogvideox(tmp_path):
    from diffusers import CogVideoXPipeline

    from farm.engines.tiny import make_tiny_models

    model_dir = next(p for p in make_tiny_models(tmp_path / "models", families=["cogvideox"])
                     if p.name == "cogvideox-tiny")

    def fresh():
        pipe = CogVideoXPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def render(pipe):
        generator = torch.Generator().manual_seed(3)
        with torch.inference_mode():
            return pipe(prompt=PROMPT, width=64, height=64, num_frames=9, num_inference_steps=2, guidance_scale=6.0,
                        generator=generator, output_type="latent", return_dict=False)[0]

    maker = fresh()
    adapters = {name: _save_adapter(CogVideoXPipeline, maker.transformer, tmp_path / name, seed=seed, rank=4, alpha=4)
                for name, seed in (("x", 11), ("y", 12))}
    base = render(fresh())
    alone = {}
    for name in adapters:
        pipe = fresh()
        with _cache(pipe, adapters).applied(pipe, ((name, 1.0),)):
            alone[name] = render(pipe)
    pipe = fresh()
    cache = _cache(pipe, adapters)
    for key, requested in [("x", (("x", 1.0),)), ("y", (("y", 1.0),)), (None, ()), ("x", (("x", 1.0),))]:
        with cache.applied(pipe, requested) as records:
            output = render(pipe)
        assert torch.equal(output, alone[key] if key else base), key
        assert [r["name"] for r in records] == ([key] if key else [])
    assert not torch.equal(alone["x"], base) and not torch.equal(alone["x"], alone["y"])
    assert torch.equal(render(pipe), base)
