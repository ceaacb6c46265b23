"""The render path end to end: gRPC on loopback -> store -> Ray Serve engines ->
MP4 artifacts, with the tiny random-weight pipelines loaded through from_pretrained."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import pytest

from farm.cli.demo import first_frame_png
from farm.families import tiny_models
from farm.postproc.encode import probe_mp4
from farm.serve.flags import hold_next_render
from farm.v1 import render_pb2 as pb

T2V, I2V = pb.TASK_TEXT_TO_VIDEO, pb.TASK_IMAGE_TO_VIDEO
CASES = [
    ("ltx-video-tiny", T2V, 256, 192, 17, 24),
    ("ltx-video-tiny", I2V, 192, 128, 9, 12),
    ("cogvideox-tiny", T2V, 160, 96, 17, 8),
    ("cogvideox-tiny", I2V, 128, 96, 9, 10),
]


def small_spec(model="ltx-video-tiny", task=T2V, width=128, height=96, frames=9, fps=8, steps=3, seed=1234,
               **extra):
    spec = pb.RenderSpec(model=model, task=task, prompt="a paper boat drifting on a pond", width=width,
                         height=height, num_frames=frames, fps=fps, num_inference_steps=steps, seed=seed, **extra)
    if task == I2V and not spec.image:
        spec.image = first_frame_png(width, height)
    return spec


@pytest.mark.parametrize("model,task,width,height,frames,fps", CASES)
def test_renders_an_mp4_of_the_requested_shape(client, farm_config, model, task, width, height, frames, fps):
    render = client.submit(small_spec(model, task, width, height, frames, fps, steps=4))
    assert render.state == pb.RENDER_STATE_QUEUED and render.attempt == 1
    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error

    video = probe_mp4(client.fetch(render.id))
    assert (video["codec"], video["frames"], video["width"], video["height"]) == ("h264", frames, width, height)
    assert video["fps"] == pytest.approx(fps)
    assert video["duration_s"] == pytest.approx(frames / fps, abs=1 / fps)

    manifest = json.loads(client.fetch(render.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    assert manifest["seed"] == 1234 and manifest["spec"]["num_frames"] == frames
    # Clients see no path of the farm's disks: not its artifacts, not its model directories.
    assert (final.artifact_uri, final.manifest_uri) == (f"farm://renders/{render.id}/video",
                                                        f"farm://renders/{render.id}/manifest")
    assert str(farm_config[0].home) not in json.dumps(manifest)
    assert len(manifest["model"]["weights_sha256"]) == 64
    assert {"ENCODING_PROMPT", "DENOISING", "DECODING", "ENCODING"} <= {t["phase"] for t in manifest["timings"]}
    assert "torch" in json.dumps(manifest["model"])
    # The gateway's GPU-memory estimate rides along, beside the peak measured on CUDA only.
    assert manifest["estimated_memory_bytes"] > 0 and manifest["peak_memory_bytes"] is None

    phases = {p.phase: p for p in final.cost.phases}
    assert phases["DENOISING"].device_seconds > 0 and phases["DENOISING"].device_kind == "CPU"
    assert final.cost.total_dollars == pytest.approx(sum(p.dollars for p in final.cost.phases))
    assert final.cost.total_dollars > 0


def test_same_seed_same_video(client):
    first = client.wait(client.submit(small_spec(steps=2)).id)
    second = client.wait(client.submit(small_spec(steps=2)).id)
    assert (probe_mp4(client.fetch(first.id))["pixels"] == probe_mp4(client.fetch(second.id))["pixels"]).all()


def test_watch_reports_every_denoising_step_in_order(client):
    render = client.submit(small_spec(steps=6))
    events = list(client.watch(render.id, timeout=300))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    steps = [e.step for e in events if e.stage == pb.STAGE_DENOISING and e.step]
    assert steps == [1, 2, 3, 4, 5, 6]
    stages = [e.stage for e in events]
    assert stages.index(pb.STAGE_ENCODING_PROMPT) < stages.index(pb.STAGE_DENOISING) < stages.index(pb.STAGE_DECODING)
    assert events[-1].state == pb.RENDER_STATE_SUCCEEDED


def test_cancel_mid_denoise_stops_before_decoding(client, farm_config, holds):
    config, _ = farm_config
    hold_next_render("ltx-video-tiny", step=2)  # it waits after step 2 until cancelled
    render = client.submit(small_spec(steps=6))
    seen = []
    for event in client.watch(render.id, timeout=300):
        seen.append(event)
        if event.stage == pb.STAGE_DENOISING and event.step == 2 and not client.get(render.id).cancel_requested:
            client.cancel(render.id)
    final = client.get(render.id)
    assert final.state == pb.RENDER_STATE_CANCELLED
    assert seen[-1].state == pb.RENDER_STATE_CANCELLED
    assert final.step == 2
    assert pb.STAGE_DECODING not in {e.stage for e in seen}
    assert not final.artifact_uri
    assert not (Path(config.artifacts_url) / "renders" / render.id).exists()
    # Work done before the cancel is charged: prompt encoding and the steps that ran.
    assert {"DENOISING"} <= {p.phase for p in final.cost.phases}
    with pytest.raises(grpc.RpcError) as error:
        client.cancel(render.id)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as error:
        client.fetch(render.id)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_same_idempotency_key_returns_the_same_render(client):
    spec = small_spec(idempotency_key="nightly-batch-17")
    first, again = client.submit(spec), client.submit(spec)
    assert first.id == again.id
    spec.prompt = "a different prompt"
    with pytest.raises(grpc.RpcError) as error:
        client.submit(spec)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert client.wait(first.id).state == pb.RENDER_STATE_SUCCEEDED


def test_models_are_listed_ready_with_their_limits(client):
    models = {m.name: m for m in client.models().models}
    assert set(models) == {tiny.name for _, tiny in tiny_models()}  # every family's tiny model
    for model in models.values():
        assert model.ready and model.device_kind == "CPU"
    assert set(models["ltx-video-tiny"].tasks) == {T2V, I2V} and set(models["wan-tiny"].tasks) == {T2V, I2V}
    assert set(models["stable-video-diffusion-tiny"].tasks) == {I2V}
    assert not models["stable-video-diffusion-tiny"].uses_prompt and models["wan-tiny"].uses_prompt
    assert models["ltx-2-tiny"].audio and not models["wan-tiny"].audio
    assert models["ltx-video-tiny"].limits.frame_step == 8
    assert models["cogvideox-tiny"].limits.size_multiple == 16
    assert models["wan-tiny"].limits.frame_step == 4 and models["wan-tiny"].limits.max_adapters == 4


def test_estimate_is_positive_and_grows_with_steps(client):
    small = client.estimate(small_spec(steps=2))
    large = client.estimate(small_spec(steps=40))
    assert 0 < small.dollars < large.dollars and small.device_kind == "CPU"


def test_metrics_are_scraped_over_http(client, farm_config):
    config, _ = farm_config
    client.wait(client.submit(small_spec(steps=2)).id)

    def scrape(port):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    gateway = scrape(config.gateway.metrics_port)
    assert 'farm_gateway_requests_total{code="OK",method="SubmitRender"}' in gateway
    assert "farm_renders_submitted_total" in gateway
    serve = scrape(config.scheduler.metrics_port)
    for name in ('farm_renders_finished_total{model="ltx-video-tiny",state="SUCCEEDED"}',
                 "farm_queue_wait_seconds_bucket", "farm_render_duration_seconds_bucket",
                 "farm_denoising_step_duration_seconds_bucket", "farm_frames_generated_total",
                 "farm_cost_dollars_total", "farm_device_seconds_total"):
        assert name in serve, name
    assert "prompt" not in serve and "render_id" not in serve
