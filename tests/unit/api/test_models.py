"""The pydantic models accept what the API accepts and reject what it rejects; examples round-trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from dualpath_operator.api.v1alpha1 import cluster, common, spec, status
from tests.unit.api import specs

pytestmark = pytest.mark.timeout(30)

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("dualpathcluster-*.yaml"))


def test_minimal_cluster_parses_with_documented_defaults() -> None:
    obj = cluster.DualPathCluster.model_validate(specs.valid_cluster())
    s = obj.spec
    assert s.model.kv_block_tokens == 64
    assert s.model.dtype is spec.ModelDtype.BFLOAT16
    assert s.scheduler.compute_quota_ms == 300
    assert s.scheduler.replicas == 1
    assert s.scheduler.read_side_tie_break is spec.ReadSideTieBreak.PREFILL  # the paper's rule
    assert s.ratio.mode is spec.RatioMode.FIXED
    assert (s.ratio.prefill, s.ratio.decode) == (1, 2)
    assert s.network.mode is spec.NetworkMode.DEVICE_PLUGIN
    assert s.network.compute_nic.per_gpu == 1
    assert s.rebalance.interval == "30s"
    assert obj.status is None


@pytest.mark.parametrize("case", [c for c in specs.INVALID if c.pydantic], ids=lambda c: c.id)
def test_models_reject_every_invalid_case(case: specs.Case) -> None:
    with pytest.raises(pydantic.ValidationError):
        cluster.DualPathCluster.model_validate(case.body())


def test_models_are_frozen() -> None:
    obj = cluster.DualPathCluster.model_validate(specs.valid_cluster())
    with pytest.raises(pydantic.ValidationError):
        obj.spec.ratio.prefill = 5  # type: ignore[misc]


def test_unknown_fields_are_rejected_not_ignored() -> None:
    body = specs.valid_cluster()
    body["spec"]["ratio"]["prefil"] = 1
    with pytest.raises(pydantic.ValidationError, match="prefil"):
        cluster.DualPathCluster.model_validate(body)


def test_fields_accept_python_names_too() -> None:
    ratio = spec.RatioSpec(mode=spec.RatioMode.AUTO, gpu_budget=16)
    assert ratio.model_dump(by_alias=True, exclude_none=True) == {"mode": "Auto", "gpuBudget": 16}


def test_buffer_gib_alias_keeps_the_unit_spelling() -> None:
    body = specs.valid_cluster()
    body["spec"]["storage"]["bufferGiB"] = 8
    obj = cluster.DualPathCluster.model_validate(body)
    assert obj.spec.storage.buffer_gib == 8
    assert obj.model_dump(by_alias=True)["spec"]["storage"]["bufferGiB"] == 8


def test_a_cluster_with_status_as_the_operator_writes_it_parses() -> None:
    body: dict[str, Any] = specs.valid_cluster()
    body["status"] = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllReady",
                "message": "",
                "lastTransitionTime": "2026-11-28T12:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "prefill": {"replicas": 1, "ready": 1},
        "decode": {"replicas": 2, "ready": 2},
        "ratio": "1P:2D",
        "desiredRatio": "1P:2D",
        "scheduler": {"endpoint": "http://dp-scheduler.ns:8000", "ready": True},
        "pathWeights": [
            {
                "node": "n1",
                "snicCapacityBps": 50_000_000_000,
                "snicUtilization": 0.5,
                "cnicHeadroom": 0.9,
                "weight": 0.25,
            }
        ],
        "lastDecision": {
            "time": "2026-11-28T12:00:00Z",
            "action": "Hold",
            "reason": "cooldown",
            "inputs": {"a": "1"},
        },
    }
    obj = cluster.DualPathCluster.model_validate(body)
    assert obj.status is not None
    assert obj.model_dump(mode="json", by_alias=True, exclude_unset=True) == body


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip_through_the_models(path: Path) -> None:
    loaded = yaml.safe_load(path.read_text())
    obj = cluster.DualPathCluster.model_validate(loaded)
    assert obj.model_dump(mode="json", by_alias=True, exclude_unset=True) == loaded


def test_both_example_modes_are_shipped() -> None:
    modes = {
        cluster.DualPathCluster.model_validate(yaml.safe_load(p.read_text())).spec.ratio.mode
        for p in EXAMPLES
    }
    assert modes == {spec.RatioMode.FIXED, spec.RatioMode.AUTO}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0), ("1h1m1s", 3661.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert common.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "1.5s", "s", "-1s", "1d", "", "1m 30s"])
def test_parse_duration_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        common.parse_duration(text)


def test_ratio_strings_round_trip() -> None:
    assert status.format_ratio(2, 4) == "2P:4D"
    assert status.parse_ratio("2P:4D") == (2, 4)
    with pytest.raises(ValueError, match="invalid ratio"):
        status.parse_ratio("2:4")
    with pytest.raises(ValueError, match=">= 0"):
        status.format_ratio(-1, 2)


@pytest.mark.parametrize("value", [2, "500m", "4Gi", "1.5", "1e3"])
def test_quantities_accept_kubernetes_syntax(value: int | str) -> None:
    r = cluster.DualPathCluster.model_validate(
        specs.Case(
            "q",
            lambda b: b["spec"].setdefault("prefill", {}).update(resources={"requests": {"cpu": value}}),
            "",
        ).body()
    ).spec.prefill.resources
    assert r is not None and r.requests == {"cpu": value}
