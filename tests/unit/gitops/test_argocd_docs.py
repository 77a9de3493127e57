"""The Argo CD Application example in docs/gitops keeps the wave layout and the options it documents."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed (types-jsonschema)
import pytest
import yaml

from dualpath_operator import settings

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "dualpath-operator"
APPS: dict[str, dict[str, Any]] = {
    doc["metadata"]["name"]: doc
    for doc in yaml.safe_load_all((ROOT / "docs" / "gitops" / "applications.yaml").read_text())
    if doc
}


def _wave(app: dict[str, Any]) -> int:
    return int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_waves_order_crds_then_operator_then_clusters() -> None:
    assert {name: _wave(app) for name, app in APPS.items()} == {
        "dualpath-crds": -2,
        "dualpath-operator": -1,
        "dualpath-clusters": 0,
    }
    for app in APPS.values():
        assert app["apiVersion"] == "argoproj.io/v1alpha1"
        assert app["kind"] == "Application"


def test_every_application_applies_and_diffs_server_side() -> None:
    for name, app in APPS.items():
        assert (
            app["metadata"]["annotations"]["argocd.argoproj.io/compare-options"] == "ServerSideDiff=true"
        ), name
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"], name


def test_clusters_skip_the_dry_run_while_their_crd_is_missing() -> None:
    options = APPS["dualpath-clusters"]["spec"]["syncPolicy"]["syncOptions"]
    assert "SkipDryRunOnMissingResource=true" in options
    assert "RespectIgnoreDifferences=true" in options


def test_the_crd_application_never_deletes_the_crd() -> None:
    crds = APPS["dualpath-crds"]
    assert crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    assert "resources-finalizer.argocd.argoproj.io" not in crds["metadata"].get("finalizers", [])


def test_sources_point_at_real_paths_of_this_repository() -> None:
    crds = ROOT / APPS["dualpath-crds"]["spec"]["source"]["path"]
    assert any(crds.glob("*.yaml")), "the CRD Application syncs an empty folder"
    assert ROOT / APPS["dualpath-operator"]["spec"]["source"]["path"] == CHART
    source = APPS["dualpath-clusters"]["spec"]["source"]
    pattern = source["directory"]["include"]
    assert [p.name for p in (ROOT / source["path"]).iterdir() if fnmatch.fnmatch(p.name, pattern)]


def test_operator_application_values_are_valid_chart_values() -> None:
    helm = APPS["dualpath-operator"]["spec"]["source"]["helm"]
    assert helm["skipCrds"] is True, "the CRD is owned by wave -2"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(_deep_merge(defaults, helm["valuesObject"]), schema)


def test_the_documented_field_manager_is_the_operators() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    manager = settings.OperatorConfig().field_manager
    assert defaults["operator"]["fieldManager"] == manager
    readme = (ROOT / "docs" / "gitops" / "README.md").read_text()
    assert f"managedFieldsManagers:\n        - {manager}" in readme
