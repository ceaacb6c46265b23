"""benchmarks/gpu_check.py on the CPU, as its --smoke runs it: every section of the
results file is written, what was measured is positive, the optimized backend was
compared with eager on the same inputs, and nothing claims to have measured a GPU.
No Ray, no GPU: the tiny pipelines stand in for the full-size ones."""

from __future__ import annotations

import json
import math
import tempfile

import pytest

from benchmarks import gpu_check

MODELS = ("ltx-video-2b", "cogvideox-5b")
TINY = ("ltx-video-tiny", "cogvideox-tiny")
STATUSES = {gpu_check.OK, gpu_check.ERROR, gpu_check.SKIPPED, gpu_check.NOT_AVAILABLE}


@pytest.fixture(scope="module")
def smoke(models_dir, tmp_path_factory):
    """One smoke run for every test here, on the session's tiny models."""
    out = tmp_path_factory.mktemp("gpu-check") / "smoke.json"
    tempdir = tempfile.tempdir
    code = gpu_check.main(["--smoke", "--out", str(out), "--tiny-models-dir", str(models_dir)])
    # Its scratch folder (engine builds) is gone and the process's temporary folder is its own again.
    assert tempfile.tempdir == tempdir
    return code, json.loads(out.read_text()), out


def rows(node, path=""):
    """Every item of the results (a dict with a status), with its path."""
    if isinstance(node, dict):
        if "status" in node:
            yield path, node
        for key, value in node.items():
            yield from rows(value, f"{path}.{key}" if path else key)


def test_the_smoke_run_writes_every_section_and_succeeds(smoke):
    code, results, _ = smoke
    assert code == 0, results["failures"]
    assert results["schema"] == gpu_check.SCHEMA and results["complete"] is True and results["smoke"] is True
    assert results["failures"] == []
    for section in ("machine", "matmul", "tiny", "health", "models", "not_measured"):
        assert section in results, section
    assert set(results["machine"]["versions"]) >= {"python", "torch", "diffusers", "onnxruntime", "tensorrt"}
    assert set(results["machine"]["optional_backends"]) == {"onnxruntime", "tensorrt"}
    assert results["tiny"]["make"]["status"] == gpu_check.OK
    for name in TINY:
        assert results["tiny"][name]["load"]["status"] == gpu_check.OK
        assert results["tiny"][name]["render"]["status"] == gpu_check.OK
        assert results["health"][name]["status"] == gpu_check.OK
    for name in MODELS:
        model = results["models"][name]
        assert model["build"]["status"] == gpu_check.OK
        assert set(model["steps"]) == set(gpu_check.BACKENDS)
        assert model["steps"]["eager"]["status"] == gpu_check.OK
        assert set(model["decode"]) == {"tiled", "untiled"}
        assert all(row["status"] == gpu_check.OK for row in model["decode"].values())
        assert model["render"]["status"] == gpu_check.OK
        # Where a backend did not run, the file says why.
        for row in model["steps"].values():
            assert row["status"] == gpu_check.OK or row["reason"]
    assert model["steps"]["fp8"]["status"] == gpu_check.NOT_AVAILABLE
    assert model["steps"]["compile"]["status"] == gpu_check.SKIPPED
    for path, row in rows(results):
        assert row["status"] in STATUSES, path
        assert row["status"] != gpu_check.ERROR, (path, row.get("error"))


def test_what_was_measured_is_positive(smoke):
    _, results, _ = smoke
    assert results["matmul"]["tflops"] > 0
    for name in TINY:
        render = results["tiny"][name]["render"]
        assert render["whole_s"] > 0 and render["render_s"] > 0 and render["steps"] == gpu_check.SMOKE_STEPS
        assert set(render["phases_s"]) == {"ENCODING_PROMPT", "DENOISING", "DECODING"}
    for name in MODELS:
        model = results["models"][name]
        assert model["latent_tokens"] > 0 and model["tflop_per_step"] > 0
        for row in model["steps"].values():
            if row["status"] == gpu_check.OK:
                assert row["ms_per_step"] > 0 and row["tflops"] > 0 and 0 < row["fraction_of_matmul"]
        assert all(row["seconds"] > 0 for row in model["decode"].values())
        assert model["render"]["seconds"] > 0 and model["render"]["steps"] == gpu_check.SMOKE_STEPS
        # Each estimate is farm.planning.memory's, for the pipeline that ran.
        for path, row in rows(model):
            if "memory" in row:
                assert row["memory"]["estimate_bytes"] > 0, path


def test_an_optimized_backend_was_compared_with_eager(smoke):
    _, results, _ = smoke
    compared = [row for name in MODELS for row in results["models"][name]["steps"].values()
                if "relative_error" in row]
    # The smoke builds optimized backends for one model: onnx on CPU (compile is too slow here, fp8 needs a GPU).
    assert [row["label"] for row in compared] == ["onnx-cpu-float32"]
    assert results["models"][gpu_check.SMOKE_BACKEND_MODEL]["steps"]["onnx"]["status"] == gpu_check.OK
    for row in compared:
        assert math.isfinite(row["relative_error"]) and row["relative_error"] >= 0
        assert row["relative_error"] <= row["tolerance"] and row["matches_eager"] is True
        assert row["speedup_over_eager"] > 0 and row["setup_s"] > 0


def test_nothing_claims_a_gpu_measurement(smoke):
    _, results, out = smoke
    machine = results["machine"]
    assert machine["measured_on"] == "cpu" and machine["card"].startswith("CPU")
    assert machine["gpu"] == machine["driver"] == machine["cuda_driver"] == gpu_check.NOT_MEASURED
    assert not out.name.startswith("gpu-")
    memories = [row["memory"] for _, row in rows(results) if "memory" in row]
    assert len(memories) >= len(TINY) + 4 * len(MODELS)
    for memory in memories:
        assert memory["measured_bytes"] == memory["measured_over_estimate"] == gpu_check.NOT_MEASURED
        assert "within_estimate" not in memory
    for name in MODELS:
        assert results["models"][name]["build"]["weights_bytes"] == gpu_check.NOT_MEASURED
        for row in results["models"][name]["steps"].values():
            assert "cudagraphs" not in row.get("label", "") and "bfloat16" not in row.get("label", "")
    for name in TINY:
        assert results["tiny"][name]["load"]["device"] == results["health"][name]["device"] == "cpu"


def test_without_a_gpu_only_the_smoke_test_runs(capsys, monkeypatch):
    import torch

    # As on a machine without a GPU, wherever the suite runs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_card_names_make_file_names():
    assert gpu_check.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_check.card_slug("NVIDIA H200") == "h200"
