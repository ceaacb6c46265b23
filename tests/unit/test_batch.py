"""`farm batch` without Ray: shards, idempotency keys, manifest lines that are not specs,
exit codes and results files, against the gateway served in this process (tests/gateway.py).
That gateway has no scheduler; where a render must end, the test ends it through the store,
as the scheduler would (`Finisher`). The Job manifest in deploy/batch is checked against
the Kubernetes schema and against the exit codes."""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from farm.cli import batch
from farm.cli.batch import (
    EXIT_FAILED,
    EXIT_RETRYABLE,
    EXIT_SUCCEEDED,
    EXIT_USAGE,
    MAX_LINE_BYTES,
    MAX_MANIFEST_LINES,
    ManifestLine,
    Shard,
    idempotency_key,
    line_digest,
    parse_line,
    read_manifest,
    resolve_shard,
    run_batch,
)
from farm.client import FarmClient
from farm.cli.commands import app
from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.spec import MAX_IDEMPOTENCY_KEY_CHARS
from farm.domain.states import AttemptOutcome
from farm.families import Family
from tests.gateway import LocalGateway, serving

REPO = Path(__file__).resolve().parents[2]
OWNER = "batch-test-scheduler"
# What the Job's podFailurePolicy does with each exit code.
POLICY = {EXIT_USAGE: "FailJob", EXIT_FAILED: "FailIndex", EXIT_RETRYABLE: "Count"}


def farm_config(home: Path) -> FarmConfig:
    """One LTX-Video model on the CPU (the gateway never loads its weights)."""
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO,
                        sources={Task.TEXT_TO_VIDEO: "no-such-dir", Task.IMAGE_TO_VIDEO: "no-such-dir"})
    config = FarmConfig(home=home, models=[model])
    config.gateway.port = config.gateway.metrics_port = 0
    return config


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with serving(farm_config(tmp_path_factory.mktemp("farm"))) as local:
        yield local


@pytest.fixture
def tenant(farm):
    """A tenant of its own for each test, so that its idempotency keys and renders are its own."""
    name = f"batch-{secrets.token_hex(4)}"
    _, key = farm.store.create_tenant(name)
    return name, key


def line(prompt: str = "a kite over the dunes", **fields) -> str:
    return json.dumps({"model": "ltx", "prompt": prompt, "width": 256, "height": 256, "frames": 17, "steps": 4,
                       **fields})


def write_manifest(path: Path, lines: list[str]) -> str:
    path.write_text("".join(f"{text}\n" for text in lines))
    return str(path)


class Finisher:
    """Ends renders as the scheduler would: through the store, SUCCEEDED with an artifact, or
    FAILED where the prompt says "fail". `automatic` ends every render soon after it is queued;
    otherwise the test calls `finish_all`."""

    def __init__(self, farm: LocalGateway):
        self.farm = farm
        self.stop = threading.Event()

    def finish_all(self) -> int:
        claimed = self.farm.store.claim({"ltx": 1000}, OWNER, 30)
        for render in claimed:
            failing = "fail" in render.spec.prompt
            self.farm.store.finish(
                OWNER, render.id, render.attempt, AttemptOutcome.FAILED if failing else AttemptOutcome.SUCCEEDED,
                artifact_uri=None if failing else f"file:///artifacts/{render.id}.mp4",
                error="the engine ran out of memory" if failing else None)
        return len(claimed)

    @contextlib.contextmanager
    def automatic(self):
        def loop():
            while not self.stop.wait(0.02):
                self.finish_all()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(10)


def run(farm: LocalGateway, key: str, manifest: str, shard: Shard = Shard(0, 1), results: str | None = None,
        job_id: str = "job-a", messages: list[str] | None = None, **options) -> int:
    return run_batch(lambda: FarmClient(farm.target, key), manifest, job_id, shard, results,
                     log=(messages if messages is not None else []).append, **options)


def read_results(url: str) -> list[dict]:
    with fsspec.open(url, "rt") as stream:
        return [json.loads(text) for text in stream]


def renders_of(farm: LocalGateway, tenant_name: str) -> list:
    records, _ = farm.store.list(farm.store.tenant(tenant_name).id, page_size=1000)
    return records


# Shards.

