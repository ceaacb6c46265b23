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

from farm.cli.batch import batch_command
from farm.config import load_config

app = typer.Typer(help="farm: a render farm for AI video generation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Served models and the tiny random-weight ones.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their API keys (talks to the store directly).", no_args_is_help=True)
engines_app = typer.Typer(help="Optimized engine builds (ONNX, compile, FP8).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(engines_app, name="engines")
app.add_typer(tenants_app, name="tenants")
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", envvar="FARM_CONFIG", help="farm YAML config file.")
TargetOption = typer.Option("127.0.0.1:50051", "--target", envvar="FARM_TARGET", help="Gateway address.")
KeyOption = typer.Option(None, "--api-key", envvar="FARM_API_KEY", help="API key (default: the default tenant's).")
TASKS = {"t2v": "text-to-video", "i2v": "image-to-video", "text-to-video": "text-to-video",
         "image-to-video": "image-to-video"}


# How the commands that talk to the gateway reach it: TLS options of `farm` itself (they
# come before the command, as docker's do: `farm --tls-ca ca.pem list`) or their variables.
_tls: dict = {}


@app.callback()
def _options(
    tls: bool = typer.Option(False, "--tls", envvar="FARM_TLS",
                             help="Speak TLS to the gateway, checking its certificate against the system's roots "
                                  "(the --tls-* options imply it)."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", envvar="FARM_TLS_CA",
                                          help="PEM CA certificates to check the gateway's certificate against."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", envvar="FARM_TLS_CERT",
                                            help="Client certificate chain (PEM), for a gateway with mutual TLS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", envvar="FARM_TLS_KEY",
                                           help="Private key (PEM) of --tls-cert."),
    tls_server_name: Optional[str] = typer.Option(None, "--tls-server-name", envvar="FARM_TLS_SERVER_NAME",
                                                  help="Name to expect in the gateway's certificate, where the "
                                                       "target's host is not in it (an address, say)."),
):
    _tls.clear()
    _tls.update(tls=tls, tls_ca_file=tls_ca, tls_cert_file=tls_cert, tls_key_file=tls_key,
                tls_server_name=tls_server_name)


def _client(target: str, api_key: Optional[str], config_path: Optional[Path] = None):
    from farm.client import FarmClient, find_api_key

    home = load_config(config_path).home if api_key is None else None
    if (_tls.get("tls_cert_file") is None) != (_tls.get("tls_key_file") is None):
        raise typer.BadParameter("--tls-cert and --tls-key (FARM_TLS_CERT, FARM_TLS_KEY) go together")
    return FarmClient(target, api_key or find_api_key(home), **_tls)


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
    from farm.cli.embedded import run_embedded

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
    from farm.cli.demo import run_demo

    raise typer.Exit(run_demo(load_config(config_path), output_dir, console, dict(_tls)))


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
    adapter: list[str] = typer.Option([], help="LoRA adapter name[=weight], repeatable (see `farm models list`)."),
    motion_bucket: Optional[int] = typer.Option(None, "--motion-bucket", help="Motion amount (image-only models)."),
    noise_aug: Optional[float] = typer.Option(None, "--noise-aug", help="Noise on the image (image-only models)."),
    decode_chunk: Optional[int] = typer.Option(None, "--decode-chunk", help="Frames decoded at once."),
    wait: bool = typer.Option(True, help="Follow the render and save its MP4."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="MP4 path (default ./<render id>.mp4)."),
    target: str = TargetOption, api_key: Optional[str] = KeyOption, config_path: Optional[Path] = ConfigOption,
):
    """Submit a render; by default follow its progress and save the MP4."""
    from farm.api.convert import TASK_TO_PB
    from farm.cli.progress import follow_renders
    from farm.config import Task
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
    for item in adapter:
        name, _, weight = item.partition("=")
        try:
            spec.adapters.add(name=name, **({"weight": float(weight)} if weight else {}))
        except ValueError:
            raise typer.BadParameter(f"--adapter {item!r}: the weight after '=' must be a number") from None
    for field, value in (("motion_bucket_id", motion_bucket), ("noise_aug_strength", noise_aug),
                         ("decode_chunk_size", decode_chunk)):
        if value is not None:
            setattr(spec.motion, field, value)
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
            client.download(render.id, path)
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
    from farm.cli.progress import follow_renders

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


# One shard of a manifest of renders, as a pod of a Kubernetes Indexed Job runs it.
app.command("batch")(batch_command(_client))


