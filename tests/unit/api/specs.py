"""Spec fixtures shared by the API unit tests and the API-server validation test.

``valid_cluster()`` is a small valid DualPathCluster; ``INVALID`` lists mutations that make it invalid,
each with the field path the rejection message must name. The unit tests check that the pydantic
models reject every case too (``pydantic=True``); ``tests/integration/test_validation.py`` applies
every case to the real API server.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]


def valid_cluster(name: str = "dp") -> Body:
    """A minimal valid Fixed-mode DualPathCluster (only required fields plus the Fixed counts)."""
    return {
        "apiVersion": "dualpath.io/v1alpha1",
        "kind": "DualPathCluster",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "tiny", "source": "random"},
            "engine": {"image": "dualpath-engine:0.1.0"},
            "ratio": {"prefill": 1, "decode": 2},
            "network": {
                "computeNic": {"resourceName": "nvidia.com/sriov_rdma"},
                "storageNic": {"resourceName": "rdma/hca_shared_devices_a"},
            },
            "storage": {"volume": {"hostPath": {"path": "/var/lib/dualpath"}}},
        },
    }


@dataclass(frozen=True)
class Case:
    """One invalid variant of :func:`valid_cluster`."""

    id: str
    mutate: Callable[[Body], None]
    names: str
    """A field path the API server's message must contain."""
    pydantic: bool = True
    """Whether the pydantic models reject it as well (false only where a rule needs the old object)."""

    def body(self, name: str = "dp") -> Body:
        obj = copy.deepcopy(valid_cluster(name))
        self.mutate(obj)
        return obj