def test_every_line_belongs_to_exactly_one_index():
    for count in range(1, 6):
        for number in range(1, 40):
            owners = [index for index in range(count) if Shard(index, count).owns(number)]
            assert owners == [(number - 1) % count]
    assert [n for n in range(1, 10) if Shard(0, 3).owns(n)] == [1, 4, 7]
    assert [n for n in range(1, 10) if Shard(2, 3).owns(n)] == [3, 6, 9]


@pytest.mark.parametrize("index, count, expected", [
    (None, None, Shard(0, 1)), (None, 1, Shard(0, 1)), (2, 3, Shard(2, 3)), (0, 1, Shard(0, 1)),
])
def test_shard_from_index_and_count(index, count, expected):
    assert resolve_shard(index, count) == expected


@pytest.mark.parametrize("index, count, says", [
    (1, None, "needs the completion count"), (None, 3, "needs the index"), (3, 3, "outside 0..2"),
    (0, 0, "at least 1"),
])
def test_a_shard_that_cannot_be_known_is_refused(index, count, says):
    with pytest.raises(batch.UsageError, match=says):
        resolve_shard(index, count)


# Idempotency keys.

def test_idempotency_keys_are_stable_distinct_and_bounded():
    digest = line_digest(b'{"prompt": "a kite"}')
    key = idempotency_key("render-week-42", 7, digest)
    assert key == idempotency_key("render-week-42", 7, line_digest(b'{"prompt": "a kite"}'))
    assert "render-week-42" in key
    others = {idempotency_key("render-week-42", 8, digest), idempotency_key("render-week-43", 7, digest),
              idempotency_key("render-week-42", 7, line_digest(b'{"prompt": "a kite!"}')),
              idempotency_key("render-week-42", 7, line_digest(b'{"prompt": "a kite"}', b"\x89PNG image"))}
    assert key not in others and len(others) == 4
    # Two long identities alike in their first characters, the largest line number.
    long_a, long_b = "j" * 300 + "a", "j" * 300 + "b"
    keys = [idempotency_key(job, MAX_MANIFEST_LINES, digest) for job in (long_a, long_b, "ü/ü" * 50)]
    assert len(set(keys)) == 3
    assert all(len(k) <= MAX_IDEMPOTENCY_KEY_CHARS for k in keys)


def test_the_image_is_part_of_a_lines_digest(tmp_path):
    (tmp_path / "first.png").write_bytes(b"\x89PNG one")
    manifest = str(tmp_path / "manifest.jsonl")
    text = line(task="i2v", image="first.png").encode()
    _, image = parse_line(ManifestLine(1, text), manifest)
    assert image == b"\x89PNG one"
    (tmp_path / "first.png").write_bytes(b"\x89PNG two")
    _, changed = parse_line(ManifestLine(1, text), manifest)
    assert line_digest(text, image) != line_digest(text, changed)


# Manifest lines that are not specs: each named by its line and field, the others go on.

BAD_LINES = {
    2: ("{not json", "is not JSON"),
    3: ('["a", "list"]', "must be a JSON object"),
    4: (line(num_frames=17), "num_frames: is not a field (farm batch calls it 'frames')"),
    5: (line(width="256"), "width: must be an integer"),
    6: (line(idempotency_key="mine"), "idempotency_key: is set by farm batch"),
    7: (line(task="v2v"), "task: \"v2v\" is not one of"),
    8: (line(task="i2v", image="missing.png"), "image:"),
    9: (line(labels={"shot": 12}), "labels: must be an object of strings"),
    10: (line(postprocess={"upscale_factor": "two"}), "postprocess:"),
    11: (line(seed=-1), "seed: -1 is out of range"),
    12: (line(guidance=True), "guidance: must be a number"),
    13: (json.dumps({"prompt": "no model"}), "model: is required"),
}


def test_bad_lines_are_reported_with_their_line_and_field_and_the_others_still_render(farm, tenant, tmp_path):
    name, key = tenant
    lines = [line("first")] + [text for text, _ in BAD_LINES.values()] + [line("refused", width=100), line("last")]
    manifest = write_manifest(tmp_path / "manifest.jsonl", lines)
    messages: list[str] = []
    with Finisher(farm).automatic():
        code = run(farm, key, manifest, results=str(tmp_path / "out"), messages=messages)
    assert code == EXIT_FAILED
    results = {r["line"]: r for r in read_results(str(tmp_path / "out" / "results-0.jsonl"))}
    assert sorted(results) == list(range(1, len(lines) + 1))
    for number, (_, says) in BAD_LINES.items():
        assert results[number]["state"] == "INVALID" and says in results[number]["error"], results[number]
        assert not results[number]["render_id"]
        assert any(m.startswith(f"line {number}: ") and says in m for m in messages), messages
    refused = results[len(lines) - 1]
    assert refused["state"] == "REFUSED" and "spec.width" in refused["error"] and "multiple of" in refused["error"]
    assert results[1]["state"] == results[len(lines)]["state"] == "SUCCEEDED"
    assert len(renders_of(farm, name)) == 2