@models_app.command("list")
def models_list(target: str = TargetOption, api_key: Optional[str] = KeyOption):
    """Models the farm serves, their limits and whether a pool is up."""
    from farm.v1 import render_pb2 as pb

    with _client(target, api_key) as client:
        response = client.models()
    table = Table("model", "family", "tasks", "ready", "device", "sizes", "frames", "steps", "defaults", "adapters")
    for m in response.models:
        tasks = ", ".join(pb.Task.Name(t).removeprefix("TASK_").lower() for t in m.tasks)
        if m.audio:
            tasks += " (with audio)"
        lim, d = m.limits, m.defaults
        table.add_row(m.name, m.family, tasks, "yes" if m.ready else "no", m.device_kind,
                      f"x{lim.size_multiple}, {lim.min_size} up to {lim.max_width}x{lim.max_height}",
                      f"{lim.frame_step}k+1, {lim.min_frames}..{lim.max_frames}",
                      f"{lim.min_steps}..{lim.max_steps}",
                      f"{d.width}x{d.height} {d.num_frames}f {d.num_inference_steps} steps",
                      ", ".join(a.name for a in m.adapters) or "-")
    console.print(table)


def calibration_spec(model_config, fields: dict, seed: int, prompt: str):
    """One calibration render of a model: text-to-video where it serves it, else its first
    task (with a first frame to animate); no text for a family that takes none."""
    from farm.api.convert import TASK_TO_PB
    from farm.cli.demo import first_frame_png
    from farm.config import Task
    from farm.families import family_facts
    from farm.v1 import render_pb2 as pb

    task = Task.TEXT_TO_VIDEO if Task.TEXT_TO_VIDEO in model_config.tasks else model_config.tasks[0]
    spec = pb.RenderSpec(model=model_config.name, task=TASK_TO_PB[task], seed=seed,
                         prompt=prompt if family_facts(model_config.family).uses_prompt else "", **fields)
    if task == Task.IMAGE_TO_VIDEO:
        spec.image = first_frame_png(spec.width or model_config.defaults.width,
                                     spec.height or model_config.defaults.height)
    return spec


@models_app.command("make-tiny")
def models_make_tiny(config_path: Optional[Path] = ConfigOption,
                     force: bool = typer.Option(False, help="Rewrite models that exist.")):
    """Write every family's tiny random-weight pipelines under $FARM_HOME/models."""
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


def _store(config_path: Optional[Path]):
    from farm.jobs.store import JobStore

    config = load_config(config_path)
    config.home.mkdir(parents=True, exist_ok=True)
    return config, JobStore(config.store_url)


@tenants_app.command("list")
def tenants_list(config_path: Optional[Path] = ConfigOption):
    """Tenants, their active key ids, limits and budgets."""
    _, store = _store(config_path)
    table = Table("tenant", "weight", "keys", "max running", "max queued", "budget", "left")
    for tenant in store.list_tenants():
        budget = left = "-"
        if tenant.budget_nanodollars is not None:
            status = store.budget_status(tenant.id)
            budget = f"${tenant.budget_nanodollars / 1e9:,.2f}/{tenant.budget_period}"
            left = f"${status.left_nanodollars / 1e9:,.6f}"
        table.add_row(tenant.name, f"{tenant.weight:g}", " ".join(tenant.key_ids) or "-",
                      str(tenant.max_running or "-"), str(tenant.max_queued or "-"), budget, left)
    console.print(table)


@tenants_app.command("rotate-key")
def tenants_rotate_key(name: str, config_path: Optional[Path] = ConfigOption):
    """Issue a new key (printed once) and revoke the tenant's older keys."""
    _, store = _store(config_path)
    key = store.rotate_key(name)
    console.print(f"new API key for {name}, shown once; older keys are revoked:", style="bold")
    print(key)


@tenants_app.command("revoke-key")
def tenants_revoke_key(key_id: str = typer.Argument(..., help="The 12 hex characters after farm_ (see list)."),
                       config_path: Optional[Path] = ConfigOption):
    """Revoke one key at once: its next request is UNAUTHENTICATED."""
    _, store = _store(config_path)
    store.revoke_key(key_id)
    console.print(f"revoked {key_id}")


@tenants_app.command("set-budget")
def tenants_set_budget(name: str, dollars: Optional[float] = typer.Argument(None, help="Omit to remove the budget."),
                       period: str = typer.Option("month", help="day or month (UTC)."),
                       config_path: Optional[Path] = ConfigOption):
    """Limit what a tenant may spend per day or month; submits beyond it are refused."""
    _, store = _store(config_path)
    tenant = store.set_budget(name, dollars, period)
    console.print(f"{tenant.name}: budget " + (f"${dollars:,.2f} per {period}" if dollars is not None else "removed"))


