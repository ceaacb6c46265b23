"""What every backend offers, and the pieces they share.

A backend changes how a pipeline's transformer runs and nothing else: the diffusers
pipeline, its scheduler, guidance and VAE stay as they are. It acts at two moments:

- at load, `prepare(transformer)` changes the model for every shape (FP8 swaps its
  linear layers; the others leave it alone);
- per shape bucket, backends with `builds_per_shape` make an artifact ahead of time
  (`build`: an ONNX graph, a compile cache) and turn it into a *runner* at start
  (`load`): a callable taking exactly the transformer's forward arguments and
  returning what its forward returns.

The transformer itself never leaves the pipeline. `TransformerRouter` replaces the
forward of that one instance with a dispatcher, so that for one render the engine can
send the pipeline's calls to the runner of the render's shape, and to the eager
forward when no build exists for it. The pipelines keep reading `transformer.config`,
`.dtype` and `.cache_context` from the real model.

`capture_transformer_call` runs a pipeline up to its first transformer call and keeps
the arguments: builds are made, verified and warmed up on exactly the inputs the
pipeline gives at that shape. `CallSignature` flattens such a call into named tensors
(what an ONNX graph takes) and remembers its non-tensor arguments, which a graph
bakes in and a later call must repeat.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from farm.config import BackendConfig

# The largest allowed max|actual - eager| / max|eager| of one transformer call, per
# compute dtype of the backend; a build that misses it is not written.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 3e-2,
}
FP8_RELATIVE_TOLERANCE = 1.5e-1

Runner = Callable[..., Any]


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run on this device or with these libraries."""


class CallMismatch(ValueError):
    """A transformer call differs from the one an engine build was made for."""


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max|actual - reference| / max|reference|, in float64: the error measure of every check.

    Normalising by the reference's largest magnitude (not elementwise) keeps values
    near zero from dominating.
    """
    actual64 = actual.detach().to(torch.float64).cpu()
    reference64 = reference.detach().to(torch.float64).cpu()
    if actual64.shape != reference64.shape:
        raise CallMismatch(f"output shape {tuple(actual64.shape)} differs from eager {tuple(reference64.shape)}")
    scale = reference64.abs().max().item()
    difference = (actual64 - reference64).abs().max().item()
    if math.isnan(difference):
        return math.inf
    return difference / scale if scale > 0 else difference


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def class_forward(transformer: torch.nn.Module) -> Callable[..., Any]:
    """The model's own forward, bound to it, whatever a router has put on the instance."""
    return types.MethodType(type(transformer).forward, transformer)


