"""Every metric name in the Grafana dashboard and the Prometheus rules is one the code really exports.

The exported names come from the registries the operator, scheduler and engine processes build
(``exported.py``); the used names from every PromQL expression of ``docs/grafana/dualpath.json``
(panel targets and variable queries) and ``docs/prometheus/dualpath-rules.yaml``. The dashboard's
expressions are also parsed by promtool (as recording rules, Grafana variables substituted).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.observability import exported
from tests.unit.observability.test_prometheus_rules import promtool

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "docs" / "grafana" / "dualpath.json"
RULES = REPO / "docs" / "prometheus" / "dualpath-rules.yaml"

GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$snic": "mlx5_storage[0-9]+|mlx5_s[0-9]+",
    "$node": ".*",
}

DASHBOARD_MUST_SHOW = {
    "node_infiniband_port_data_received_bytes_total": "storage/compute NIC throughput per node",
    "node_infiniband_port_data_transmitted_bytes_total": "compute NIC throughput per node",
    "dualpath_engine_kv_read_bytes_total": "share of KV read on each path",
    "dualpath_operator_cluster_ready_replicas": "P:D",
    "dualpath_operator_cluster_ready": "readiness",
    "dualpath_scheduler_time_to_first_token_seconds_bucket": "TTFT",
    "dualpath_scheduler_time_per_output_token_seconds_bucket": "TPOT",
    "dualpath_operator_decisions_total": "operator decisions",
    "dualpath_operator_reconcile_total": "reconcile errors",
    "dualpath_engine_transport_info": "transport kind",
}


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    return exported.exported_names()


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(node: Any) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    exprs = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in panels(dashboard())
        for t in p.get("targets", [])
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append((f"variable {var['name']}", query))
    return exprs


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('rate(a_total{x="y",z=~"q(w)"}[$__rate_interval])', {"a_total"}),
        (
            "sum by (node, le) (rate(h_bucket[5m] offset 1m)) / ignoring (le) group_left () c",
            {"h_bucket", "c"},
        ),
        ("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m]))) > 1e-3", {"x_bucket"}),
        ("time() - g and on () (count(n:rec:ratio) > 0)", {"g", "n:rec:ratio"}),
        ('max by (pod) (t{kind="tcp"}) == bool 1 unless absent(m)', {"t", "m"}),
        ('label_values(node_infiniband_info{node=~"a|b"}, node)', {"node_infiniband_info"}),
    ],
)
def test_promql_names_are_extracted(expr: str, names: set[str]) -> None:
    assert exported.grafana_label_values_metric(expr) == names


def test_exported_names_cover_all_processes(exported_names: set[str]) -> None:
    """The registries really were built: a name from each process and of each sample kind is there."""
    for name in (
        "dualpath_operator_reconcile_total",
        "dualpath_operator_reconcile_duration_seconds_bucket",
        "dualpath_operator_cluster_ready",
        "dualpath_scheduler_time_to_first_token_seconds_count",
        "dualpath_scheduler_path_weight_bytes_per_second",
        "dualpath_engine_nic_bytes_total",
        "dualpath_engine_transport_info",
        "dualpath_engine_storage_read_seconds_sum",
        "dualpath_engine_running_requests",
    ):
        assert name in exported_names
    assert "dualpath_operator_reconcile" not in exported_names  # counters only as _total


def test_every_dashboard_metric_is_exported(exported_names: set[str]) -> None:
    unknown: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs():
        names = exported.grafana_label_values_metric(expr)
        assert names, f"{where}: no metric in {expr!r}"
        if names - exported_names:
            unknown[where] = names - exported_names
    assert not unknown, f"metric names the code does not export: {unknown}"


def test_every_rule_metric_is_exported_or_recorded(exported_names: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    unknown: dict[str, set[str]] = {}
    for rule in rules():
        names = exported.promql_metric_names(rule["expr"])
        assert names, f"{rule.get('record') or rule.get('alert')}: no metric"
        if names - exported_names - recorded:
            unknown[rule.get("record") or rule["alert"]] = names - exported_names - recorded
    assert not unknown, f"metric names the code does not export: {unknown}"


def test_dashboard_shows_what_operators_need() -> None:
    used = set().union(*(exported.grafana_label_values_metric(e) for _, e in dashboard_exprs()))
    missing = {name: why for name, why in DASHBOARD_MUST_SHOW.items() if name not in used}
    assert not missing, f"dashboard lacks: {missing}"


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert data["uid"] and data["title"]
    variables = {v["name"] for v in data["templating"]["list"]}
    assert {"datasource", "node", "snic"} <= variables
    for panel in panels(data):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert panel.get("description"), panel["title"]


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard expression (as a recording rule, Grafana variables substituted)."""
    recording = []
    for index, (_, expr) in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_SUBSTITUTIONS.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
        recording.append({"record": f"dashboard:expr_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "expr",
    [
        "rate(dualpath_engine_kv_read_byte_total[5m])",  # typo
        "rate(dualpath_operator_reconcile[5m])",  # counter without _total
        "dualpath_scheduler_time_to_first_token_seconds",  # histogram without a suffix
    ],
)
def test_a_name_the_code_does_not_export_is_reported(expr: str, exported_names: set[str]) -> None:
    assert exported.promql_metric_names(expr) - exported_names
