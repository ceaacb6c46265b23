"""LoRA adapters per request: `AdapterCache`, one engine's adapters on its pipelines' denoiser.

A render names the adapters it wants with a weight each; `AdapterCache.applied` makes
exactly those active on the pipeline for that render and leaves none active afterwards
(also when the render fails), so nothing of one render's adapters reaches the next.
The base model is never reloaded: adapters are added to and removed from the denoiser
in place with diffusers' own LoRA machinery (the pipelines' ``load_lora_weights``, i.e.
their family's LoraLoaderMixin, and the denoiser's ``set_adapters`` / ``disable_lora``
/ ``delete_adapters``).

Two ways to keep them:

- eager (``hotswap=False``): every adapter is loaded once under its own name and kept,
  the most recently used first, while their parameters fit ``max_bytes``; a request
  activates its adapters with their weights (``set_adapters``) and the rest of the
  time LoRA is disabled, so a render without adapters runs exactly the base model's
  arithmetic. Over the bound, the least recently used adapter not in the current
  request is deleted (``delete_adapters``); one that is asked for again is reloaded.
- hot-swap (``hotswap=True``, for compiled backends): the denoiser gets a fixed number
  of slots (`hotswap_slots`), made once with diffusers' ``enable_lora_hotswap`` (every
  slot padded to one rank, its scalings made tensors) and afterwards refilled in place
  with ``load_lora_weights(..., hotswap=True)``: the module structure, the parameters'
  shapes and the set of active adapters never change, so a compiled forward is not
  recompiled when the adapter changes. A request's weights, and "no adapter" (weight
  0), are written into the slots' scaling tensors in place. The slots themselves are
  made on the first request with an adapter (or by `prepare_hotswap`, before the
  backend compiles): that one change of structure is the only recompilation. Slots
  hold one adapter each; their LoRA parameters are the only adapter memory, so
  `max_bytes` is not used to evict anything in this mode (it is reported). Limits of
  hot-swapping: every adapter must target a subset of the layers of the adapter that
  made the slot and have a rank up to the slots' rank (`target_rank`: by default the
  largest of the known adapters'), and the same ``use_rslora`` / dropout / DoRA / alpha
  pattern; one that does not fails with `AdapterError` (checked from the file's header
  where its keys are in diffusers' format; a failure that only diffusers catches makes
  it delete the slot, and then all slots are remade on the next request: for a compiled
  forward, one more recompilation). A render without adapters still runs the slots'
  (zero-scaled) LoRA matmuls: its output equals the base model's in value (x + 0), not
  necessarily in the bits of a signed zero.

The manifest records of a render give each adapter's name, source, revision, weight and
the sha256 of the weight file that was loaded. Adapters are applied in name order (so
the same set of adapters and weights gives the same bits whatever order they were asked
in) and the records come in that order.

Adapter files are safetensors only (no pickles from a hub repository onto a render
node): a local file, a directory (its ``weight_name``, or its one top-level LoRA
``.safetensors`` file), or a hub id (its ``weight_name``, by default diffusers'
``pytorch_lora_weights.safetensors``, through the huggingface_hub cache, which honours
``HF_HUB_OFFLINE``). A file is hashed once; it is hashed again if its size or mtime
changes.

Every error a request can cause (an unknown adapter, a file that is missing or does not
load, too many adapters for the hot-swap slots) is an `AdapterError`, a ValueError,
raised before the pipeline runs; the cache stays consistent (a failed load leaves no
half-loaded adapter behind).

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

log = logging.getLogger(__name__)

# diffusers' standard LoRA file name (`save_lora_weights`), the default inside a hub repository.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Files in an adapter directory that are not the adapter (diffusers' own guess skips them too).
_NOT_ADAPTER_FILES = ("scheduler", "optimizer", "checkpoint")


class AdapterError(ValueError):
    """A request's adapters cannot be applied: unknown names, a file that does not load, ..."""


@dataclass(frozen=True)
class AdapterSource:
    """Where one named adapter comes from: a hub id or a local directory or file."""

    name: str
    source: str
    revision: str | None = None
    weight_name: str | None = None


