"""Tiny random-weight models, written offline in the real diffusers format.

`make_tiny_models` builds each family's tiny pipelines in code (the family module's
`build_tiny_pipelines`, into the directories of its `FACTS.tiny`) and writes them with
`save_pretrained`, so tests and the demo load them through the same `from_pretrained`
path as real checkpoints. They keep the real models' compression (VAE spatial and
temporal factors, transformer patch sizes), so the real families' limits hold for them
unchanged; only the widths and depths are tiny.

Nothing is downloaded: the T5 tokenizer is a Unigram vocabulary made here from a
built-in English word list (whole words, with single characters as the fallback).

The configs of the models a farm serves by default (`tiny_model_configs`) come from
`farm.config`, which reads them from the families' registry; this module imports torch
and diffusers only inside `make_tiny_models`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from farm.config import tiny_model_configs
from farm.domain.spec import Task
from farm.families import Family, TinyModel, family_module, tiny_models

# Bump when the tiny architectures change, so that older directories get rebuilt.
TINY_FORMAT_VERSION = 1
# Written last into a finished model directory; its presence (with our version) means complete.
COMPLETE_MARKER = "farm-tiny.json"
TINY_SEED = 0


def make_tiny_models(models_dir: Path, force: bool = False, families: list[Family] | None = None) -> list[Path]:
    """Writes every tiny model directory under models_dir (of `families` only, when
    given); returns their paths.

    A directory that is already complete is left alone unless `force`. Each one is
    written to a temporary sibling and renamed into place, so a crash leaves no half
    model, and two processes racing to write the same model both end with a whole one.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, tuple[Family, TinyModel, Task]] = {}
    for family, tiny in tiny_models():
        if families is not None and family not in families:
            continue
        for task, directory in tiny.directories.items():
            wanted.setdefault(directory, (family, tiny, task))
    missing = {d: spec for d, spec in wanted.items() if force or not is_complete(models_dir / d)}
    if missing:
        _write_pipelines(models_dir, missing)
    return [models_dir / d for d in wanted]


def is_complete(model_dir: Path) -> bool:
    """Whether model_dir holds a finished tiny model of the current format."""
    try:
        marker = json.loads((Path(model_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == TINY_FORMAT_VERSION and (Path(model_dir) / "model_index.json").is_file()


def _write_pipelines(models_dir: Path, missing: dict[str, tuple[Family, TinyModel, Task]]) -> None:
    from farm.engines.hf_progress import no_progress_bars

    with no_progress_bars():
        text_encoder, tokenizer = build_tiny_text_encoder()
        pipelines_by_family = {}
        for directory, (family, tiny, task) in missing.items():
            if family not in pipelines_by_family:
                pipelines_by_family[family] = family_module(family).build_tiny_pipelines(text_encoder, tokenizer)
            pipeline = pipelines_by_family[family][task]
            staging = models_dir / f".{directory}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                pipeline.save_pretrained(staging)
                marker = {"format_version": TINY_FORMAT_VERSION, "model": tiny.name, "task": task.value}
                (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                _replace_directory(staging, models_dir / directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(staging: Path, target: Path) -> None:
    if target.exists():
        # Move the old one aside first: rename cannot replace a non-empty directory.
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            target.rename(retired)
        except FileNotFoundError:
            retired = None
        _rename_into_place(staging, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    else:
        _rename_into_place(staging, target)


def _rename_into_place(staging: Path, target: Path) -> None:
    try:
        staging.rename(target)
    except OSError:
        # Another process finished the same model first; theirs is as good as ours.
        if not is_complete(target):
            raise


def build_tiny_text_encoder():
    """A tiny T5 encoder and its tokenizer (the classes the real pipelines use), built offline."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=_unigram_vocabulary(), extra_ids=0, model_max_length=512)
    torch.manual_seed(TINY_SEED)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # as in T5 v1.1, which the families' text encoders are
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    text_encoder = T5EncoderModel(config).eval()
    return text_encoder, tokenizer


def _unigram_vocabulary() -> list[tuple[str, float]]:
    """T5's layout: <pad>=0, </s>=1, <unk>=2, then pieces with log-probability scores.

    A whole word scores higher than any spelling of it in characters, so known words
    are one token each; anything else falls back to characters, and to <unk> last.
    """
    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    words = sorted(set(_WORDS.split()))
    word_pieces = [("\u2581" + word, -6.0) for word in words]
    characters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+"))
    character_pieces = [(c, -10.0) for c in characters] + [("\u2581" + c, -10.0) for c in characters]
    return special + word_pieces + character_pieces


_WORDS = """
a an the and or of in on at to from with without by for over under above below into onto through
across along around behind beside between near far inside outside up down left right front back
is are was be being been has have it its this that these those there here very slowly quickly
gently softly suddenly while as then after before during
man woman child boy girl person people crowd dog cat bird horse fish cow sheep lion tiger bear
wolf fox rabbit deer eagle owl butterfly bee dragon robot car truck train bus boat ship plane
bicycle motorcycle rocket astronaut knight king queen dancer chef musician painter
city street road bridge building house tower castle village town market cafe kitchen room window
door table chair bed lamp book cup glass bottle candle mirror clock painting
sky cloud clouds sun moon star stars rain snow fog mist storm wind lightning thunder rainbow
sunset sunrise dawn dusk night day morning evening
sea ocean wave waves beach sand shore river lake waterfall water ice fire smoke flame flames
forest tree trees leaf leaves flower flowers grass field meadow garden mountain mountains hill
valley desert canyon cave rock rocks stone island jungle
red orange yellow green blue purple pink brown black white gray grey golden silver dark bright
light shadow shadows colorful neon glowing shining sparkling
big small tiny huge tall short long wide old young new ancient modern futuristic beautiful
calm quiet loud busy empty wet dry warm cold hot soft sharp smooth rough
walking running jumping flying swimming dancing sitting standing sleeping eating drinking
reading writing playing singing talking smiling laughing looking watching falling rising
floating spinning turning moving driving riding climbing waving holding carrying opening
closing burning melting growing blooming blowing crashing flowing drifting
camera shot view close closeup wide aerial drone tracking pan zoom slow motion timelapse
cinematic realistic photorealistic detailed high quality lighting scene background foreground
style film video frame 4k hd animation cartoon anime painting watercolor oil sketch
one two three four five many some every each first last
""".strip()


__all__ = ["build_tiny_text_encoder", "is_complete", "make_tiny_models", "tiny_model_configs"]
