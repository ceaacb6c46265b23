"""The manifest written beside every MP4: everything needed to reproduce the render,
and what it took."""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Iterable
from pathlib import PurePosixPath

from farm.domain.engine import EngineRequest

# An absolute path on the server (or a file:// URL of one), not part of a longer URL or word.
SERVER_PATH = re.compile(r"(?<![\w.:/~-])(?:file://)?/(?:[^\s'\"/]+/)*[^\s'\"/,;)]*")


def without_server_paths(value):
    """`value` (JSON-like) with every server path reduced to `local:<last part>`: the
    manifest goes to clients, to whom the farm's directories mean nothing and tell too much
    (the weights stay identified by their hash)."""
    if isinstance(value, str):
        return SERVER_PATH.sub(lambda match: f"local:{PurePosixPath(match.group()).name or '/'}", value)
    if isinstance(value, dict):
        return {key: without_server_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_server_paths(item) for item in value]
    return value


def build_manifest(engine_info: dict, request: EngineRequest, timings: Iterable, output_shape: tuple,
                   peak_memory_bytes: int | None, backend: str | None = None, notes: list[str] = (),
                   postprocess: dict | None = None, cpu_threads: int | None = None,
                   adapters: list[dict] = ()) -> dict:
    """output_shape is the delivered clip's (frames, height, width); timings, (phase,
    device kind, seconds) of every phase; postprocess, what post-processing did."""
    spec = {
        "task": request.task.value, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "width": request.width, "height": request.height, "num_frames": request.num_frames, "fps": request.fps,
        "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "image_sha256": hashlib.sha256(request.image).hexdigest() if request.image else None,
        "motion_bucket_id": request.motion_bucket_id, "noise_aug_strength": request.noise_aug_strength,
        "decode_chunk_size": request.decode_chunk_size,
    }
    return {
        "render_id": request.render_id,
        "attempt": request.attempt,
        "spec": spec,
        "seed": request.seed,
        "model": without_server_paths(engine_info),
        # The backend that actually ran this render (an unbuilt shape falls back to eager).
        "backend": backend or engine_info.get("backend"),
        # A CPU render's thread count (it can change the last bits of the frames).
        "cpu_threads": cpu_threads,
        "notes": without_server_paths(list(notes)),
        "timings": [{"phase": p, "device_kind": k, "seconds": s} for p, k, s in timings],
        "output": {"frames": output_shape[0], "height": output_shape[1], "width": output_shape[2]},
        "peak_memory_bytes": peak_memory_bytes,
        "estimated_memory_bytes": request.estimated_memory_bytes,
        "node": socket.gethostname(),
        "written_at": time.time(),
        "postprocess": postprocess,
        # The LoRA adapters that ran, with the sha256 of their weights.
        "adapters": without_server_paths(list(adapters)),
    }