@dataclass
class _Resolved:
    """An adapter's weight file on this machine and its digest."""

    path: Path
    sha256: str
    revision: str | None
    size: int
    mtime_ns: int
    # Read on demand (hot-swap) from the file's header: its largest LoRA rank, and the layers
    # it targets (keys "<component>.<layer>.lora_A.weight", diffusers' format; None: another format).
    header: tuple[int | None, dict[str, set[str]] | None] | None = None

    def header_facts(self) -> tuple[int | None, dict[str, set[str]] | None]:
        if self.header is None:
            self.header = _safetensors_header(self.path)
        return self.header


@dataclass
class _Slot:
    """A hot-swap slot: a fixed adapter name in the denoiser, refilled in place."""

    peft_name: str
    holds: str | None = None  # the adapter whose weights are in it; None: made, but free or unreliable
    # Each LoRA module's scaling at weight 1 for the adapter it holds (module, base scaling).
    scalings: list[tuple[Any, float]] = field(default_factory=list)
    layers: frozenset[str] = frozenset()  # the denoiser's layers the slot covers
    made_from: str = ""  # the adapter whose layers the slot was made for


class AdapterCache:
    """One engine's LoRA adapters: loaded on first use into the pipelines' denoiser, the most
    recently used kept (bounded by max_bytes of adapter parameters), switched between requests
    without reloading the base model.

    `pipelines`: the engine's pipelines (e.g. task -> pipeline); those sharing one denoiser
    module (one family's text- and image-to-video pipelines may) share its adapters. `denoiser`: the
    pipelines' attribute holding it ("transformer" or "unet"). `known`: the adapters this
    engine may load, by name. `hotswap`: keep `hotswap_slots` fixed slots of rank
    `target_rank` (None: the largest rank among `known`) instead of one adapter each.
    """

    def __init__(
        self,
        pipelines: Mapping[Any, DiffusionPipeline],
        denoiser: str,
        known: Mapping[str, AdapterSource],
        max_bytes: int,
        hotswap: bool = False,
        *,
        hotswap_slots: int = 1,
        target_rank: int | None = None,
    ):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        if hotswap_slots < 1:
            raise ValueError(f"hotswap_slots must be >= 1, not {hotswap_slots}")
        if target_rank is not None and target_rank < 1:
            raise ValueError(f"target_rank must be >= 1, not {target_rank}")
        for name, source in known.items():
            if not isinstance(source, AdapterSource) or source.name != name:
                raise ValueError(f"known[{name!r}] must be the AdapterSource named {name!r}, not {source!r}")
        self.denoiser = denoiser
        self.known: dict[str, AdapterSource] = dict(known)
        self.max_bytes = int(max_bytes)
        self.hotswap = bool(hotswap)
        self.hotswap_slots = int(hotswap_slots)
        self._target_rank = target_rank
        # Distinct denoisers, in the pipelines' order (shared ones once).
        self._denoisers: dict[int, Any] = {}
        for pipe in pipelines.values():
            module = getattr(pipe, denoiser, None)
            if module is None:
                raise ValueError(f"{type(pipe).__name__} has no {denoiser!r} to load adapters into")
            self._denoisers.setdefault(id(module), module)
        # peft adapter names must be valid module names: the configured ones need not be.
        self._peft_names = {name: f"farm_adapter_{index}" for index, name in enumerate(sorted(self.known))}
        self._resolved: dict[str, _Resolved] = {}
        # Eager mode: (denoiser id, adapter name) -> parameter bytes, least recently used first.
        self._loaded: OrderedDict[tuple[int, str], int] = OrderedDict()
        # Hot-swap mode: denoiser id -> its slots (made on first use).
        self._slots: dict[int, list[_Slot]] = {}
        self._loads = 0
        self._evictions = 0
        self._swaps = 0
        self._books = threading.Lock()  # bookkeeping, held briefly (describe() reads under it)
        self._busy = threading.Lock()  # one render's adapters at a time, held for the render
        self._busy_thread: int | None = None

    # The render's side ----------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, pipe: DiffusionPipeline, requested: tuple[tuple[str, float], ...]) -> Iterator[list[dict]]:
        """Activates exactly the requested adapters (name, weight) on pipe for one render and yields
        their manifest records [{"name", "source", "revision", "weight", "sha256"}] (sha256 of the
        adapter's weight file); on exit (also on error) leaves no adapter active, so nothing leaks into
        the next render. requested == () -> no adapter active, yields [].

        Raises AdapterError (a ValueError) before the render for unknown names, repeated names,
        weights that are not finite numbers, a pipeline that cannot load LoRA, or an adapter that
        does not load. Not re-entrant; renders on one cache are serialised.
        """
        wanted = self._check_request(requested)
        module = self._denoiser_of(pipe)
        if self._busy_thread == threading.get_ident():
            raise RuntimeError("AdapterCache.applied is not re-entrant: one render's adapters at a time")
        with self._busy:
            self._busy_thread = threading.get_ident()
            try:
                with _model_editing():
                    if self.hotswap:
                        records = self._activate_slots(pipe, module, wanted)
                    else:
                        records = self._activate_loaded(pipe, module, wanted)
                yield records
            finally:
                try:
                    with _model_editing():
                        self._deactivate(module)
                        if not self.hotswap:
                            self._evict_over_bound(keep=())
                finally:
                    self._busy_thread = None

    def prepare_hotswap(self, pipe: DiffusionPipeline, adapter: str | None = None) -> None:
        """Hot-swap mode: makes the denoiser's slots now, all at weight 0, so that a backend compiled
        afterwards never recompiles for adapters. Optional: otherwise the first request with an
        adapter makes them. The slots cover the layers of `adapter`; by default of the known adapter
        that targets the most of this denoiser's layers (ties: the first by name), so that the others
        (which must target a subset of them) can be swapped in."""
        if not self.hotswap:
            raise RuntimeError("prepare_hotswap is for a cache made with hotswap=True")
        if not self.known:
            raise AdapterError("no adapters are known: there is nothing to make the hot-swap slots from")
        name = adapter if adapter is not None else self._widest_adapter()
        self._check_request(((name, 0.0),))
        module = self._denoiser_of(pipe)
        with self._busy, _model_editing():
            if id(module) not in self._slots:
                self._make_slots(pipe, module, name, self._resolve(name))
            self._deactivate(module)

    def _widest_adapter(self) -> str:
        """The known adapter whose file targets the most layers of the denoiser (by its header)."""
        def width(name: str) -> int:
            try:
                _, targets = self._resolve(name).header_facts()
            except AdapterError as failure:
                log.warning("hot-swap slots: skipping adapter %s: %s", name, failure)
                return -1
            return len(targets.get(self.denoiser, ())) if targets is not None else 0

        return max(sorted(self.known), key=width)  # max keeps the first of equals

    def describe(self) -> dict:
        """Loaded adapters (least recently used first), their bytes, loads and evictions."""
        with self._books:
            index = {key: i for i, key in enumerate(self._denoisers)}
            described: dict[str, Any] = {
                "hotswap": self.hotswap,
                "known": sorted(self.known),
                "max_bytes": self.max_bytes,
                "loads": self._loads,
                "evictions": self._evictions,
            }
            if self.hotswap:
                slots = [
                    {"denoiser": index[key], "slot": i, "adapter": slot.holds,
                     "bytes": _adapter_bytes(self._denoisers[key], slot.peft_name)}
                    for key, module_slots in self._slots.items() for i, slot in enumerate(module_slots)
                ]
                described.update(
                    slots=slots, bytes=sum(s["bytes"] for s in slots), swaps=self._swaps,
                    target_rank=self._target_rank, hotswap_slots=self.hotswap_slots,
                    loaded=[s["adapter"] for s in slots if s["adapter"] is not None],
                )
            else:
                described.update(
                    loaded=[{"name": name, "denoiser": index[key], "bytes": size}
                            for (key, name), size in self._loaded.items()],
                    bytes=sum(self._loaded.values()),
                )
            return described

    # Requests ---------------------------------------------------------------------------------

    def _check_request(self, requested) -> tuple[tuple[str, float], ...]:
        """The request as (name, weight) pairs in name order; AdapterError for anything wrong."""
        try:
            pairs = [(name, weight) for name, weight in requested]
        except (TypeError, ValueError):
            raise AdapterError(f"adapters must be (name, weight) pairs, not {requested!r}") from None
        names = [name for name, _ in pairs]
        unknown = sorted({str(name) for name in names if name not in self.known})
        if unknown:
            raise AdapterError(
                f"unknown adapter(s) {unknown}; this model knows {sorted(self.known) or 'none'}"
            )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise AdapterError(f"adapter(s) {repeated} requested more than once")
        checked = []
        for name, weight in pairs:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise AdapterError(f"adapter {name!r}: weight must be a finite number, not {weight!r}")
            checked.append((name, float(weight)))
        if self.hotswap and len(checked) > self.hotswap_slots:
            raise AdapterError(
                f"{len(checked)} adapters requested but this engine hot-swaps at most {self.hotswap_slots} at once"
            )
        return tuple(sorted(checked))

    def _denoiser_of(self, pipe: DiffusionPipeline):
        module = getattr(pipe, self.denoiser, None)
        if module is None or id(module) not in self._denoisers:
            raise ValueError(f"{type(pipe).__name__}'s {self.denoiser} is not one of this cache's pipelines'")
        return module

    def _record(self, name: str, weight: float, resolved: _Resolved) -> dict:
        return {
            "name": name,
            "source": self.known[name].source,
            "revision": resolved.revision,
            "weight": weight,
            "sha256": resolved.sha256,
        }

    # Files ------------------------------------------------------------------------------------

    def _resolve(self, name: str) -> _Resolved:
        """The adapter's file (downloaded into the hub cache if need be) and its sha256, cached."""
        source = self.known[name]
        try:
            path, revision = _adapter_file(source)
            stat = path.stat()
        except AdapterError:
            raise
        except Exception as failure:  # hub and file errors become the request's error
            raise AdapterError(
                f"adapter {name!r} ({source.source}): its weight file cannot be found: {type(failure).__name__}: "
                f"{failure}"
            ) from failure
        cached = self._resolved.get(name)
        if cached is not None and (cached.path, cached.size, cached.mtime_ns) == (path, stat.st_size, stat.st_mtime_ns):
            return cached
        resolved = _Resolved(path=path, sha256=_file_sha256(path), revision=revision, size=stat.st_size,
                             mtime_ns=stat.st_mtime_ns)
        with self._books:
            self._resolved[name] = resolved
        return resolved

    # Eager mode: one adapter each, least recently used evicted ---------------------------------

    def _activate_loaded(self, pipe, module, wanted) -> list[dict]:
        key = id(module)
        records = []
        for name, weight in wanted:
            resolved = self._resolve(name)
            if (key, name) in self._loaded:
                with self._books:
                    self._loaded.move_to_end((key, name))
            else:
                self._load(pipe, module, name, resolved)
                # Room for the next ones: the least recently used that this render does not need go first.
                self._evict_over_bound(keep={(key, n) for n, _ in wanted})
            records.append(self._record(name, weight, resolved))
        # Weight 0 is no adapter at all: leaving it inactive gives the base arithmetic exactly.
        active = [(self._peft_names[name], weight) for name, weight in wanted if weight != 0.0]
        if active:
            module.set_adapters([n for n, _ in active], [w for _, w in active])
            module.enable_lora()
        else:
            self._deactivate(module)
        return records

    def _load(self, pipe, module, name: str, resolved: _Resolved) -> None:
        peft_name = self._peft_names[name]
        _require_lora_loader(pipe)
        try:
            pipe.load_lora_weights(str(resolved.path.parent), weight_name=resolved.path.name, adapter_name=peft_name)
            if peft_name not in _peft_adapters(module):
                raise AdapterError(f"the file has no LoRA weights for this model's {self.denoiser}")
        except Exception as failure:  # whatever diffusers/peft raise, the request fails clearly
            self._discard(module, peft_name)
            reason = str(failure) if isinstance(failure, AdapterError) else f"{type(failure).__name__}: {failure}"
            raise AdapterError(
                f"adapter {name!r} ({self.known[name].source}, {resolved.path.name}) could not be loaded: {reason}"
            ) from failure
        size = _adapter_bytes(module, peft_name)
        with self._books:
            self._loaded[(id(module), name)] = size
            self._loads += 1
        log.info("loaded LoRA adapter %s (%d bytes) from %s", name, size, resolved.path)

    def _discard(self, module, peft_name: str) -> None:
        """Removes whatever a failed load left of an adapter."""
        if peft_name in _peft_adapters(module):
            module.delete_adapters(peft_name)
        else:  # layers injected before the config was recorded
            from diffusers.utils.peft_utils import delete_adapter_layers

            delete_adapter_layers(module, peft_name)

    def _evict_over_bound(self, keep) -> None:
        while sum(self._loaded.values()) > self.max_bytes:
            victim = next((key for key in self._loaded if key not in keep), None)
            if victim is None:
                return
            module_key, name = victim
            self._denoisers[module_key].delete_adapters(self._peft_names[name])
            with self._books:
                del self._loaded[victim]
                self._evictions += 1
            log.info("evicted LoRA adapter %s", name)

    # Hot-swap mode: fixed slots refilled in place ------------------------------------------------

    def _activate_slots(self, pipe, module, wanted) -> list[dict]:
        key = id(module)
        resolved = {name: self._resolve(name) for name, _ in wanted}
        records = [self._record(name, weight, resolved[name]) for name, weight in wanted]
        if not wanted:
            self._deactivate(module)
            return records
        for name, _ in wanted:
            self._check_rank(name, resolved[name])
        if key not in self._slots:
            self._make_slots(pipe, module, wanted[0][0], resolved[wanted[0][0]])
        slots = self._slots[key]
        weights = dict(wanted)
        # Adapters already in a slot stay there; the others go into the slots no one here needs.
        placed = {slot.holds: slot for slot in slots if slot.holds in weights}
        free = sorted((slot for slot in slots if slot.holds not in weights), key=lambda slot: slot.holds is not None)
        for name, _ in wanted:
            if name not in placed:
                slot = free.pop(0)
                self._swap_into(pipe, module, slot, name, resolved[name])
                placed[name] = slot
        for slot in slots:
            _set_slot_weight(slot, weights.get(slot.holds, 0.0))
        return records

    def _check_rank(self, name: str, resolved: _Resolved) -> None:
        rank, _ = resolved.header_facts()
        if self._target_rank is not None and rank is not None and rank > self._target_rank:
            raise AdapterError(
                f"adapter {name!r} has rank {rank}, above the hot-swap slots' rank {self._target_rank}"
            )

    def _slot_rank(self) -> int:
        """The slots' rank: the configured one, or the largest among the known adapters that resolve."""
        if self._target_rank is None:
            ranks = []
            for name in sorted(self.known):
                try:
                    rank, _ = self._resolve(name).header_facts()
                except AdapterError as failure:
                    log.warning("hot-swap rank: skipping adapter %s: %s", name, failure)
                    continue
                if rank is not None:
                    ranks.append(rank)
            if not ranks:
                raise AdapterError("no known adapter has a readable LoRA rank to size the hot-swap slots")
            self._target_rank = max(ranks)
        return self._target_rank

    def _make_slots(self, pipe, module, name: str, resolved: _Resolved) -> None:
        """Every slot of the denoiser, each filled from one adapter and padded to the slots' rank."""
        _require_lora_loader(pipe)
        target_rank = self._slot_rank()
        slots = [_Slot(f"farm_slot_{i}") for i in range(self.hotswap_slots)]
        try:
            for slot in slots:
                # Before each slot's first load: diffusers then pads every LoRA layer to target_rank and
                # makes the scalings tensors (peft's prepare_model_for_compiled_hotswap). "ignore": farm
                # compiles the forward function, not the module, and the slots are made before a compiled
                # forward sees them.
                pipe.enable_lora_hotswap(target_rank=target_rank, check_compiled="ignore")
                pipe.load_lora_weights(str(resolved.path.parent), weight_name=resolved.path.name,
                                       adapter_name=slot.peft_name)
                if slot.peft_name not in _peft_adapters(module):
                    raise AdapterError(f"the file has no LoRA weights for this model's {self.denoiser}")
            module.set_adapter([slot.peft_name for slot in slots])
            module.enable_lora()
        except Exception as failure:  # whatever diffusers/peft raise: no half-made slots stay behind
            for slot in slots:
                self._discard(module, slot.peft_name)
            module._prepare_lora_hotswap_kwargs = None  # enable_lora_hotswap's pending request, unused
            reason = str(failure) if isinstance(failure, AdapterError) else f"{type(failure).__name__}: {failure}"
            raise AdapterError(
                f"adapter {name!r} ({self.known[name].source}) could not make the hot-swap slots: {reason}"
            ) from failure
        slots[0].holds = name  # the others hold a copy too, but are free for any adapter
        for slot in slots:
            slot.scalings = _slot_scalings(module, slot.peft_name)
            slot.layers = frozenset(_slot_layers(module, slot.peft_name))
            slot.made_from = name
            _set_slot_weight(slot, 0.0)
        with self._books:
            self._slots[id(module)] = slots
            self._loads += 1
        log.info("made %d LoRA hot-swap slot(s) of rank %d from adapter %s", len(slots), target_rank, name)

    def _swap_into(self, pipe, module, slot: _Slot, name: str, resolved: _Resolved) -> None:
        # Checked here first: diffusers, when a hot-swap fails, deletes the whole slot.
        _, targets = resolved.header_facts()
        lacking = sorted(targets.get(self.denoiser, set()) - slot.layers) if targets is not None else []
        if lacking:
            shown = ", ".join(lacking[:4]) + (", ..." if len(lacking) > 4 else "")
            raise AdapterError(
                f"adapter {name!r} ({self.known[name].source}) targets layers the hot-swap slots lack ({shown}): "
                f"the slots were made from adapter {slot.made_from!r}, and a hot-swap cannot add layers"
            )
        slot.holds = None  # until the swap has finished, the slot holds nothing reliable
        _set_slot_weight(slot, 0.0)
        try:
            pipe.load_lora_weights(str(resolved.path.parent), weight_name=resolved.path.name,
                                   adapter_name=slot.peft_name, hotswap=True)
        except Exception as failure:  # the slot stays at weight 0 until refilled, or is remade
            if slot.peft_name not in _peft_adapters(module):
                self._drop_slots(module)
            reason = f"{type(failure).__name__}: {failure}"
            raise AdapterError(
                f"adapter {name!r} ({self.known[name].source}, {resolved.path.name}) could not be hot-swapped in: "
                f"{reason}"
            ) from failure
        slot.scalings = _slot_scalings(module, slot.peft_name)
        slot.holds = name
        with self._books:
            self._swaps += 1

    def _drop_slots(self, module) -> None:
        """Removes every slot of a denoiser (diffusers deleted one on a failed swap); the next request
        with an adapter makes them again (for a compiled forward, one more recompilation)."""
        log.warning("LoRA hot-swap slots of the %s dropped after a failed swap; they are remade on next use",
                    self.denoiser)
        for slot in self._slots.get(id(module), []):
            self._discard(module, slot.peft_name)
        with self._books:
            self._slots.pop(id(module), None)

    # Both ----------------------------------------------------------------------------------------

    def _deactivate(self, module) -> None:
        """No adapter active on the denoiser."""
        slots = self._slots.get(id(module))
        if slots is not None:
            for slot in slots:
                _set_slot_weight(slot, 0.0)
        elif _peft_adapters(module):
            module.disable_lora()


# Helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _model_editing() -> Iterator[None]:
    """Adapter parameters made and changed as ordinary tensors without autograd, even inside the
    engine's inference mode (inference tensors could not be refilled in place afterwards)."""
    import torch

    with torch.inference_mode(False), torch.no_grad():
        yield


def _require_lora_loader(pipe) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise AdapterError(f"{type(pipe).__name__} cannot load LoRA adapters (it has no LoRA loader)")


def _peft_adapters(module) -> dict:
    return getattr(module, "peft_config", None) or {}


def _adapter_bytes(module, peft_name: str) -> int:
    """Bytes of one adapter's parameters in a module (names like ``...lora_A.<name>.weight``)."""
    marker = f".{peft_name}."
    total = 0
    for param_name, param in module.named_parameters():
        if marker in param_name or param_name.endswith(f".{peft_name}"):
            total += param.numel() * param.element_size()
    return total


def _slot_scalings(module, peft_name: str) -> list[tuple[Any, float]]:
    """Each LoRA layer's scaling of a slot as it is now (alpha / rank of the adapter in it: weight 1)."""
    from peft.tuners.lora import LoraLayer

    scalings = []
    for layer in module.modules():
        if isinstance(layer, LoraLayer) and peft_name in layer.scaling:
            value = layer.scaling[peft_name]
            scalings.append((layer, float(value)))
    return scalings