def test_blank_lines_keep_the_numbering_and_are_no_ones(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [line("one"), "", "   ", line("four")])
    assert [entry.number for entry in read_manifest(manifest, Shard(0, 1))] == [1, 4]
    assert [entry.number for entry in read_manifest(manifest, Shard(1, 2))] == [4]
    # The last line needs no line ending.
    (tmp_path / "n.jsonl").write_text(line("one") + "\n" + line("two"))
    assert [entry.text for entry in read_manifest(str(tmp_path / "n.jsonl"), Shard(0, 1))] == [
        line("one").encode(), line("two").encode()]


def test_a_line_over_the_message_limit_is_a_bad_line_not_a_stop(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("wb") as stream:
        stream.write(line("short").encode() + b"\n")
        stream.write(b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'"}\n')
        stream.write(line("after").encode() + b"\n")
    lines = read_manifest(str(path), Shard(0, 1))
    assert [(entry.number, entry.too_long) for entry in lines] == [(1, 0), (2, MAX_LINE_BYTES), (3, 0)]
    assert lines[2].text == line("after").encode()
    with pytest.raises(batch.LineError, match=f"longer than {MAX_LINE_BYTES} bytes"):
        parse_line(lines[1], str(path))
    # Only its own index reports it.
    assert [entry.number for entry in read_manifest(str(path), Shard(0, 2))] == [1, 3]


def test_a_manifest_of_too_many_lines_is_refused_before_anything_is_submitted(farm, tenant, tmp_path):
    name, key = tenant
    manifest = write_manifest(tmp_path / "huge.jsonl", [line("x")] * (MAX_MANIFEST_LINES + 1))
    messages: list[str] = []
    assert run(farm, key, manifest, messages=messages) == EXIT_USAGE
    assert any(f"more than {MAX_MANIFEST_LINES} lines" in m for m in messages)
    assert renders_of(farm, name) == []


# Exit codes and results.

def test_a_sharded_batch_renders_each_line_once_and_a_rerun_creates_nothing(farm, tenant, tmp_path):
    name, key = tenant
    manifest = write_manifest(tmp_path / "manifest.jsonl", [line(f"shot {n}", seed=n) for n in range(1, 8)])
    out = tmp_path / "results"
    with Finisher(farm).automatic():
        codes = [run(farm, key, manifest, Shard(index, 3), str(out)) for index in range(3)]
        assert codes == [EXIT_SUCCEEDED] * 3
        first = {r["line"]: r for index in range(3) for r in read_results(str(out / f"results-{index}.jsonl"))}
        assert sorted(first) == list(range(1, 8))
        assert [r["line"] for r in read_results(str(out / "results-1.jsonl"))] == [2, 5]
        # The farm's own disk is not shown: the URI names the render and kind to fetch.
        assert all(r["state"] == "SUCCEEDED" and r["artifact_uri"] == f"farm://renders/{r['render_id']}/video"
                   for r in first.values())
        renders = renders_of(farm, name)
        assert len(renders) == 7
        assert {r.spec.idempotency_key for r in renders} == {r["idempotency_key"] for r in first.values()}

        # Kubernetes retries index 1: the same renders come back, nothing new is made.
        assert run(farm, key, manifest, Shard(1, 3), str(out)) == EXIT_SUCCEEDED
        again = read_results(str(out / "results-1.jsonl"))
        assert [r["render_id"] for r in again] == [first[2]["render_id"], first[5]["render_id"]]
        assert len(renders_of(farm, name)) == 7

        # An edited line is a new render; the same manifest under another job identity renders anew.
        edited = write_manifest(tmp_path / "manifest.jsonl",
                                [line(f"shot {n}", seed=n + (100 if n == 5 else 0)) for n in range(1, 8)])
        assert run(farm, key, edited, Shard(1, 3), str(out)) == EXIT_SUCCEEDED
        edited_results = {r["line"]: r for r in read_results(str(out / "results-1.jsonl"))}
        assert edited_results[2]["render_id"] == first[2]["render_id"]
        assert edited_results[5]["render_id"] != first[5]["render_id"]
        assert len(renders_of(farm, name)) == 8
        assert run(farm, key, edited, Shard(0, 3), str(out), job_id="job-b") == EXIT_SUCCEEDED
        assert len(renders_of(farm, name)) == 8 + 3


def test_a_failed_render_exits_not_retryable_with_its_error_in_the_results(farm, tenant, tmp_path):
    _, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("fine"), line("this one will fail")])
    with Finisher(farm).automatic():
        assert run(farm, key, manifest, results=str(tmp_path / "r.jsonl")) == EXIT_FAILED
    fine, failed = read_results(str(tmp_path / "r.jsonl"))
    assert fine["state"] == "SUCCEEDED" and fine["cost_dollars"] >= 0
    assert failed["state"] == "FAILED" and "out of memory" in failed["error"] and failed["render_id"]


