"""Pure manifest rendering: what engine pods request and are allowed, config and hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dualpath_engine import config as engine_config
from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.rendering import engine_config as rendered_config
from dualpath_operator.rendering import manifests

REPO = Path(__file__).resolve().parents[3]
REF = manifests.ClusterRef(name="c", namespace="ns", uid="u")


def spec(mutate: Any = None) -> api.DualPathClusterSpec:
    body = yaml.safe_load((REPO / "examples" / "dualpathcluster-fixed.yaml").read_text())
    if mutate is not None:
        mutate(body["spec"])
    return api.DualPathCluster.model_validate(body).spec


def test_engine_pod_requests_gpus_one_vf_per_gpu_and_the_storage_nic_as_guaranteed() -> None:
    pod = manifests.engine_pod(REF, spec(), "prefill", 0, "cfg")
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["resources"]["limits"]["nvidia.com/sriov_rdma"] == "8"
    assert c["resources"]["limits"]["rdma/hca_shared_devices_a"] == "1"
    assert c["resources"]["requests"] == c["resources"]["limits"]


def test_engine_pod_is_locked_down_but_may_pin_memory() -> None:
    pod = manifests.engine_pod(REF, spec(), "decode", 1, "cfg")
    ps, c = pod["spec"], pod["spec"]["containers"][0]
    assert ps["automountServiceAccountToken"] is False
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    anti = ps["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"labelSelector": {"matchLabels": {"dualpath.io/cluster": "c", "dualpath.io/component": "engine"}},
            "topologyKey": "kubernetes.io/hostname"} in anti  # fmt: skip


def test_multus_annotation_repeats_a_single_compute_network_per_vf_then_storage() -> None:
    def nets(s: dict[str, Any]) -> None:
        s["network"]["computeNic"]["networks"] = ["sriov-compute"]
        s["network"]["storageNic"]["networks"] = ["storage"]
        s["prefill"]["gpusPerPod"] = 2
        s["decode"]["gpusPerPod"] = 2

    pod = manifests.engine_pod(REF, spec(nets), "prefill", 0, "cfg")
    assert (
        pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "sriov-compute,sriov-compute,storage"
    )

    def rails(s: dict[str, Any]) -> None:
        s["network"]["computeNic"]["networks"] = ["rail-0", "rail-1"]

    pod = manifests.engine_pod(REF, spec(rails), "prefill", 0, "cfg")
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rail-0,rail-1"


def test_pod_spec_is_the_same_for_every_ordinal_so_only_real_changes_replace_pods() -> None:
    s = spec()
    a = manifests.engine_pod(REF, s, "decode", 1, "cfg")
    b = manifests.engine_pod(REF, s, "decode", 7, "cfg")
    assert a["spec"] == b["spec"]
    assert (
        a["metadata"]["annotations"]["dualpath.io/template-hash"]
        == b["metadata"]["annotations"]["dualpath.io/template-hash"]
    )

    def new_image(x: dict[str, Any]) -> None:
        x["engine"]["image"] = "dualpath-engine:0.2.0"

    c = manifests.engine_pod(REF, spec(new_image), "decode", 1, "cfg")
    assert (
        c["metadata"]["annotations"]["dualpath.io/template-hash"]
        != a["metadata"]["annotations"]["dualpath.io/template-hash"]
    )
    d = manifests.engine_pod(REF, s, "decode", 1, "other-config")
    assert (
        d["metadata"]["annotations"]["dualpath.io/template-hash"]
        != a["metadata"]["annotations"]["dualpath.io/template-hash"]
    )


def test_rendered_engine_and_scheduler_config_load_with_the_engines_own_loader(tmp_path: Path) -> None:
    data = rendered_config.render("c", "ns", spec())
    (tmp_path / "engine.yaml").write_text(data["engine.yaml"])
    (tmp_path / "scheduler.yaml").write_text(data["scheduler.yaml"])
    eng = engine_config.load_engine_config(
        tmp_path / "engine.yaml", {"DUALPATH_ROLE": "decode", "DUALPATH_GROUP_ID": "3"}
    )
    assert eng.role == "decode" and eng.group_id == 3
    assert eng.model.num_layers == 16 and eng.kv.block_tokens == 64
    assert eng.scheduler_url == "http://c-scheduler.ns.svc:8000"
    sch = engine_config.load_scheduler_config(tmp_path / "scheduler.yaml", {})
    assert sch.compute_quota_ms == 300 and sch.admin_token_file == "/etc/dualpath/admin/token"


def test_children_never_carry_argo_cds_tracking_label() -> None:
    _, children = manifests.static_children(REF, spec())
    for m in [*children, manifests.engine_pod(REF, spec(), "prefill", 0, "cfg")]:
        assert "app.kubernetes.io/instance" not in m["metadata"]["labels"]
        assert m["metadata"]["ownerReferences"][0]["controller"] is True


def test_nic_emulation_renders_budgets_and_a_hostpath_sysfs_tree(tmp_path: Path) -> None:
    def emulate(s: dict[str, Any]) -> None:
        s["network"]["emulation"] = {"enabled": True, "storageBudgetGbps": 8}

    s = spec(emulate)
    pod = manifests.engine_pod(REF, s, "decode", 0, "cfg")
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["emulated-sysfs"]["hostPath"]["path"] == "/var/lib/dualpath/sys"
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["emulated-sysfs"] == rendered_config.EMULATED_SYSFS_DIR
    (tmp_path / "engine.yaml").write_text(rendered_config.render("c", "ns", s)["engine.yaml"])
    eng = engine_config.load_engine_config(tmp_path / "engine.yaml", {"DUALPATH_ROLE": "decode"})
    assert eng.network.emulate is True and eng.network.sysfs_root == rendered_config.EMULATED_SYSFS_DIR
    assert eng.network.storage_nic.budget_bytes_per_s == 1e9
    plain = manifests.engine_pod(REF, spec(), "decode", 0, "cfg")
    assert "emulated-sysfs" not in {v["name"] for v in plain["spec"]["volumes"]}


@pytest.mark.parametrize(("crd_value", "engine_value"), [("Prefill", "prefill"), ("LeastRead", "least_read")])
def test_read_side_tie_break_reaches_the_scheduler_config(
    tmp_path: Path, crd_value: str, engine_value: str
) -> None:
    def tie_break(s: dict[str, Any]) -> None:
        s.setdefault("scheduler", {})["readSideTieBreak"] = crd_value

    (tmp_path / "scheduler.yaml").write_text(
        rendered_config.render("c", "ns", spec(tie_break))["scheduler.yaml"]
    )
    sch = engine_config.load_scheduler_config(tmp_path / "scheduler.yaml", {})
    assert sch.read_side_tie_break == engine_value


def test_read_side_tie_break_defaults_to_the_papers_rule(tmp_path: Path) -> None:
    def unset(s: dict[str, Any]) -> None:
        s.get("scheduler", {}).pop("readSideTieBreak", None)

    (tmp_path / "scheduler.yaml").write_text(rendered_config.render("c", "ns", spec(unset))["scheduler.yaml"])
    assert (
        engine_config.load_scheduler_config(tmp_path / "scheduler.yaml", {}).read_side_tie_break == "prefill"
    )
