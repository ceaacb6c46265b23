"""Every newer family through the whole farm: rendered, cancelled mid-denoise, preempted
and resumed (or, where its pipelines cannot resume exactly, never preempted), metered,
and with LTX-2 an MP4 that plays with sound in sync."""

from __future__ import annotations

import json

import numpy as np
import pytest

from farm.cli.demo import first_frame_png
from farm.families import Family, family_facts
from farm.postproc.audio import probe_audio
from farm.postproc.encode import probe_mp4
from farm.serve.flags import hold_next_render, release
from farm.v1 import render_pb2 as pb
from tests.holds import wait_held

TASK_TO_PB = {"text-to-video": pb.TASK_TEXT_TO_VIDEO, "image-to-video": pb.TASK_IMAGE_TO_VIDEO}
NEWER_FAMILIES = [Family.WAN, Family.LTX_2, Family.HUNYUAN_VIDEO_1_5, Family.STABLE_VIDEO_DIFFUSION,
                  Family.ANIMATEDIFF]


def family_spec(family: Family, steps: int = 4, seed: int = 77, **extra) -> pb.RenderSpec:
    """A small render of the family's tiny model: its first task, its tiny defaults."""
    facts = family_facts(family)
    tiny, defaults = facts.tiny, facts.tiny.defaults
    task = next(iter(tiny.directories))
    spec = pb.RenderSpec(model=tiny.name, task=TASK_TO_PB[task.value], width=defaults.width, height=defaults.height,
                         num_frames=defaults.num_frames, fps=defaults.fps, num_inference_steps=steps, seed=seed,
                         prompt="a paper boat drifting on a pond" if facts.uses_prompt else "", **extra)
    if spec.task == pb.TASK_IMAGE_TO_VIDEO:
        spec.image = first_frame_png(defaults.width, defaults.height)
    return spec


def pixels(client, render_id: str) -> np.ndarray:
    return probe_mp4(client.fetch(render_id))["pixels"]


@pytest.mark.parametrize("family", NEWER_FAMILIES, ids=lambda f: f.value)
def test_a_family_renders_a_metered_mp4_with_its_manifest(client, family):
    spec = family_spec(family)
    final = client.wait(client.submit(spec).id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error

    data = client.fetch(final.id)
    video = probe_mp4(data)
    assert (video["frames"], video["width"], video["height"]) == (spec.num_frames, spec.width, spec.height)
    manifest = json.loads(client.fetch(final.id, kind=pb.ARTIFACT_KIND_MANIFEST))
    assert manifest["model"]["family"] == family.value
    phases = {p.phase for p in final.cost.phases}
    assert {"DENOISING", "DECODING", "ENCODING"} <= phases and final.cost.total_dollars > 0

    sound = probe_audio(data)
    if family_facts(family).audio:
        # The outside check: a player finds an AAC track as long as the video.
        assert sound is not None and sound["codec"] == "aac"
        assert sound["duration_s"] == pytest.approx(video["duration_s"], abs=1 / spec.fps)
        assert np.abs(sound["samples"]).max() > 0
        assert manifest["postprocess"]["audio"]["sample_rate"] == sound["sample_rate"]
    else:
        assert sound is None and "audio" not in manifest["postprocess"]


def test_ltx2_sound_stays_in_sync_through_interpolation(client):
    spec = family_spec(Family.LTX_2, postprocess=pb.PostprocessSpec(interpolation_factor=2))
    final = client.wait(client.submit(spec).id, timeout=300)
    assert final.state == pb.RENDER_STATE_SUCCEEDED, final.error
    data = client.fetch(final.id)
    video, sound = probe_mp4(data), probe_audio(data)
    assert video["frames"] == (spec.num_frames - 1) * 2 + 1 and video["fps"] == pytest.approx(spec.fps * 2)
    assert sound["duration_s"] == pytest.approx(video["duration_s"], abs=1 / video["fps"])


@pytest.mark.parametrize("family", NEWER_FAMILIES, ids=lambda f: f.value)
def test_a_family_is_cancelled_mid_denoise(client, holds, family):
    spec = family_spec(family, steps=5, seed=5)
    hold_next_render(spec.model, step=2)
    render = client.submit(spec)
    assert wait_held()[0] == render.id
    client.cancel(render.id)
    final = client.wait(render.id, timeout=300)
    assert final.state == pb.RENDER_STATE_CANCELLED and final.step == 2
    assert not final.artifact_uri
    assert "DENOISING" in {p.phase for p in final.cost.phases}


@pytest.mark.parametrize("family", NEWER_FAMILIES, ids=lambda f: f.value)
def test_a_family_is_preempted_and_resumes_to_the_same_video_or_is_never_preempted(client, holds, family):
    spec = family_spec(family, steps=5, seed=11, priority=10)
    reference = client.wait(client.submit(spec).id, timeout=300)
    assert reference.state == pb.RENDER_STATE_SUCCEEDED, reference.error
    preemptible = json.loads(client.fetch(reference.id, kind=pb.ARTIFACT_KIND_MANIFEST))["model"]["preemptible"]

    hold_next_render(spec.model, step=2)
    victim = client.submit(spec)
    assert wait_held()[0] == victim.id
    urgent = client.submit(family_spec(family, steps=2, seed=1, priority=90))
    if not preemptible:
        # Nothing can take the victim's place: it finishes first, once let go.
        release(victim.id)
    urgent_done, victim_done = client.wait(urgent.id, timeout=300), client.wait(victim.id, timeout=300)
    assert urgent_done.state == victim_done.state == pb.RENDER_STATE_SUCCEEDED
    if preemptible:
        assert victim_done.preemptions == 1
        assert victim_done.finished_at.ToDatetime() > urgent_done.finished_at.ToDatetime()
        # Steps 3.. ran once more from the checkpoint: the video of a render never interrupted.
        np.testing.assert_array_equal(pixels(client, victim.id), pixels(client, reference.id))
    else:
        assert victim_done.preemptions == 0


def test_a_lora_adapter_changes_the_video_is_recorded_and_costs_its_surcharge(client):
    """The farm's config offers the tiny LTX-Video a random adapter with a 50% surcharge."""
    [adapter] = {m.name: m for m in client.models().models}["ltx-video-tiny"].adapters
    assert (adapter.name, adapter.surcharge) == ("watercolor", 0.5)
    plain = family_spec(Family.LTX_VIDEO, seed=21)
    styled = family_spec(Family.LTX_VIDEO, seed=21, adapters=[pb.AdapterRequest(name="watercolor", weight=0.9)])
    assert client.estimate(styled).dollars == pytest.approx(client.estimate(plain).dollars * 1.5, rel=1e-3)

    renders = [client.wait(client.submit(spec).id, timeout=300) for spec in (plain, styled)]
    assert all(r.state == pb.RENDER_STATE_SUCCEEDED for r in renders), [r.error for r in renders]
    assert not np.array_equal(pixels(client, renders[0].id), pixels(client, renders[1].id))
    manifests = [json.loads(client.fetch(r.id, kind=pb.ARTIFACT_KIND_MANIFEST)) for r in renders]
    assert manifests[0]["adapters"] == []
    [record] = manifests[1]["adapters"]
    assert record["name"] == "watercolor" and record["weight"] == pytest.approx(0.9) and len(record["sha256"]) == 64