def _set_slot_weight(slot: _Slot, weight: float) -> None:
    """Writes weight x the adapter's own scaling into the slot's scaling tensors, in place."""
    import torch

    for layer, base in slot.scalings:
        value = layer.scaling[slot.peft_name]
        if isinstance(value, torch.Tensor):
            value.fill_(weight * base)
        else:  # not prepared for hot-swap (should not happen): a plain float
            layer.scaling[slot.peft_name] = weight * base


def _adapter_file(source: AdapterSource) -> tuple[Path, str | None]:
    """The adapter's local weight file and the revision it came from."""
    location = Path(source.source).expanduser()
    if location.is_file():
        if source.weight_name is not None and location.name != source.weight_name:
            raise AdapterError(f"adapter {source.name!r}: {location} is a file, not {source.weight_name!r}")
        return _safetensors_only(source, location), source.revision
    if location.is_dir():
        if source.weight_name is not None:
            path = _safetensors_only(source, location / source.weight_name)
            if not path.is_file():
                raise AdapterError(f"adapter {source.name!r}: {path} does not exist")
            return _safetensors_only(source, path), source.revision
        return _guess_weight_file(source, location), source.revision
    if source.source.startswith((".", "/", "~")) or source.source.count("/") != 1:
        raise AdapterError(f"adapter {source.name!r}: {source.source} is neither a directory, a file nor a hub id")
    from huggingface_hub import hf_hub_download

    weight_name = source.weight_name or LORA_WEIGHT_NAME
    _safetensors_only(source, Path(weight_name))
    path = Path(hf_hub_download(source.source, weight_name, revision=source.revision))
    # A hub cache path is .../snapshots/<commit>/<file>: the commit is the exact revision.
    commit = next((parent.name for parent in path.parents if parent.parent.name == "snapshots"), None)
    return path, commit or source.revision