@tenants_app.command("set-limits")
def tenants_set_limits(name: str,
                       max_running: Optional[int] = typer.Option(None, help="Renders on engines at once; 0 removes."),
                       max_queued: Optional[int] = typer.Option(None, help="Renders waiting; 0 removes."),
                       weight: Optional[float] = typer.Option(None, help="Fair-share weight."),
                       config_path: Optional[Path] = ConfigOption):
    """Set a tenant's concurrency limits and fair-share weight."""
    _, store = _store(config_path)
    t = store.set_limits(name, max_running=max_running, max_queued=max_queued, weight=weight)
    console.print(f"{t.name}: max running {t.max_running or '-'}, max queued {t.max_queued or '-'}, weight {t.weight:g}")


store_app = typer.Typer(help="The job store itself (talks to the store directly).", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("prune")
def store_prune(
    events_older_than: Optional[str] = typer.Option(
        None, help="Delete events older than this (e.g. 30d, 12h) of renders that ended, all but each "
                   "render's final one; 'never' keeps them (default: store.event_retention_days)."),
    images_older_than: Optional[str] = typer.Option(
        None, help="Drop the input images of renders that ended longer ago than this; 'never' keeps them "
                   "(default: store.image_retention_days)."),
    config_path: Optional[Path] = ConfigOption,
):
    """Prune old events and input images of renders that ended long ago, now; renders and ledger stay."""
    import re

    from farm.jobs.schema import utcnow

    def days(option: str, text: Optional[str], default: Optional[float]) -> Optional[float]:
        if text is None:
            return default
        if text.strip().lower() == "never":
            return None
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dh])\s*", text.lower())
        if not match or float(match[1]) <= 0:
            raise typer.BadParameter(f"{text[:32]!r} is not a positive number of days or hours (e.g. 30d, 12h) "
                                     "or 'never'", param_hint=option)
        return float(match[1]) / (24 if match[2] == "h" else 1)

    config, store = _store(config_path)
    event_days = days("--events-older-than", events_older_than, config.store.event_retention_days)
    image_days = days("--images-older-than", images_older_than, config.store.image_retention_days)
    pruned = store.prune(utcnow(), event_days, image_days)
    console.print(f"deleted {pruned.events} events and {pruned.images} images of renders that ended long ago")


@app.command()
def usage(
    tenant: Optional[str] = typer.Option(None, help="Any tenant (reads the store); default: yours, over gRPC."),
    since: str = typer.Option(..., help="ISO date or time, UTC, inclusive."),
    until: Optional[str] = typer.Option(None, help="ISO date or time, UTC, exclusive (default: now)."),
    by: str = typer.Option("model", help="model, device, day or phase."),
    output_format: str = typer.Option("table", "--format", help="table, csv or json."),
    target: str = TargetOption, api_key: Optional[str] = KeyOption, config_path: Optional[Path] = ConfigOption,
):
    """What a tenant was charged, from the ledger."""
    import csv
    import datetime as dt

    from farm.domain.errors import invalid

    def parse(value: str, field: str) -> dt.datetime:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise invalid(field, f"{value!r} is not an ISO date or time") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)

    if output_format not in ("table", "csv", "json"):
        raise invalid("format", f"{output_format!r} is not one of table, csv, json")
    if by not in ("model", "device", "day", "phase"):
        raise invalid("by", f"{by!r} is not one of model, device, day, phase")
    start = parse(since, "since")
    end = parse(until, "until") if until else dt.datetime.now(dt.timezone.utc)
    if tenant:
        _, store = _store(config_path)
        rows = [(r.key, r.renders, r.device_seconds, r.nanodollars)
                for r in store.usage(store.tenant(tenant).id, start, end, by)]
    else:
        from google.protobuf.timestamp_pb2 import Timestamp

        from farm.v1 import render_pb2 as pb

        request = pb.GetUsageRequest(group_by=pb.UsageGrouping.Value(f"USAGE_GROUPING_{by.upper()}"))
        for field, moment in (("since", start), ("until", end)):
            stamp = Timestamp()
            stamp.FromDatetime(moment)
            getattr(request, field).CopyFrom(stamp)
        with _client(target, api_key, config_path) as client:
            report = client.stub.GetUsage(request, metadata=client.metadata, timeout=60)
        rows = [(r.key, r.renders, r.device_seconds, r.nanodollars) for r in report.rows]
    total = sum(r[3] for r in rows)
    if output_format == "json":
        print(json.dumps({"rows": [{"key": k, "renders": n, "device_seconds": s, "dollars": d / 1e9}
                                   for k, n, s, d in rows], "total_dollars": total / 1e9}, indent=2))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow([by, "renders", "device_seconds", "dollars"])
        for key, renders, seconds, money in rows:
            writer.writerow([key, renders, f"{seconds:.6f}", f"{money / 1e9:.9f}"])
    else:
        table = Table(by, "renders", "device-seconds", "dollars")
        for key, renders, seconds, money in rows:
            table.add_row(key, str(renders), f"{seconds:,.3f}", f"${money / 1e9:,.6f}")
        table.add_row("total", "", "", f"${total / 1e9:,.6f}", style="bold")
        console.print(table)


