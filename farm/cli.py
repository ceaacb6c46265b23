"""The `farm` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from farm.config import load_config

app = typer.Typer(help="farm: a render farm for AI video generation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Served models and the tiny random-weight ones.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their API keys (talks to the store directly).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(tenants_app, name="tenants")
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", envvar="FARM_CONFIG", help="farm YAML config file.")
TargetOption = typer.Option("127.0.0.1:50051", "--target", envvar="FARM_TARGET", help="Gateway address.")
KeyOption = typer.Option(None, "--api-key", envvar="FARM_API_KEY", help="API key (default: the default tenant's).")
TASKS = {"t2v": "text-to-video", "i2v": "image-to-video", "text-to-video": "text-to-video",
         "image-to-video": "image-to-video"}


def _client(target: str, api_key: Optional[str], config_path: Optional[Path] = None):
    from farm.client import FarmClient, find_api_key

    home = load_config(config_path).home if api_key is None else None
    return FarmClient(target, api_key or find_api_key(home))


def _logging(config) -> None:
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(config.logs_dir / "farm.log")],
    )


@app.command()
def serve(config_path: Optional[Path] = ConfigOption,
          ready_file: Optional[Path] = typer.Option(None, help="Write the gateway's port here once it serves.")):
    """Run the whole farm here: Ray Serve application and gateway."""
    from farm.embedded import run_embedded

    config = load_config(config_path)
    _logging(config)
    run_embedded(config, ready_file)


@app.command()
def gateway(config_path: Optional[Path] = ConfigOption,
            ready_file: Optional[Path] = typer.Option(None, help="Write the gateway's port here once it serves.")):
    """Run only the gateway (the job plane); engines run elsewhere."""
    import asyncio

    from farm.api.server import run_gateway

    config = load_config(config_path)
    _logging(config)
    asyncio.run(run_gateway(config, ready_file))


@app.command()
def demo(config_path: Optional[Path] = ConfigOption,
         output_dir: Optional[Path] = typer.Option(None, help="Where the MP4s go (default $FARM_HOME/demo).")):
    """Start farm on its embedded defaults, render with both model families, stop."""
    from farm.demo import run_demo

    raise typer.Exit(run_demo(load_config(config_path), output_dir, console))


@app.command()
def submit(
    prompt: str = typer.Argument(..., help="What to render."),
    model: str = typer.Option("ltx-video-tiny", "--model", "-m"),
    task: str = typer.Option("t2v", help="t2v (text-to-video) or i2v (image-to-video)."),
    image: Optional[Path] = typer.Option(None, help="First frame for image-to-video (PNG or JPEG)."),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    width: int = typer.Option(0, help="0: the model's default (so are the others)."), height: int = 0,
    frames: int = typer.Option(0, "--frames"), fps: int = 0,
    steps: int = typer.Option(0, "--steps"), guidance: Optional[float] = typer.Option(None, "--guidance"),
    seed: Optional[int] = None, priority: Optional[int] = None,
    label: list[str] = typer.Option([], help="key=value, repeatable."),
    idempotency_key: str = typer.Option("", "--idempotency-key"),
    wait: bool = typer.Option(True, help="Follow the render and save its MP4."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="MP4 path (default ./<render id>.mp4)."),
    target: str = TargetOption, api_key: Optional[str] = KeyOption, config_path: Optional[Path] = ConfigOption,
):
    """Submit a render; by default follow its progress and save the MP4."""
    from farm.api.convert import TASK_TO_PB
    from farm.config import Task
    from farm.progress import follow_renders
    from farm.v1 import render_pb2 as pb

    if task not in TASKS:
        raise typer.BadParameter(f"--task must be one of {sorted(TASKS)}")
    labels = dict(item.split("=", 1) for item in label)
    spec = pb.RenderSpec(
        model=model, task=TASK_TO_PB[Task(TASKS[task])], prompt=prompt, negative_prompt=negative_prompt,
        image=image.read_bytes() if image else b"", labels=labels, idempotency_key=idempotency_key,
    )
    # 0 on the command line means "the model's default": leave the field unset.
    for field, value in (("width", width), ("height", height), ("num_frames", frames), ("fps", fps),
                         ("num_inference_steps", steps)):
        if value:
            setattr(spec, field, value)
    if guidance is not None:
        spec.guidance_scale = guidance
    if seed is not None:
        spec.seed = seed
    if priority is not None:
        spec.priority = priority
    with _client(target, api_key, config_path) as client:
        render = client.submit(spec)
        console.print(f"submitted [bold]{render.id}[/bold] (seed {render.seed})")
        if not wait:
            return
        follow_renders(client, {render.id: f"{model} {task}"}, console)
        final = client.get(render.id)
        _print_render(final)
        if final.state == pb.RENDER_STATE_SUCCEEDED:
            path = output or Path(f"{render.id}.mp4")
            path.write_bytes(client.fetch(render.id))
            console.print(f"saved {path}")
        else:
            raise typer.Exit(1)


@app.command()
def get(render_id: str, target: str = TargetOption, api_key: Optional[str] = KeyOption,
        as_json: bool = typer.Option(False, "--json")):
    """Show a render."""
    from google.protobuf.json_format import MessageToDict

    with _client(target, api_key) as client:
        render = client.get(render_id)
    if as_json:
        console.print_json(json.dumps(MessageToDict(render)))
    else:
        _print_render(render)


@app.command()
def watch(render_id: str, target: str = TargetOption, api_key: Optional[str] = KeyOption):
    """Follow a render's progress until it ends."""
    from farm.progress import follow_renders

    with _client(target, api_key) as client:
        follow_renders(client, {render_id: render_id}, console)
        _print_render(client.get(render_id))


