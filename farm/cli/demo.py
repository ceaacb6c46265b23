"""The main job: farm on its embedded defaults, with renders submitted through it.

Starts `farm serve` in a child process, waits until its health service says
SERVING, submits one render of every task of every served model (each family's tiny
one) through the gRPC API, follows them with progress bars, saves the MP4s, prints what
each cost, and stops the farm."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from farm.config import FarmConfig

STARTUP_TIMEOUT_S = 600
PROMPTS = {
    "text-to-video": "a red fox running through fresh snow at sunrise, cinematic",
    "image-to-video": "the scene slowly comes alive, gentle camera push-in",
}


def first_frame_png(width: int = 256, height: int = 256) -> bytes:
    """A synthetic conditioning image: a gradient sky with a sun."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([30, 60, 140]) * (1 - y) + np.array([250, 170, 90]) * y).astype(np.uint8)
    picture = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).copy())
    ImageDraw.Draw(picture).ellipse((width * 0.35, height * 0.45, width * 0.65, height * 0.75), fill=(255, 230, 120))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def demo_client_options(config: FarmConfig, given: dict | None = None) -> dict:
    """How the demo's client reaches the gateway it starts: as `farm` was told (its
    --tls-* options), else plaintext to a plaintext gateway, or TLS trusting the gateway's
    own certificate file (a self-signed one; for one a CA issued, pass --tls-ca). A gateway
    that asks clients for certificates needs --tls-cert and --tls-key."""
    if given and any(given.values()):
        return dict(given)
    gateway = config.gateway
    if gateway.tls_cert_file is None:
        return {}
    if gateway.tls_client_ca_file is not None:
        raise SystemExit("the gateway asks clients for a certificate (gateway.tls_client_ca_file): "
                         "run `farm --tls-ca CA --tls-cert CERT --tls-key KEY demo`")
    return {"tls": True, "tls_ca_file": gateway.tls_cert_file}


def run_demo(config: FarmConfig, output_dir: Path | None, console: Console, client_options: dict | None = None) -> int:
    """client_options: how to reach the gateway (`demo_client_options`)."""
    from farm.client import FarmClient, find_api_key
    from farm.cli.progress import follow_renders
    from farm.v1 import render_pb2 as pb

    output_dir = output_dir or config.home / "demo"
    output_dir.mkdir(parents=True, exist_ok=True)
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.logs_dir / "serve.log"
    ready_file = config.home / "gateway.ready"
    ready_file.unlink(missing_ok=True)
    tls = demo_client_options(config, client_options)
    console.print(f"starting farm (FARM_HOME={config.home}; log: {log_path})")
    env = dict(os.environ, FARM_HOME=str(config.home))
    with open(log_path, "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "farm", "serve", "--ready-file", str(ready_file)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        target = f"{config.gateway.host}:{_wait_until_serving(server, ready_file, config, console, tls)}"
        with FarmClient(target, find_api_key(config.home), **tls) as client:
            models = {m.name: m for m in client.models().models}
            jobs = []
            for model in models.values():
                for task in model.tasks:
                    # Image-only models take no prompt.
                    prompt = PROMPTS[_task(task)] if model.uses_prompt else ""
                    spec = pb.RenderSpec(model=model.name, task=task, prompt=prompt,
                                         seed=42, idempotency_key=f"demo-{model.name}-{task}-{time.time_ns()}")
                    if task == pb.TASK_IMAGE_TO_VIDEO:
                        spec.image = first_frame_png(model.defaults.width, model.defaults.height)
                    render = client.submit(spec)
                    jobs.append((render.id, model.name, _task(task)))
            console.print(f"submitted {len(jobs)} renders")
            follow_renders(client, {rid: f"{name} {task}" for rid, name, task in jobs}, console)
            return _report(client, jobs, output_dir, console)
    finally:
        console.print("stopping farm")
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _task(value: int) -> str:
    from farm.api.convert import TASK_FROM_PB

    return TASK_FROM_PB[value].value


def _wait_until_serving(server: subprocess.Popen, ready_file: Path, config: FarmConfig, console: Console,
                        tls: dict) -> int:
    from farm.client import FarmClient

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with console.status("loading models and starting Ray Serve (about a minute on 2 cores)"):
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"farm serve exited with {server.returncode}; see {config.logs_dir / 'serve.log'}")
            if ready_file.exists():
                port = int(ready_file.read_text())
                with FarmClient(f"{config.gateway.host}:{port}", **tls) as probe:
                    if probe.is_serving():
                        return port
            time.sleep(0.5)
    raise SystemExit(f"farm did not become SERVING within {STARTUP_TIMEOUT_S} s")


def _report(client, jobs, output_dir: Path, console: Console) -> int:
    from farm.postproc.audio import probe_audio
    from farm.postproc.encode import probe_mp4
    from farm.v1 import render_pb2 as pb

    failures = 0
    for render_id, model, task in jobs:
        render = client.get(render_id)
        state = pb.RenderState.Name(render.state).removeprefix("RENDER_STATE_")
        seconds = sum(p.device_seconds for p in render.cost.phases)
        console.print(f"[bold]{model} {task}[/bold]: {state}, ${render.cost.total_dollars:.6f} "
                      f"for {seconds:.2f} device-seconds (render {render_id})")
        if render.state == pb.RENDER_STATE_SUCCEEDED:
            data = client.fetch(render_id)
            path = output_dir / f"{model}-{task}.mp4"
            path.write_bytes(data)
            info = probe_mp4(data)
            sound = probe_audio(data)
            heard = f", with {sound['codec']} sound ({sound['duration_s']:.2f} s)" if sound else ""
            console.print(f"  {path}: {info['frames']} frames, {info['width']}x{info['height']} at {info['fps']:g} fps"
                          f"{heard}")
        else:
            failures += 1
            console.print(f"  {render.error}", style="red")
    return 1 if failures else 0
