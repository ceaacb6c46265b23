"""What ListModels tells a client of a model's limits is every limit the model has."""

from __future__ import annotations

import pytest

from farm.api.convert import model_to_pb
from farm.config import FarmConfig


@pytest.mark.parametrize("model", FarmConfig().served_models(), ids=lambda m: m.name)
def test_every_limit_of_the_contract_is_the_model_s_own(model):
    info = model_to_pb(model, ready=True, device_kinds=["CPU"])
    for field in info.limits.DESCRIPTOR.fields:
        expected = getattr(model.limits, field.name)
        assert getattr(info.limits, field.name) == pytest.approx(expected), field.name
    assert info.limits.min_steps == model.limits.min_steps >= 1


def test_clients_see_object_store_urls_but_never_the_farm_s_own_paths():
    from farm.api.convert import client_uri

    assert client_uri("s3://renders/farm/r1/1.mp4", "r1", "video") == "s3://renders/farm/r1/1.mp4"
    assert client_uri("gs://b/r1/1.json", "r1", "manifest") == "gs://b/r1/1.json"
    assert client_uri("file:///var/lib/farm/artifacts/r1/1.mp4", "r1", "video") == "farm://renders/r1/video"
    assert client_uri("/var/lib/farm/artifacts/r1/1.json", "r1", "manifest") == "farm://renders/r1/manifest"
    assert client_uri(None, "r1", "video") == ""


def test_a_manifest_names_no_server_path_but_keeps_hub_ids_and_urls():
    from farm.render.manifest import without_server_paths

    info = {"sources": {"text-to-video": "/srv/farm/models/ltx-video-tiny", "image-to-video": "Lightricks/LTX-Video"},
            "backend_config": {"cache_dir": "file:///var/cache/farm/onnx"},
            "notes": ["checkpoint file:///srv/farm/artifacts/r1/1.ckpt was not used (gone); rendered from step 0",
                      "artifacts in s3://bucket/prefix", "a 16/9 frame"]}
    clean = without_server_paths(info)
    assert clean["sources"] == {"text-to-video": "local:ltx-video-tiny", "image-to-video": "Lightricks/LTX-Video"}
    assert clean["backend_config"] == {"cache_dir": "local:onnx"}
    assert clean["notes"] == ["checkpoint local:1.ckpt was not used (gone); rendered from step 0",
                              "artifacts in s3://bucket/prefix", "a 16/9 frame"]
    assert "/srv" not in repr(clean) and "/var" not in repr(clean)
