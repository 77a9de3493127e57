"""``docs/prometheus/dualpath-rules.yaml`` is valid and behaves as its promtool unit tests say.

Runs Debian's ``promtool`` (``.dev/bin/promtool``, or ``PROMTOOL``/``PATH``): ``check rules`` on the rules
file and ``test rules`` on ``docs/prometheus/dualpath-rules.test.yaml`` (input series, expected recorded
values and alerts). A missing promtool fails the test with instructions; it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
RULES = REPO / "docs" / "prometheus" / "dualpath-rules.yaml"
RULE_TESTS = REPO / "docs" / "prometheus" / "dualpath-rules.test.yaml"

REQUIRED_ALERTS = {
    "DualPathOperatorNotReconciling",
    "DualPathOperatorReconcileErrors",
    "DualPathClusterNotReady",
    "DualPathClusterDegraded",
    "DualPathKVOverTCP",
    "DualPathStorageNICImbalance",
}


def promtool() -> str:
    """Path of promtool: ``$PROMTOOL``, ``.dev/bin/promtool``, then ``PATH``; fails clearly if absent."""
    candidates = [os.environ.get("PROMTOOL", ""), str(REPO / ".dev" / "bin" / "promtool")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("promtool")
    if found:
        return found
    pytest.fail(
        "promtool not found: run `make setup` (extracts Debian's prometheus package into .dev/bin), "
        "install prometheus, or set PROMTOOL=/path/to/promtool"
    )


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False, cwd=RULES.parent
    )


def test_promtool_check_rules_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one expected value changed is rejected."""
    shutil.copy(RULES, tmp_path / RULES.name)
    broken = RULE_TESTS.read_text().replace("value: 0.75", "value: 0.5", 1)
    assert broken != RULE_TESTS.read_text()
    (tmp_path / RULE_TESTS.name).write_text(broken)
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "path:dualpath_engine_kv_read_share:ratio1m" in result.stdout + result.stderr


def test_every_required_alert_exists_and_is_tested() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name} has no summary"
        assert annotations.get("description"), f"{name} has no description"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts.keys() <= fired, f"alerts never shown firing in the unit tests: {alerts.keys() - fired}"