def test_an_unreachable_gateway_exits_retryable_and_records_every_line(tenant, tmp_path):
    _, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("a"), line("b")])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    messages: list[str] = []
    code = run_batch(lambda: FarmClient(closed, key), manifest, "job-a", Shard(0, 1), str(tmp_path / "r.jsonl"),
                     retry_for_s=0, log=messages.append)
    assert code == EXIT_RETRYABLE
    assert [r["state"] for r in read_results(str(tmp_path / "r.jsonl"))] == ["NOT_SUBMITTED"] * 2
    assert any("UNAVAILABLE" in m for m in messages)


def test_a_deadline_passed_exits_retryable_with_the_renders_as_they_stand(farm, tenant, tmp_path):
    _, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("stays queued")])
    # Nothing ends the render: the gateway here has no scheduler.
    assert run(farm, key, manifest, results=str(tmp_path / "r.jsonl"), deadline_s=2) == EXIT_RETRYABLE
    (record,) = read_results(str(tmp_path / "r.jsonl"))
    assert record["state"] == "QUEUED" and record["render_id"]


def test_a_busy_farm_is_waited_for_not_refused(farm, tenant, tmp_path):
    """The tenant may queue one render: the second line's submit is RESOURCE_EXHAUSTED with
    RetryInfo; the batch follows the first render to its end meanwhile, then submits again."""
    name, key = tenant
    farm.store.set_limits(name, max_queued=1)
    manifest = write_manifest(tmp_path / "m.jsonl", [line("one"), line("two")])
    messages: list[str] = []
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(run(farm, key, manifest, messages=messages)))
    worker.start()
    finisher = Finisher(farm)
    for _ in range(1000):
        if any("farm busy" in m for m in messages):
            break
        worker.join(0.01)
    assert any("line 2: farm busy" in m for m in messages), messages
    with finisher.automatic():
        worker.join(30)
    assert codes == [EXIT_SUCCEEDED]
    assert len(renders_of(farm, name)) == 2


def test_results_and_manifest_through_fsspec_urls(farm, tenant):
    _, key = tenant
    with fsspec.open("memory://batches/week/manifest.jsonl", "wt") as stream:
        stream.write(line("one") + "\n" + line("two") + "\n" + line("three") + "\n")
    with Finisher(farm).automatic():
        assert run(farm, key, "memory://batches/week/manifest.jsonl", Shard(1, 2),
                   "memory://batches/week/out/part-{index}.jsonl") == EXIT_SUCCEEDED
    assert [r["line"] for r in read_results("memory://batches/week/out/part-1.jsonl")] == [2]


@pytest.mark.parametrize("results, says", [
    ("/tmp/one-file.jsonl", "would be written by all 3 indexes"),
    ("nosuchprotocol://bucket/results", "nosuchprotocol"),
])
def test_a_results_location_no_index_can_use_is_refused_first(farm, tenant, tmp_path, results, says):
    name, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("a")])
    messages: list[str] = []
    assert run(farm, key, manifest, Shard(0, 3), results, messages=messages) == EXIT_USAGE
    assert any(says in m for m in messages), messages
    assert renders_of(farm, name) == []


