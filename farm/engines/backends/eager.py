"""The eager backend: the diffusers transformer as loaded, in the engine's dtype.

It is the reference every other backend is checked against, and what a render falls
back to when its shape has no build.
"""

from __future__ import annotations

from typing import ClassVar

from farm.engines.backends.backend import Backend


class EagerBackend(Backend):
    """Runs the model's own forward; the dtype (bfloat16, float16, float32) is chosen at load."""

    name: ClassVar[str] = "eager"
    builds_per_shape: ClassVar[bool] = False