def copy_unrouted(transformer: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the model without the router installed on this instance."""
    routed_forward = transformer.__dict__.pop("forward", None)
    try:
        return copy.deepcopy(transformer)
    finally:
        if routed_forward is not None:
            transformer.forward = routed_forward


def bind_forward_arguments(
    transformer: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], with_defaults: bool = True
) -> dict[str, Any]:
    """A forward call's arguments by name, with the defaults filled in unless told not to."""
    signature = inspect.signature(type(transformer).forward)
    bound = signature.bind(transformer, *args, **kwargs)
    if with_defaults:
        bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    return arguments


def complete_arguments(transformer: torch.nn.Module, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Every forward argument but return_dict, defaults included: what a call signature describes."""
    completed = bind_forward_arguments(transformer, (), arguments)
    completed.pop("return_dict", None)
    return completed


class _CallCaptured(Exception):
    """Ends a pipeline call at its first transformer call (nothing else is computed)."""


def capture_transformer_call(pipe: Any, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Runs pipe(**call_kwargs) up to its first transformer call and returns that call's arguments.

    The arguments are the ones the pipeline passed, by name, without defaults it left out
    (torch.compile guards on how many there are); tensors are detached copies;
    `return_dict` is dropped (a runner honours whatever each call asks for).
    """
    transformer = pipe.transformer
    captured: dict[str, Any] = {}

    def keep_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = bind_forward_arguments(module, args, kwargs, with_defaults=False)
        arguments.pop("return_dict", None)
        captured.update(_detached(arguments))
        raise _CallCaptured

    handle = transformer.register_forward_pre_hook(keep_arguments, with_kwargs=True)
    try:
        pipe(**call_kwargs)
    except _CallCaptured:
        pass
    finally:
        handle.remove()
        # The interrupted call never reached the pipeline's own clean-up.
        if hasattr(transformer, "_reset_stateful_cache"):
            transformer._reset_stateful_cache()
    if not captured:
        raise RuntimeError(f"{type(pipe).__name__} finished without calling its transformer")
    return captured


def copy_tensor(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A copy that keeps broadcast (stride-0) dimensions broadcast.

    Pipelines pass e.g. ``t.expand(batch)`` as the timestep, and torch.compile guards on
    strides: a plain clone would be contiguous and make a warm-up compile a graph that
    renders never use.
    """
    tensor = tensor.detach()
    compact = tensor
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
        if stride == 0 and size > 1:
            compact = compact.narrow(dim, 0, 1)
    copied = compact.to(device) if device is not None else compact
    copied = copied.clone()
    return copied.expand(tensor.shape) if compact.shape != tensor.shape else copied


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return copy_tensor(value)
    if isinstance(value, tuple):
        return tuple(_detached(item) for item in value)
    if isinstance(value, list):
        return [_detached(item) for item in value]
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


def arguments_to(arguments: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The same call arguments with every tensor moved to a device."""

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(moved(item) for item in value)
        return value

    return {name: moved(value) for name, value in arguments.items()}


def as_inference_tensors(arguments: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Copies of a call's tensors made under inference mode, on a device.

    Renders run under inference mode, so the pipeline hands the transformer inference
    tensors; torch.compile guards on that, so warm-ups and builds must call with the same kind.
    """

    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copy_tensor(value, device)
        if isinstance(value, (tuple, list)):
            return type(value)(copied(item) for item in value)
        return value

    with torch.inference_mode():
        return {name: copied(value) for name, value in arguments.items()}


def first_output(output: Any) -> torch.Tensor:
    """The sample of a transformer output, whether a tuple or a diffusers output object."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


# Call signatures --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One flat tensor input: its graph name, shape, dtype as called, and dtype in the graph."""

    input_name: str
    shape: tuple[int, ...]
    dtype: str
    graph_dtype: str


@dataclasses.dataclass(frozen=True)
class ArgumentSpec:
    """One forward argument: a tensor, a tuple of tensors, a tuple of numbers (given to the
    graph as one float32 tensor), or a constant the graph bakes in."""

    name: str
    kind: str  # "tensor" | "tensors" | "numbers" | "constant"
    tensors: tuple[TensorSpec, ...] = ()
    value: Any = None


_NUMBER_TYPES = (int, float)


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """The flat, named form of one transformer call, as an ONNX graph takes it."""

    arguments: tuple[ArgumentSpec, ...]
    output_shape: tuple[int, ...]
    output_dtype: str

    @classmethod
    def of_call(
        cls, arguments: Mapping[str, Any], output: torch.Tensor, graph_dtype: torch.dtype | None = None
    ) -> "CallSignature":
        """Describes a captured call. Tensors in the model's floating dtype (the output's)
        enter the graph in graph_dtype; other tensors keep theirs (e.g. float32 rotary tables)."""
        model_dtype = output.dtype
        graph_dtype = graph_dtype or model_dtype

        def spec(input_name: str, tensor: torch.Tensor) -> TensorSpec:
            in_graph = graph_dtype if tensor.dtype == model_dtype else tensor.dtype
            return TensorSpec(input_name, tuple(tensor.shape), dtype_name(tensor.dtype), dtype_name(in_graph))

        specs = []
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                specs.append(ArgumentSpec(name, "tensor", (spec(name, value),)))
            elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
                tensors = tuple(spec(f"{name}__{index}", item) for index, item in enumerate(value))
                specs.append(ArgumentSpec(name, "tensors", tensors))
            elif (
                isinstance(value, (tuple, list))
                and value
                and all(isinstance(v, _NUMBER_TYPES) and not isinstance(v, bool) for v in value)
            ):
                # A family may pass the frame rate this way (a rotary scale): as a graph
                # input, one build serves every frame rate.
                specs.append(ArgumentSpec(name, "numbers", (TensorSpec(name, (len(value),), "float32", "float32"),)))
            else:
                specs.append(ArgumentSpec(name, "constant", value=_json_constant(name, value)))
        return cls(tuple(specs), tuple(output.shape), dtype_name(output.dtype))

    @property
    def tensor_specs(self) -> list[TensorSpec]:
        return [tensor for argument in self.arguments for tensor in argument.tensors]

    def flatten(self, arguments: Mapping[str, Any]) -> list[torch.Tensor]:
        """The call's tensors in graph order, in graph dtypes; raises CallMismatch when the
        call is not the one this signature describes."""
        expected = {argument.name for argument in self.arguments}
        given = set(arguments) - {"return_dict"}
        if given != expected:
            raise CallMismatch(f"arguments {sorted(given)} differ from the built {sorted(expected)}")
        flat: list[torch.Tensor] = []
        for argument in self.arguments:
            value = arguments[argument.name]
            if argument.kind == "constant":
                if _json_constant(argument.name, value) != argument.value:
                    raise CallMismatch(f"{argument.name}={value!r}, but the build has {argument.value!r}")
                continue
            if argument.kind == "numbers":
                if not isinstance(value, (tuple, list, torch.Tensor)):
                    raise CallMismatch(f"{argument.name} should be {len(argument.tensors[0].shape)} numbers")
                value = [torch.as_tensor(value, dtype=torch.float32)]
            elif argument.kind == "tensor":
                value = [value]
            if not isinstance(value, (tuple, list)) or len(value) != len(argument.tensors):
                raise CallMismatch(f"{argument.name} should hold {len(argument.tensors)} tensors")
            for spec, tensor in zip(argument.tensors, value):
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != spec.shape:
                    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise CallMismatch(f"{spec.input_name} has shape {shape}; the build takes {spec.shape}")
                flat.append(tensor.to(dtype_from_name(spec.graph_dtype)))
        return flat

    def rebuild(self, flat: list[torch.Tensor]) -> dict[str, Any]:
        """The forward arguments again from flat tensors (what an exported graph computes)."""
        remaining = iter(flat)
        arguments: dict[str, Any] = {}
        for argument in self.arguments:
            if argument.kind == "constant":
                arguments[argument.name] = argument.value
            elif argument.kind == "tensors":
                arguments[argument.name] = tuple(next(remaining) for _ in argument.tensors)
            else:  # a tensor, or numbers given to the model as a float32 tensor
                arguments[argument.name] = next(remaining)
        return arguments

    def to_json(self) -> dict[str, Any]:
        return {
            "arguments": [
                {
                    "name": argument.name,
                    "kind": argument.kind,
                    "value": argument.value,
                    "tensors": [dataclasses.asdict(tensor) for tensor in argument.tensors],
                }
                for argument in self.arguments
            ],
            "output": {"shape": list(self.output_shape), "dtype": self.output_dtype},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CallSignature":
        arguments = tuple(
            ArgumentSpec(
                name=item["name"],
                kind=item["kind"],
                value=item["value"],
                tensors=tuple(
                    TensorSpec(t["input_name"], tuple(t["shape"]), t["dtype"], t["graph_dtype"])
                    for t in item["tensors"]
                ),
            )
            for item in data["arguments"]
        )
        return cls(arguments, tuple(data["output"]["shape"]), data["output"]["dtype"])


def _json_constant(name: str, value: Any) -> Any:
    """A constant argument in its JSON form (tuples become lists), or a clear refusal."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise CallMismatch(
            f"argument {name} ({type(value).__name__}) is neither a tensor nor a JSON value; "
            "an engine build cannot bake it in"
        ) from None


# Routing ----------------------------------------------------------------------------------


class TransformerRouter:
    """Sends a transformer's calls to the runner chosen for the current render.

    Installed once per transformer instance (a family's pipelines may share one).
    Outside `routed_to`, calls run the model's own forward, as if nothing were installed.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.eager_forward = class_forward(transformer)
        self._local = threading.local()
        # nn.Module.__call__ calls self.forward: an instance attribute takes precedence
        # over the class's, so hooks and cache contexts on the module keep working.
        transformer.forward = self._dispatch

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        runner = getattr(self._local, "runner", None) or self.eager_forward
        return runner(*args, **kwargs)

    @contextlib.contextmanager
    def routed_to(self, runner: Runner | None) -> Iterator[None]:
        """Calls in this block (on this thread) go to runner; None means the eager forward."""
        previous = getattr(self._local, "runner", None)
        self._local.runner = runner
        try:
            yield
        finally:
            self._local.runner = previous

    def uninstall(self) -> None:
        """Gives the transformer its own forward back."""
        if self.transformer.__dict__.get("forward") == self._dispatch:
            del self.transformer.forward


# Backends ---------------------------------------------------------------------------------


class Backend(abc.ABC):
    """One way of running a transformer. Subclasses set `name` and override what they change."""

    name: ClassVar[str]
    builds_per_shape: ClassVar[bool] = False
    """Whether each shape bucket needs an ahead-of-time build (and renders of other shapes fall back)."""

    def __init__(self, config: BackendConfig, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype

    def check_available(self) -> None:
        """Raises BackendUnavailable, saying why, when this device or install cannot run the backend."""

    def prepare(self, transformer: torch.nn.Module) -> None:
        """Changes the model at load, for every shape; most backends leave it as it is."""

    @property
    def label(self) -> str:
        """The backend as a manifest names it: name, variant and compute dtype."""
        return f"{self.name}-{dtype_name(self.dtype)}"

    @property
    def fallback_label(self) -> str:
        """What runs a shape that has no build: the prepared model, not compiled or exported."""
        return f"eager-{dtype_name(self.dtype)}"

    @property
    def tolerance(self) -> float:
        """The largest relative error against eager that a build of this backend may show."""
        return RELATIVE_TOLERANCE.get(self.dtype, RELATIVE_TOLERANCE[torch.bfloat16])

    @property
    def warmup_calls(self) -> int:
        """Calls a loaded build gets before serving (CUDA graphs record on a later call than the first)."""
        return 1

    def key_fields(self) -> dict[str, Any]:
        """What, besides weights, shape and device, makes a build of this backend differ:
        its options and the versions of the libraries that made it."""
        return {"backend": self.label, "versions": {"torch": torch.__version__}}

    def build(self, transformer: torch.nn.Module, arguments: Mapping[str, Any], reference: torch.Tensor,
              directory: Path) -> None:
        """Writes the artifact for one captured call into directory (backends with builds_per_shape)."""
        raise BackendUnavailable(f"the {self.name} backend has nothing to build: it runs every shape as loaded")

    def load(self, transformer: torch.nn.Module, signature: CallSignature, directory: Path) -> Runner:
        """A runner for the build in directory (backends with builds_per_shape)."""
        raise BackendUnavailable(f"the {self.name} backend has no builds to load")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "builds_per_shape": self.builds_per_shape}