def test_a_missing_manifest_or_a_refused_key_is_a_usage_error(farm, tmp_path):
    assert run(farm, "farm_000000000000_" + "0" * 40, str(tmp_path / "absent.jsonl")) == EXIT_USAGE
    manifest = write_manifest(tmp_path / "m.jsonl", [line("a")])
    messages: list[str] = []
    assert run(farm, "farm_000000000000_" + "0" * 40, manifest, messages=messages) == EXIT_USAGE
    assert any("UNAUTHENTICATED" in m for m in messages)


# The command, as a Job's pod runs it: its shard and identity from the environment.

def test_the_command_takes_its_shard_and_identity_from_the_job(farm, tenant, tmp_path):
    name, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line(f"shot {n}") for n in range(1, 6)])
    env = {"JOB_COMPLETION_INDEX": "1", "FARM_BATCH_COMPLETIONS": "2", "FARM_BATCH_JOB_ID": "nightly",
           "FARM_API_KEY": key, "FARM_TARGET": farm.target}
    runner = CliRunner()
    with Finisher(farm).automatic():
        result = runner.invoke(app, ["batch", manifest, "--results", str(tmp_path / "out")], env=env)
    assert result.exit_code == EXIT_SUCCEEDED, result.output
    records = read_results(str(tmp_path / "out" / "results-1.jsonl"))
    assert [r["line"] for r in records] == [2, 4]
    assert all(r["idempotency_key"].startswith("batch/nightly/") for r in records)
    # Flags win over the environment.
    with Finisher(farm).automatic():
        result = runner.invoke(app, ["batch", manifest, "--results", str(tmp_path / "out"), "--index", "0"], env=env)
    assert result.exit_code == EXIT_SUCCEEDED, result.output
    assert [r["line"] for r in read_results(str(tmp_path / "out" / "results-0.jsonl"))] == [1, 3, 5]
    assert len(renders_of(farm, name)) == 5


@pytest.mark.parametrize("env, says", [
    ({"JOB_COMPLETION_INDEX": "0", "FARM_BATCH_COMPLETIONS": "2"}, "no job identity"),
    ({"JOB_COMPLETION_INDEX": "2", "FARM_BATCH_COMPLETIONS": "2", "FARM_BATCH_JOB_ID": "j"}, "outside 0..1"),
    ({"JOB_COMPLETION_INDEX": "1", "FARM_BATCH_JOB_ID": "j"}, "needs the completion count"),
])
def test_the_command_refuses_what_every_index_would_refuse(farm, tenant, tmp_path, env, says):
    _, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("a")])
    result = CliRunner().invoke(app, ["batch", manifest], env={"FARM_API_KEY": key, "FARM_TARGET": farm.target, **env})
    assert result.exit_code == EXIT_USAGE
    assert says in result.output


