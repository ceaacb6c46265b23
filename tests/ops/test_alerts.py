"""farm's alerts (helm/farm/files/alerts.yaml) pass the real promtool's `check rules`, and its
`test rules` unit tests (deploy/prometheus/alerts_test.yaml), which test every alert firing
when it should and staying quiet when it should not. promtool is the one `make promtool`
unpacks from Debian's `prometheus` package; this module runs that target when it is missing.
(That every metric the alerts name is one farm exports is checked in test_dashboards.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "helm" / "farm" / "files" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
PROMTOOL = REPO / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
PROMETHEUS_VERSION = "2.42.0"  # the Makefile's PROMETHEUS_VERSION
SEVERITIES = {"warning", "critical"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    if not PROMTOOL.exists():
        subprocess.run(["make", "-s", "promtool"], cwd=REPO, check=True, timeout=300)
    return PROMTOOL


def run(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_is_the_pinned_one(promtool):
    assert f"promtool, version {PROMETHEUS_VERSION}" in run(promtool, "--version").stdout


def test_the_rules_pass_promtool_check_rules(promtool):
    result = run(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_check_rules_refuses_a_broken_rule(promtool, tmp_path):
    broken = tmp_path / "alerts.yaml"
    broken.write_text(ALERTS.read_text().replace("farm_pool_wanted_replicas - farm_pool_replicas > 0",
                                                 "farm_pool_wanted_replicas - (farm_pool_replicas > 0"))
    result = run(promtool, "check", "rules", broken)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_the_alerts_pass_their_unit_tests(promtool):
    result = run(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_a_summary_and_a_runbook():
    for rule in rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary and "\n" not in summary, rule["alert"]
        # Runbook-style: what it means, then what to check and do, in several lines.
        assert description.count("\n") >= 3, rule["alert"]
        assert rule["alert"].startswith("Farm"), rule["alert"]


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - firing == set(), "alerts with no unit test in which they fire"
    assert names - quiet == set(), "alerts with no unit test in which they stay quiet"
    assert (firing | quiet) <= names, "unit tests of alerts that do not exist"


@pytest.mark.parametrize(("alert", "original", "mutant"), [
    # A threshold too low fires on the model that fails 5% of its renders.
    ("FarmRenderFailureRateHigh", ") > 0.10", ") > 0.01"),
    # Two lost attempts are not yet a crash loop.
    ("FarmEngineReplicasCrashLooping", "[30m])) >= 3", "[30m])) >= 2"),
    # Losses to expired leases are a scheduler's, not a replica's.
    ("FarmEngineReplicasCrashLooping", '{cause="replica"}', ""),
    # A budget at half is not low.
    ("FarmBudgetLow", "< 0.1 * farm_budget_dollars", "< 0.6 * farm_budget_dollars"),
    # Without `unless`, a queue that is being served would count as stalled.
    ("FarmQueueStalled", "          unless\n", "          or\n"),
    # A pool short of replicas for a cold start only must not page anyone.
    ("FarmPoolShortOfReplicas", "for: 20m", "for: 1m"),
])
def test_a_broken_alert_fails_its_unit_tests(promtool, tmp_path, alert, original, mutant):
    """The unit tests bite: each of these changes to an alert makes them fail, naming it."""
    text = ALERTS.read_text()
    assert text.count(original) == 1
    (tmp_path / "alerts.yaml").write_text(text.replace(original, mutant))
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = ["alerts.yaml"]
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests still pass with {mutant!r} in {alert}"
    assert f"alertname: {alert}," in result.stdout + result.stderr



# -- the chart's PrometheusRule --------------------------------------------------------------

@pytest.fixture(scope="module")
def helm(helm_binary) -> Path:
    return helm_binary


def rendered(helm: Path, *values: str) -> list[dict]:
    args = [a for value in values for a in ("--set", value)]
    result = run(helm, "template", "rel", REPO / "helm" / "farm", "--namespace", "farm", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_chart_wraps_the_rule_file_in_a_prometheus_rule(helm):
    assert not [d for d in rendered(helm) if d["kind"] == "PrometheusRule"], "off by default"
    docs = [d for d in rendered(helm, "monitoring.prometheusRule.enabled=true",
                                "monitoring.prometheusRule.labels.release=monitoring")
            if d["kind"] == "PrometheusRule"]
    assert len(docs) == 1
    rule = docs[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"] == "rel-farm"
    assert rule["metadata"]["labels"]["release"] == "monitoring"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    # Exactly the file promtool checked, Prometheus templates and all.
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