@app.command()
def calibrate(model: str = typer.Option(..., "--model", "-m"),
              renders: int = typer.Option(24, help="Calibration renders to run first, plus 10 that ask for "
                                                        "post-processing (0: fit what is recorded)."),
              max_size: int = typer.Option(768, help="Largest width/height in the grid."),
              target: str = TargetOption, api_key: Optional[str] = KeyOption,
              config_path: Optional[Path] = ConfigOption):
    """Measure a grid of renders on the farm, fit the model's timing model, store it."""
    from farm.jobs.estimates import fit_and_store
    from farm.planning.calibrate import calibration_specs, postprocess_calibration_specs
    from farm.v1 import render_pb2 as pb

    config, store = _store(config_path)
    model_config = config.model(model)
    if model_config is None:
        raise typer.BadParameter(f"unknown model {model!r}")
    with _client(target, api_key, config_path) as client:
        info = {m.name: m for m in client.models().models}[model]
        # The grid, then a few renders asking for interpolation, upscaling and colour
        # matching, so that their costs are measured too.
        grid = calibration_specs(model_config, renders, max_size=max_size)
        if renders:
            grid += postprocess_calibration_specs(model_config, max_size=max_size)
        # One at a time: a render queued behind another shares the cores with its
        # post-processing, and would be timed slower than it runs alone.
        for index, fields in enumerate(grid):
            spec = calibration_spec(model_config, fields, index, "calibration")
            render_id = client.submit(spec).id
            if client.wait(render_id).state != pb.RENDER_STATE_SUCCEEDED:
                console.print(f"calibration render {render_id} did not succeed", style="red")
    timing = fit_and_store(store, model_config, info.device_kind, chunk_frames=config.postproc.chunk_frames)
    console.print(f"{model} on {info.device_kind}: fitted from {timing.samples} renders")
    console.print_json(json.dumps(timing.to_json()))


@engines_app.command("build")
def engines_build(model: str = typer.Option(..., "--model", "-m"),
                  backend: str = typer.Option(..., help="eager, compile, fp8 or onnx."),
                  shape: list[str] = typer.Option(..., help="WIDTHxHEIGHTxFRAMES, repeatable."),
                  no_guidance: bool = typer.Option(False, help="Build for guidance_scale <= 1 (batch 1)."),
                  force: bool = typer.Option(False, help="Rebuild even if the cache has it."),
                  config_path: Optional[Path] = ConfigOption):
    """Export or compile a model's transformer ahead of time into the engine cache."""
    from farm.domain.errors import invalid
    from farm.engines.backends.shapes import parse_shape
    from farm.engines.build import build_engine

    config = load_config(config_path)
    model_config = config.model(model)
    if model_config is None:
        raise invalid("model", f"unknown model {model!r}")
    from pydantic import ValidationError

    from farm.config import BackendConfig

    try:
        chosen = BackendConfig.model_validate({**model_config.backend.model_dump(), "name": backend})
    except ValidationError as error:
        raise invalid("backend", error.errors()[0]["msg"]) from None
    model_config = model_config.model_copy(update={"backend": chosen})
    for text in shape:
        try:
            bucket = parse_shape(text, batch=1 if no_guidance else 2)
        except ValueError as error:
            raise invalid("shape", str(error)) from None
        path = build_engine(model_config, bucket, force=force)
        console.print(f"{model} {backend} {text}: {path}")


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
    from farm.domain.errors import FarmError

    try:
        app()
    except FarmError as error:
        console.print(f"error: {error.message}", style="red")
        sys.exit(2)
    except Exception as error:
        import grpc

        from farm.client.errors import FarmError as ErrorAnswer
        from farm.client.errors import NoApiKey

        if isinstance(error, NoApiKey):
            console.print(f"error: {error}", style="red", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(error, grpc.RpcError):
            # The gateway's answer, one line each: the code and message, each bad field and
            # its limit, each quota that ran out, how long to wait.
            for index, line in enumerate(ErrorAnswer.from_call(error).explain()):
                console.print(("error: " if index == 0 else "") + line, style="red", markup=False,
                              highlight=False, soft_wrap=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