def test_a_pod_told_to_stop_writes_its_results_and_exits_retryable(farm, tenant, tmp_path):
    """SIGTERM (a node drained, the Job deleted) while the render is queued: the results say
    so, and the code asks for a retry."""
    _, key = tenant
    manifest = write_manifest(tmp_path / "m.jsonl", [line("stays queued")])
    env = {"FARM_API_KEY": key, "FARM_TARGET": farm.target, "FARM_BATCH_JOB_ID": "drained", "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen([sys.executable, "-m", "farm", "batch", manifest, "--results", str(tmp_path / "out")],
                               env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for message in process.stderr:
        seen.append(message)
        if "line 1: r" in message and "QUEUED" in message:
            break
    process.send_signal(signal.SIGTERM)
    try:
        _, rest = process.communicate(timeout=60)  # a pod that hangs on SIGTERM is killed, not retried
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("farm batch did not exit within 60 s of SIGTERM:\n" + "".join(seen))
    seen.append(rest)
    assert process.returncode == EXIT_RETRYABLE, "".join(seen)
    (record,) = read_results(str(tmp_path / "out" / "results-0.jsonl"))
    assert record["state"] == "QUEUED" and record["render_id"]


# The Job manifest beside the code.

def job_manifest() -> dict:
    (job,) = [doc for doc in yaml.safe_load_all((REPO / "deploy" / "batch" / "job.yaml").read_text()) if doc]
    return job


def test_the_job_manifest_is_a_valid_indexed_job():
    job = job_manifest()
    kubernetes_validate.validate(job, "1.33.0", strict=True)  # FailIndex and backoffLimitPerIndex are GA from 1.33
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["FARM_BATCH_COMPLETIONS"]["value"] == str(spec["completions"])
    assert "fieldRef" in env["FARM_BATCH_JOB_ID"]["valueFrom"]


def test_the_job_manifest_acts_on_farm_batchs_exit_codes():
    job = job_manifest()
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "batch" or container["command"][-1] == "batch" or "batch" in container["command"]
    actions = {}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In"
            assert rule["onExitCodes"]["containerName"] == container["name"]
            actions.update({code: rule["action"] for code in rule["onExitCodes"]["values"]})
    assert actions == POLICY
    # A pod evicted or preempted is not the batch's failure.
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    assert any(rule["action"] == "Ignore" and rule.get("onPodConditions") == disrupted
               for rule in job["spec"]["podFailurePolicy"]["rules"])


def test_the_example_manifest_lines_are_specs_the_tiny_models_take(tmp_path):
    from farm.api.convert import spec_from_pb
    from farm.config import tiny_model_configs
    from farm.jobs.validation import resolve_spec

    models = {model.name: model for model in tiny_model_configs(tmp_path)}
    path = REPO / "deploy" / "batch" / "manifest.example.jsonl"
    lines = read_manifest(str(path), Shard(0, 1))
    assert len(lines) >= 3
    for entry in lines:
        spec, _ = parse_line(entry, str(path))
        resolve_spec(spec_from_pb(spec), models)  # raises InvalidArgument naming a bad field


# The chart's Job (helm/farm/templates/batch-job.yaml), rendered by the helm that `make test`
# installs (`make ops-tools`).

HELM = REPO / ".tools" / "helm" / "bin" / "helm"


@functools.lru_cache(maxsize=None)
def render_chart(*settings: str) -> list[dict]:
    """The chart's objects with a batch of 3 indexes and `settings` (helm --set); read only."""

    assert HELM.exists(), f"{HELM} is missing: `make ops-tools` installs it"
    command = [str(HELM), "template", "nightly", str(REPO / "helm" / "farm"), "--namespace", "studio"]
    for setting in ("batch.enabled=true", "batch.manifest=s3://batches/week-42.jsonl", "batch.completions=3",
                    "batch.parallelism=2", *settings):
        command += ["--set", setting]
    rendered = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def chart_job(documents: list[dict]) -> dict:
    (job,) = [d for d in documents if d["kind"] == "Job" and d["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "batch"]
    return job


@pytest.mark.parametrize("settings", [(), ("gateway.tls.enabled=true", "gateway.tls.secretName=gateway-tls",
                                           "batch.resultsUrl=s3://batches/week-42/results/")])
def test_the_charts_job_is_the_same_indexed_job(settings):
    documents = render_chart(*settings)
    job = chart_job(documents)
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    assert job["spec"]["podFailurePolicy"] == job_manifest()["spec"]["podFailurePolicy"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 3, 2)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FARM_BATCH_COMPLETIONS"] == "3"
    (service,) = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"].endswith("-gateway")]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["FARM_TARGET"] == f"{service['metadata']['name']}:{grpc_port}"
    assert container["command"] + container["args"][:1] == ["farm", "batch", "s3://batches/week-42.jsonl"]
    if settings:
        assert container["args"][1:] == ["--results", "s3://batches/week-42/results/"]
        assert env["FARM_TLS_SERVER_NAME"] == f"{service['metadata']['name']}.studio.svc"
        # Only the CA certificate of the gateway's Secret, never its key.
        (tls,) = [v for v in pod["volumes"] if "secret" in v]
        assert tls["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_a_changed_batch_is_a_new_job_and_keeps_its_identity():
    """A Job's pod template cannot change in place: another spec is another Job name. The
    identity, in every idempotency key, stays the release's and the manifest's."""
    first, wider = chart_job(render_chart()), chart_job(render_chart("batch.parallelism=3"))
    assert first["metadata"]["name"] != wider["metadata"]["name"]
    assert chart_job(render_chart())["metadata"]["name"] == first["metadata"]["name"]

    def identity(job):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        return next(e["value"] for e in container["env"] if e["name"] == "FARM_BATCH_JOB_ID")

    assert identity(first) == identity(wider)
    assert identity(chart_job(render_chart("batch.manifest=s3://batches/week-43.jsonl"))) != identity(first)