def _set(path: str, value: Any) -> Callable[[Body], None]:
    """A mutation that sets ``spec.<path>`` (dotted, creating sections) to ``value``."""

    def mutate(obj: Body) -> None:
        node = obj["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _all(*mutations: Callable[[Body], None]) -> Callable[[Body], None]:
    def mutate(obj: Body) -> None:
        for m in mutations:
            m(obj)

    return mutate


def _drop(path: str) -> Callable[[Body], None]:
    def mutate(obj: Body) -> None:
        node = obj["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


def _name(value: str) -> Callable[[Body], None]:
    def mutate(obj: Body) -> None:
        obj["metadata"]["name"] = value

    return mutate


_AUTO = _set("ratio.mode", "Auto")
_NODE_PREF = {"weight": 0, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}

INVALID: tuple[Case, ...] = (
    # roles and ratio
    Case("prefill-min-above-max", _all(_set("prefill.min", 3), _set("prefill.max", 2)), "spec.prefill.min"),
    Case("decode-min-above-max", _all(_set("decode.min", 5), _set("decode.max", 4)), "spec.decode.min"),
    Case("fixed-without-prefill-count", _drop("ratio.prefill"), "spec.ratio.prefill"),
    Case("fixed-without-decode-count", _drop("ratio.decode"), "spec.ratio.decode"),
    Case(
        "fixed-prefill-above-max",
        _all(_set("prefill.max", 2), _set("ratio.prefill", 3)),
        "spec.ratio.prefill",
    ),
    Case("fixed-decode-below-min", _all(_set("decode.min", 3), _set("ratio.decode", 2)), "spec.ratio.decode"),
    Case("auto-budget-below-minimum", _all(_AUTO, _set("ratio.gpuBudget", 8)), "spec.ratio.gpuBudget"),
    Case("fixed-counts-exceed-budget", _set("ratio.gpuBudget", 16), "spec.ratio.gpuBudget"),
    Case(
        "auto-with-rebalance-disabled",
        _all(_AUTO, _set("rebalance.enabled", False)),
        "spec.rebalance.enabled",
    ),
    Case("ratio-mode-unknown", _set("ratio.mode", "Manual"), "spec.ratio.mode"),
    Case("ratio-count-negative", _set("ratio.decode", -1), "spec.ratio.decode"),
    Case("gpus-per-pod-12", _set("prefill.gpusPerPod", 12), "spec.prefill.gpusPerPod"),
    Case("gpus-per-pod-0", _set("decode.gpusPerPod", 0), "spec.decode.gpusPerPod"),
    Case("gpus-per-pod-32", _set("prefill.gpusPerPod", 32), "spec.prefill.gpusPerPod"),
    Case("tensor-parallel-not-dividing", _set("model.tensorParallel", 3), "spec.prefill.gpusPerPod"),
    Case(
        "role-resources-request-gpus",
        _set("prefill.resources", {"limits": {"nvidia.com/gpu": 8}}),
        "spec.prefill.resources",
    ),
    Case(
        "resource-quantity-malformed",
        _set("decode.resources", {"requests": {"cpu": "lots"}}),
        "spec.decode.resources",
    ),
    Case(
        "toleration-exists-with-value",
        _set("prefill.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}]),
        "spec.prefill.tolerations[0].value",
    ),
    Case(
        "toleration-effect-unknown",
        _set("decode.tolerations", [{"key": "gpu", "effect": "Sometimes"}]),
        "spec.decode.tolerations[0].effect",
    ),
    Case(
        "affinity-weight-zero",
        _set(
            "prefill.affinity",
            {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [_NODE_PREF]}},
        ),
        "spec.prefill.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
    ),
    # network
    Case("compute-nic-per-gpu-0", _set("network.computeNic.perGpu", 0), "spec.network.computeNic.perGpu"),
    Case(
        "compute-nic-resource-unqualified",
        _set("network.computeNic.resourceName", "sriov_rdma"),
        "spec.network.computeNic.resourceName",
    ),
    Case("storage-nic-gbps-0", _set("network.storageNic.gbps", 0), "spec.network.storageNic.gbps"),
    Case(
        "network-listed-twice",
        _set("network.computeNic.networks", ["sriov-a", "sriov-a"]),
        "spec.network.computeNic.networks[1]",
    ),
    Case(
        "traffic-classes-equal",
        _set("network.trafficClass", {"kvTrafficClass": 5, "modelTrafficClass": 5}),
        "spec.network.trafficClass.kvTrafficClass",
    ),
    Case("network-mode-unknown", _set("network.mode", "Magic"), "spec.network.mode"),
    # storage
    Case("volume-empty", _set("storage.volume", {}), "spec.storage.volume"),
    Case(
        "volume-two-sources",
        _set("storage.volume", {"hostPath": {"path": "/a"}, "emptyDir": {}}),
        "spec.storage.volume",
    ),
    Case("mount-path-relative", _set("storage.mountPath", "kv"), "spec.storage.mountPath"),
    Case("buffer-gib-0", _set("storage.bufferGiB", 0), "spec.storage.bufferGiB"),
    # model
    Case("model-missing", _drop("model"), "spec.model"),
    Case("kv-block-tokens-not-multiple-of-16", _set("model.kvBlockTokens", 40), "spec.model.kvBlockTokens"),
    Case("context-not-block-multiple", _set("model.maxContextTokens", 1000), "spec.model.maxContextTokens"),
    Case(
        "heads-not-multiple-of-kv-heads",
        _set("model.geometry", {"numHeads": 6, "numKvHeads": 4}),
        "spec.model.geometry.numKvHeads",
    ),
    Case("model-source-url", _set("model.source", "https://example.com/w.bin"), "spec.model.source"),
    Case("model-dtype-unknown", _set("model.dtype", "int8"), "spec.model.dtype"),
    # engine
    Case("image-missing", _drop("engine.image"), "spec.engine.image"),
    Case("pull-policy-unknown", _set("engine.pullPolicy", "Sometimes"), "spec.engine.pullPolicy"),
    Case("engine-port-privileged", _set("engine.port", 80), "spec.engine.port"),
    Case(
        "env-reserved-name",
        _set("engine.env", [{"name": "DUALPATH_ROLE", "value": "x"}]),
        "spec.engine.env[0].name",
    ),
    Case(
        "env-duplicate-name",
        _set("engine.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.engine.env[1]",
    ),
    Case(
        "env-value-and-value-from",
        _set(
            "engine.env",
            [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        ),
        "spec.engine.env[0]",
    ),
    # scheduler
    Case("scheduler-replicas-2", _set("scheduler.replicas", 2), "spec.scheduler.replicas"),
    Case("scheduler-policy-unknown", _set("scheduler.policy", "random"), "spec.scheduler.policy"),
    Case(
        "scheduler-tie-break-unknown",
        _set("scheduler.readSideTieBreak", "least_read"),
        "spec.scheduler.readSideTieBreak",
    ),
    Case(
        "api-key-secret-name-invalid",
        _set("scheduler.apiKeySecretRef", {"name": "Bad_Name", "key": "token"}),
        "spec.scheduler.apiKeySecretRef.name",
    ),
    # telemetry and rebalance
    Case(
        "telemetry-prometheus-without-url",
        _set("telemetry.source", "Prometheus"),
        "spec.telemetry.prometheusUrl",
    ),
    Case(
        "telemetry-url-not-http",
        _set("telemetry.prometheusUrl", "ftp://prom:9090"),
        "spec.telemetry.prometheusUrl",
    ),
    Case(
        "telemetry-window-below-interval",
        _set("telemetry", {"interval": "30s", "window": "10s"}),
        "spec.telemetry.window",
    ),
    Case("rebalance-interval-without-unit", _set("rebalance.interval", "30"), "spec.rebalance.interval"),
    Case(
        "rebalance-interval-below-5s",
        _set("rebalance", {"interval": "2s", "cooldown": "1m"}),
        "spec.rebalance.interval",
    ),
    Case(
        "rebalance-cooldown-below-interval",
        _set("rebalance", {"interval": "1m", "cooldown": "30s"}),
        "spec.rebalance.cooldown",
    ),
    Case("rebalance-max-step-0", _set("rebalance.maxStep", 0), "spec.rebalance.maxStep"),
    Case("slo-ttft-0", _set("rebalance.slo", {"ttftMs": 0, "tpotMs": 50}), "spec.rebalance.slo.ttftMs"),
    # metadata
    Case("name-too-long", _name("a" * 41), "metadata.name"),
    Case("name-starts-with-digit", _name("1dp"), "metadata.name"),
)

IMMUTABLE: tuple[tuple[str, Callable[[Body], None], str], ...] = (
    ("kv-block-tokens", _set("model.kvBlockTokens", 128), "spec.model.kvBlockTokens"),
    ("dtype", _set("model.dtype", "float16"), "spec.model.dtype"),
)
"""Updates the API server must refuse: (id, mutation of the created object, field the message names)."""