def _safetensors_only(source: AdapterSource, path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise AdapterError(
            f"adapter {source.name!r}: {path.name} is not a .safetensors file (farm loads no pickled weights)"
        )
    return path


def _guess_weight_file(source: AdapterSource, directory: Path) -> Path:
    candidates = sorted(
        path for path in directory.glob("*.safetensors")
        if path.is_file() and not any(part in path.name for part in _NOT_ADAPTER_FILES)
    )
    standard = [path for path in candidates if path.name == LORA_WEIGHT_NAME]
    if standard:
        return standard[0]
    if len(candidates) == 1:
        return candidates[0]
    found = [path.name for path in candidates] or "none"
    raise AdapterError(
        f"adapter {source.name!r}: {directory} needs a weight_name: it has no {LORA_WEIGHT_NAME} and "
        f"its .safetensors files are {found}"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _slot_layers(module, peft_name: str) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, layer in module.named_modules() if isinstance(layer, LoraLayer) and peft_name in layer.lora_A]


def _safetensors_header(path: Path) -> tuple[int | None, dict[str, set[str]] | None]:
    """From a safetensors file's header (no tensor is read): the largest LoRA rank, and the layers
    each component's LoRA targets when every key is in diffusers' format (else None)."""
    from safetensors import safe_open

    rank = None
    targets: dict[str, set[str]] | None = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                component, dot, rest = key.partition(".")
                if targets is not None and dot and (".lora_A." in rest or ".lora_B." in rest):
                    targets.setdefault(component, set()).add(rest.split(".lora_")[0])
                else:
                    targets = None
                if any(part in key for part in ("lora_A", "lora_down", "lora.down")):
                    dim = 0
                elif any(part in key for part in ("lora_B", "lora_up", "lora.up")):
                    dim = 1
                else:
                    continue
                shape = f.get_slice(key).get_shape()
                if len(shape) >= 2:
                    rank = max(rank or 0, int(shape[dim]))
    except Exception as failure:  # whatever safetensors raises for a bad file
        raise AdapterError(
            f"{path} is not a readable safetensors file: {type(failure).__name__}: {failure}"
        ) from failure
    return rank, targets