@app.command()
def cancel(render_id: str, target: str = TargetOption, api_key: Optional[str] = KeyOption):
    """Cancel a queued or running render."""
    with _client(target, api_key) as client:
        _print_render(client.cancel(render_id))


@app.command("list")
def list_renders(target: str = TargetOption, api_key: Optional[str] = KeyOption,
                 limit: int = typer.Option(20, help="How many, newest first.")):
    """List your renders."""
    from farm.v1 import render_pb2 as pb

    with _client(target, api_key) as client:
        response = client.list(page_size=limit)
    table = Table("id", "model", "task", "state", "stage", "step", "cost $", "created")
    for r in response.renders:
        table.add_row(r.id, r.spec.model, pb.Task.Name(r.spec.task).removeprefix("TASK_").lower(),
                      pb.RenderState.Name(r.state).removeprefix("RENDER_STATE_"),
                      pb.Stage.Name(r.stage).removeprefix("STAGE_"), f"{r.step}/{r.total_steps}",
                      f"{r.cost.total_dollars:.6f}", r.created_at.ToDatetime().isoformat(timespec="seconds"))
    console.print(table)


@models_app.command("list")
def models_list(target: str = TargetOption, api_key: Optional[str] = KeyOption):
    """Models the farm serves, their limits and whether a pool is up."""
    from farm.v1 import render_pb2 as pb

    with _client(target, api_key) as client:
        response = client.models()
    table = Table("model", "family", "tasks", "ready", "device", "sizes", "frames", "defaults")
    for m in response.models:
        tasks = ", ".join(pb.Task.Name(t).removeprefix("TASK_").lower() for t in m.tasks)
        lim, d = m.limits, m.defaults
        table.add_row(m.name, m.family, tasks, "yes" if m.ready else "no", m.device_kind,
                      f"x{lim.size_multiple} up to {lim.max_width}x{lim.max_height}",
                      f"{lim.frame_step}k+1, {lim.min_frames}..{lim.max_frames}",
                      f"{d.width}x{d.height} {d.num_frames}f {d.num_inference_steps} steps")
    console.print(table)


@models_app.command("make-tiny")
def models_make_tiny(config_path: Optional[Path] = ConfigOption,
                     force: bool = typer.Option(False, help="Rewrite models that exist.")):
    """Write the tiny random-weight LTX-Video and CogVideoX pipelines under $FARM_HOME/models."""
    from farm.engines.tiny import make_tiny_models

    config = load_config(config_path)
    for path in make_tiny_models(config.models_dir, force=force):
        console.print(f"wrote {path}")


@tenants_app.command("create")
def tenants_create(name: str, config_path: Optional[Path] = ConfigOption,
                   weight: float = typer.Option(1.0, help="Fair-share weight.")):
    """Create a tenant; its API key is printed once and never stored."""
    from farm.jobs.store import JobStore

    config = load_config(config_path)
    config.home.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.store_url)
    tenant, key = store.create_tenant(name, weight)
    console.print(f"tenant {tenant.name} ({tenant.id}); API key, shown once:", style="bold")
    print(key)


def _print_render(render) -> None:
    from farm.v1 import render_pb2 as pb

    state = pb.RenderState.Name(render.state).removeprefix("RENDER_STATE_")
    console.print(f"[bold]{render.id}[/bold] {render.spec.model} {state} attempt {render.attempt} "
                  f"cost ${render.cost.total_dollars:.6f}")
    for phase in render.cost.phases:
        console.print(f"  {phase.phase:<16} {phase.device_kind:<5} {phase.device_seconds:8.3f} s  ${phase.dollars:.6f}")
    if render.artifact_uri:
        console.print(f"  artifact {render.artifact_uri}")
    if render.error:
        console.print(f"  error: {render.error}", style="red")


def main() -> None:
    from farm.errors import FarmError

    try:
        app()
    except FarmError as error:
        console.print(f"error: {error.message}", style="red")
        sys.exit(2)
    except Exception as error:
        import grpc

        if isinstance(error, grpc.RpcError):
            console.print(f"error: {error.code().name}: {error.details()}", style="red")
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
