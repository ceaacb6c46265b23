"""Post-processing on the real farm: the engine fans chunks out to the post-processing
deployment (2 replicas, 8-frame chunks in the session config) and joins one MP4.
gRPC on loopback, Ray Serve, tiny random-weight LTX-Video."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest

from farm.postproc.encode import probe_mp4
from farm.serve.flags import hold_next_chunk, hold_next_render
from farm.v1 import render_pb2 as pb
from tests.gateway import bad_request_fields
from tests.holds import wait_held
from tests.integration.test_render_path import small_spec


def test_interpolated_upscaled_render_has_the_right_frames_size_rate_and_charges(client):
    post = pb.PostprocessSpec(interpolation_factor=2, upscale_factor=2,
                              encoder=pb.EncoderSettings(crf=23, preset="faster"))
    render = client.submit(small_spec(width=128, height=96, frames=17, fps=8, steps=2, postprocess=post))
    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    assert final.attempt == 1
    assert final.spec.postprocess.interpolation_factor == 2 and final.spec.postprocess.encoder.crf == 23

    video = probe_mp4(client.fetch(render.id))
    assert (video["codec"], video["frames"], video["width"], video["height"]) == ("h264", 33, 256, 192)
    assert video["fps"] == pytest.approx(16.0)
    assert video["duration_s"] == pytest.approx(33 / 16, abs=1e-3)

    assert final.HasField("quality")
    assert 0 < final.quality.temporal_consistency <= 1 and 0 < final.quality.motion_smoothness <= 1
    phases = {(p.phase, p.device_kind): p for p in final.cost.phases}
    assert phases[("POSTPROCESSING", "CPU")].device_seconds > 0 and phases[("POSTPROCESSING", "CPU")].dollars > 0
    assert phases[("ENCODING", "CPU")].device_seconds > 0
    assert final.cost.total_dollars == pytest.approx(sum(p.dollars for p in final.cost.phases))

    manifest = json.loads(client.fetch(render.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    report = manifest["postprocess"]
    assert manifest["output"] == {"frames": 33, "height": 192, "width": 256}
    assert report["output"]["fps"] == 16
    # 17 frames in chunks of 8 sharing a seam frame: 0-8, 7-15, 14-17.
    assert [c["frames_out"] for c in report["chunks"]] == [15, 14, 4]
    # Sent at once, the two long chunks ran side by side on the two replicas.
    assert report["chunks"][0]["worker"] != report["chunks"][1]["worker"]
    assert {"interpolate", "upscale", "quality", "encode"} <= set(report["stage_seconds"])
    assert len(report["color_statistics"]["mean"]) == 3


def test_every_render_gets_quality_scores(client):
    final = client.wait(client.submit(small_spec(steps=2)).id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    assert final.HasField("quality") and final.quality.temporal_consistency > 0
    assert probe_mp4(client.fetch(final.id))["frames"] == 9


def test_candidates_are_scored_and_the_best_is_kept(client):
    render = client.submit(small_spec(steps=2, seed=500, postprocess=pb.PostprocessSpec(candidates=3)))
    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    assert [c.seed for c in final.candidates] == [500, 501, 502]
    chosen = [c for c in final.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].score == max(c.score for c in final.candidates)
    assert all(c.HasField("quality") for c in final.candidates)

    steps = [e.step for e in client.watch(render.id) if e.stage == pb.STAGE_DENOISING and e.step]
    assert steps == sorted(steps) and steps[-1] == 6, steps
    assert final.total_steps == 6
    manifest = json.loads(client.fetch(render.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    assert manifest["seed"] == chosen[0].seed
    assert [c["seed"] for c in manifest["postprocess"]["candidates"]] == [500, 501, 502]


BAD_POSTPROCESS = {
    "interpolation factor": (pb.PostprocessSpec(interpolation_factor=12), "spec.postprocess.interpolation_factor",
                             "outside 2..8"),
    "target fps not a multiple": (pb.PostprocessSpec(target_fps=20), "spec.postprocess.target_fps",
                                  "whole multiple of the spec's fps (8)"),
    "upscale factor": (pb.PostprocessSpec(upscale_factor=7), "spec.postprocess.upscale_factor", "outside 2..4"),
    "crf and bitrate": (pb.PostprocessSpec(encoder=pb.EncoderSettings(crf=20, bitrate_kbps=900)),
                        "spec.postprocess.encoder.bitrate_kbps", "not both"),
    "preset": (pb.PostprocessSpec(encoder=pb.EncoderSettings(preset="warp")), "spec.postprocess.encoder.preset",
               "not an x264 preset"),
    "codec": (pb.PostprocessSpec(encoder=pb.EncoderSettings(codec="av1")), "spec.postprocess.encoder.codec",
              "codecs: h264"),
    "candidates": (pb.PostprocessSpec(candidates=20), "spec.postprocess.candidates", "outside 1..8"),
    "statistics": (pb.PostprocessSpec(color_reference=pb.ColorReference(
        statistics=pb.LabStatistics(mean=[50, 0], std=[1, 1, 1]))), "spec.postprocess.color_reference.statistics",
        "3 means and 3 stds"),
}


def test_list_models_shows_post_processing_limits(client):
    limits = {m.name: m.postprocess_limits for m in client.models().models}["ltx-video-tiny"]
    assert (limits.max_interpolation_factor, limits.max_upscale_factor, limits.max_candidates) == (8, 4, 8)
    assert limits.max_output_pixels == 3840 * 2160 and limits.max_output_fps == 120


@pytest.mark.parametrize("case", sorted(BAD_POSTPROCESS))
def test_bad_postprocess_fields_are_refused_naming_the_field(client, case):
    post, field, expected = BAD_POSTPROCESS[case]
    with pytest.raises(grpc.RpcError) as error:
        client.submit(small_spec(postprocess=post))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in bad_request_fields(error.value)[field]


def test_color_reference_by_render_id_is_resolved_at_submit(client, holds):
    reference = client.wait(client.submit(small_spec(steps=2, seed=77)).id, timeout=300)
    assert reference.state == pb.RENDER_STATE_SUCCEEDED, reference.error
    manifest = json.loads(client.fetch(reference.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    expected = manifest["postprocess"]["color_statistics"]["mean"]

    post = pb.PostprocessSpec(color_reference=pb.ColorReference(render_id=reference.id, strength=0.5))
    render = client.submit(small_spec(steps=2, seed=78, postprocess=post))
    stored = render.spec.postprocess.color_reference
    assert stored.statistics.mean == pytest.approx(expected) and stored.strength == pytest.approx(0.5)
    assert client.wait(render.id, timeout=300).state == pb.RENDER_STATE_SUCCEEDED

    missing = pb.PostprocessSpec(color_reference=pb.ColorReference(render_id="nosuchrender"))
    with pytest.raises(grpc.RpcError) as error:
        client.submit(small_spec(postprocess=missing))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "spec.postprocess.color_reference.render_id" in error.value.details()

    hold_next_render("ltx-video-tiny", step=1)  # not SUCCEEDED until the cancel below
    running = client.submit(small_spec(steps=3))
    early = pb.PostprocessSpec(color_reference=pb.ColorReference(render_id=running.id))
    with pytest.raises(grpc.RpcError) as error:
        client.submit(small_spec(postprocess=early))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a SUCCEEDED render" in error.value.details()
    client.cancel(running.id)
    assert client.wait(running.id, timeout=300).state == pb.RENDER_STATE_CANCELLED


def test_killed_postproc_replica_loses_no_chunk_and_the_render_is_not_restarted(client, holds):
    # The drill holds the next chunk of any render: earlier tests' renders must be over.
    active = [pb.RENDER_STATE_QUEUED, pb.RENDER_STATE_RUNNING]
    for earlier in client.list(states=active, page_size=1000).renders:
        client.wait(earlier.id, timeout=300)
    # The first chunk a replica takes waits there until that replica is killed mid-chunk.
    hold_next_chunk()
    post = pb.PostprocessSpec(interpolation_factor=4, upscale_factor=2)
    render = client.submit(small_spec(width=128, height=128, frames=33, fps=8, steps=2, postprocess=post))
    _, chunk = wait_held("chunk")
    os.kill(chunk["pid"], signal.SIGKILL)

    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    assert final.attempt == 1, "the render was restarted"
    video = probe_mp4(client.fetch(render.id))
    assert (video["frames"], video["width"], video["height"]) == (129, 256, 256)
    manifest = json.loads(client.fetch(render.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    assert manifest["postprocess"]["retries"] >= 1, "no chunk was sent again"


def test_cpu_engine_and_post_processing_replicas_keep_freed_memory(client):
    """Their processes start with glibc told to keep freed memory (farm.serve.allocator);
    tests/unit/test_allocator.py shows what that saves."""
    from ray._private.state import actors

    from farm.serve.allocator import KEEP_FREED_MEMORY

    expected = os.environ.get("GLIBC_TUNABLES", KEEP_FREED_MEMORY)
    replicas = {a["Name"]: a["Pid"] for a in actors().values()
                if a["State"] == "ALIVE" and a["Name"].startswith("SERVE_REPLICA")
                and ("postproc" in a["Name"] or "engine-" in a["Name"])}
    assert any("postproc" in name for name in replicas) and any("engine-" in name for name in replicas), replicas
    # glibc parses the variable in place: /proc shows its ':' as NULs.
    written = (f"\0GLIBC_TUNABLES={expected}\0".encode(), f"\0GLIBC_TUNABLES={expected}\0".replace(":", "\0").encode())
    for name, pid in replicas.items():
        with open(f"/proc/{pid}/environ", "rb") as environ:
            block = b"\0" + environ.read()
        assert any(form in block for form in written), name
