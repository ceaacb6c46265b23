"""`farm batch` against the real farm, run as an Indexed Job's pods run it: the command in
child processes, each with its index, the completion count and the Job's identity in its
environment. Every index of a 3-way sharded manifest of six tiny renders, then one index
again, as Kubernetes retries a pod: nothing is rendered twice, and the results files
account for every line."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

from farm.cli.batch import EXIT_SUCCEEDED
from farm.client import FarmClient

COUNT = 3
LINES = 6
# The smallest spec the tiny LTX-Video model takes.
SPEC = {"model": "ltx-video-tiny", "width": 32, "height": 32, "frames": 9, "fps": 8, "steps": 2}


def pod(index: int, manifest: Path, results: Path, job_id: str, target: str, api_key: str) -> subprocess.Popen:
    env = {"JOB_COMPLETION_INDEX": str(index), "FARM_BATCH_COMPLETIONS": str(COUNT), "FARM_BATCH_JOB_ID": job_id,
           "FARM_TARGET": target, "FARM_API_KEY": api_key, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, "-m", "farm", "batch", str(manifest), "--results", str(results)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def renders_by_key(client: FarmClient) -> dict[str, list[str]]:
    """Idempotency key -> ids of the tenant's renders that carry it, over every page."""
    keys: dict[str, list[str]] = {}
    token = ""
    while True:
        page = client.list(page_size=1000, page_token=token)
        for render in page.renders:
            keys.setdefault(render.spec.idempotency_key, []).append(render.id)
        token = page.next_page_token
        if not token:
            return keys


def read_results(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def test_every_index_then_a_retried_one_renders_each_line_once(gateway, api_key, client, tmp_path):
    job_id = f"it-batch-{secrets.token_hex(4)}"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**SPEC, "prompt": f"shot {n}", "seed": n}) + "\n"
                                for n in range(1, LINES + 1)))
    results = tmp_path / "results"

    pods = [pod(index, manifest, results, job_id, gateway.target, api_key) for index in range(COUNT)]
    for index, process in enumerate(pods):
        code, output = finish(process)
        assert code == EXIT_SUCCEEDED, f"index {index}:\n{output}"

    records = {index: read_results(results / f"results-{index}.jsonl") for index in range(COUNT)}
    for index, shard in records.items():
        assert [r["line"] for r in shard] == [n for n in range(1, LINES + 1) if (n - 1) % COUNT == index]
    by_line = {r["line"]: r for shard in records.values() for r in shard}
    assert sorted(by_line) == list(range(1, LINES + 1))
    for record in by_line.values():
        assert record["state"] == "SUCCEEDED", record
        assert record["artifact_uri"] and record["cost_dollars"] > 0
        assert client.get(record["render_id"]).spec.idempotency_key == record["idempotency_key"]

    ours = {key: ids for key, ids in renders_by_key(client).items() if key.startswith(f"batch/{job_id}/")}
    assert len(ours) == LINES and all(len(ids) == 1 for ids in ours.values()), ours
    everything = sum(len(ids) for ids in renders_by_key(client).values())

    # Kubernetes retries index 1 (its pod was lost after it had submitted and finished).
    code, output = finish(pod(1, manifest, results, job_id, gateway.target, api_key))
    assert code == EXIT_SUCCEEDED, output
    again = read_results(results / "results-1.jsonl")
    assert [(r["line"], r["render_id"], r["state"]) for r in again] == [
        (r["line"], r["render_id"], r["state"]) for r in records[1]]
    assert sum(len(ids) for ids in renders_by_key(client).values()) == everything, "a retried pod rendered again"
