"""Argo CD health check for DualPathCluster, run under Lua 5.1 (lupa) in Argo CD's restricted sandbox.

Drives every case of ``gitops/argocd/dualpath.io/DualPathCluster/health_test.yaml`` (Argo CD's upstream
``resource_customizations`` layout) and checks that the argocd-cm snippet in ``docs/gitops`` installs
exactly this script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from dualpath_operator.api import conditions
from dualpath_operator.api.v1alpha1 import cluster

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[3]
CHECK_DIR = ROOT / "gitops" / "argocd" / "dualpath.io" / "DualPathCluster"
SCRIPT = (CHECK_DIR / "health.lua").read_text()
CASES: list[dict[str, Any]] = yaml.safe_load((CHECK_DIR / "health_test.yaml").read_text())["tests"]

# Argo CD (util/lua) opens only the base, table, package and a reduced os library unless
# resource.customizations.useOpenLibs is set: no string, math, io or debug. Run the script with the
# base functions and table only, so a call into another library fails here as it would there.
_SANDBOX = """
local source = ...
local fn, err = loadstring(source, "health.lua")
if fn == nil then error(err) end
return function(obj)
  local env = {
    obj = obj, ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
    tonumber = tonumber, select = select, error = error, pcall = pcall, unpack = unpack, table = table,
  }
  setfenv(fn, env)
  return fn()
end
"""


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def argo_health(obj: dict[str, Any]) -> dict[str, Any]:
    """Evaluate health.lua on ``obj`` the way Argo CD does (Lua 5.1, global ``obj``, restricted libs)."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.execute(_SANDBOX, SCRIPT)
    result = check(_to_lua(runtime, obj))
    return {key: result[key] for key in result}


def _load(path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHECK_DIR / path).read_text())
    return loaded


def test_runtime_is_lua_5_1_like_argo_cds_gopher_lua() -> None:
    assert lua51.LuaRuntime().eval("_VERSION") == "Lua 5.1"


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_matches_the_expected_status_and_message(case: dict[str, Any]) -> None:
    assert argo_health(_load(case["inputPath"])) == case["healthStatus"]


def test_cases_cover_every_fixture_and_every_required_situation() -> None:
    fixtures = {p.relative_to(CHECK_DIR).as_posix() for p in (CHECK_DIR / "testdata").glob("*.yaml")}
    assert fixtures == {case["inputPath"] for case in CASES}
    statuses = {case["healthStatus"]["status"] for case in CASES}
    assert statuses == {"Healthy", "Progressing", "Degraded"}
    required = {"healthy", "progressing", "degraded", "stale-observed-generation", "no-status"}
    assert required <= {Path(case["inputPath"]).stem for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_fixtures_are_objects_the_operator_can_produce(case: dict[str, Any]) -> None:
    obj = _load(case["inputPath"])
    cluster.DualPathCluster.model_validate(obj)
    for condition in (obj.get("status") or {}).get("conditions") or []:
        conditions.ConditionType(condition["type"])
        conditions.Reason(condition["reason"])


def test_an_unobserved_generation_hides_a_stale_healthy_status() -> None:
    obj = _load("testdata/healthy.yaml")
    assert argo_health(obj)["status"] == "Healthy"
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    assert argo_health(obj) == {
        "status": "Progressing",
        "message": f"Spec generation {obj['metadata']['generation']} not yet observed by the operator",
    }


def test_degraded_wins_over_ready() -> None:
    obj = _load("testdata/healthy.yaml")
    obj["status"]["conditions"].append(
        {"type": "Degraded", "status": "True", "reason": "EngineCrashLoop", "message": ""}
    )
    assert argo_health(obj) == {"status": "Degraded", "message": "EngineCrashLoop"}


def test_an_object_without_generation_is_judged_by_its_conditions() -> None:
    obj = _load("testdata/healthy.yaml")
    del obj["metadata"]["generation"]
    assert argo_health(obj)["status"] == "Healthy"


def test_a_script_using_a_library_argo_cd_does_not_open_fails_here() -> None:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.execute(_SANDBOX.replace("...", "'return { status = string.upper(\"x\") }'", 1))
    with pytest.raises(lua51.LuaError, match="string"):
        check(_to_lua(runtime, {"metadata": {}}))


def test_argocd_cm_snippet_installs_exactly_this_script() -> None:
    documents = list(yaml.safe_load_all((ROOT / "docs" / "gitops" / "argocd-cm.yaml").read_text()))
    config_map = next(d for d in documents if d and d.get("kind") == "ConfigMap")
    assert config_map["metadata"]["name"] == "argocd-cm"
    assert config_map["data"]["resource.customizations.health.dualpath.io_DualPathCluster"] == SCRIPT
