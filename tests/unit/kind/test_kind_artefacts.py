"""The kind artefacts (``tests/e2e/kind/``) are valid and ``run.sh`` does what docs/kind.md says.

Docker is not available here, so ``run.sh`` runs against recording stand-ins for docker, kind, kubectl,
helm, curl and the project's Python (placed first on ``PATH``): the test checks the commands it issues
and their order, the JSON patches it sends to each node's ``/status``, the rendered kind config, the
image build arguments, the chart values and the e2e invocation, plus failure and cleanup behaviour.
The YAML is parsed and the manifests are validated against the Kubernetes 1.36 schemas; the script
passes ``bash -n`` and shellcheck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
KIND = REPO / "tests" / "e2e" / "kind"
RUN = KIND / "run.sh"
KUBE_VERSION = "1.36.3"
WORKERS = ("dualpath-worker", "dualpath-worker2", "dualpath-worker3", "dualpath-worker4")

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------ static


def test_run_sh_parses() -> None:
    result = subprocess.run(["bash", "-n", str(RUN)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(RUN, os.X_OK), "run.sh must be executable"


def test_run_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck (Debian package 'shellcheck')")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", str(RUN)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def kind_config(shared: str = "/tmp/shared") -> dict[str, Any]:
    text = (KIND / "cluster.yaml").read_text().replace("@SHARED_DIR@", shared)
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def test_kind_config_has_workers_sharing_the_kv_storage() -> None:
    config = kind_config()
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert config["networking"]["apiServerAddress"] == "127.0.0.1"
    roles = [node["role"] for node in config["nodes"]]
    assert roles.count("control-plane") == 1
    assert 3 <= roles.count("worker") <= 4
    for node in config["nodes"]:
        if node["role"] == "worker":
            assert node["extraMounts"] == [
                {"hostPath": "/tmp/shared/storage", "containerPath": "/var/lib/dualpath/storage"}
            ]


def telemetry_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KIND / "nic-telemetry.yaml").read_text()) if doc]


def test_telemetry_manifests_are_valid_kubernetes_objects() -> None:
    docs = telemetry_docs()
    assert {doc["kind"] for doc in docs} == {"Namespace", "DaemonSet", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_node_exporter_reads_the_fake_sysfs_tree_run_sh_prepares() -> None:
    (daemonset,) = [doc for doc in telemetry_docs() if doc["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert "--collector.infiniband" in args
    assert "--collector.disable-defaults" in args
    (sysfs_arg,) = [a for a in args if a.startswith("--path.sysfs=")]
    (mount,) = container["volumeMounts"]
    assert sysfs_arg == f"--path.sysfs={mount['mountPath']}"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    host_path = volume["hostPath"]["path"]
    assert host_path == "/var/lib/dualpath/sys"
    assert host_path in RUN.read_text(), "run.sh must create the hostPath directory on each node"
    selector = pod["nodeSelector"]
    assert selector == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu.present=true" in RUN.read_text(), "run.sh must set the node selector's label"


# ------------------------------------------------------------------------------------------ behaviour

STUB = """#!/usr/bin/env bash
# records its invocation as one JSON line
python3 - "$(basename "$0")" "$@" <<'PY' >>"$STUB_LOG"
import json, os, sys
print(json.dumps({"tool": sys.argv[1], "args": sys.argv[2:], "kubeconfig": os.environ.get("KUBECONFIG", ""),
                  "env": {k: v for k, v in os.environ.items() if k.startswith("DUALPATH_")}}))
PY
tool=$(basename "$0")
case "$tool $1" in
  "kind create")
    while (($#)); do if [[ $1 == --config ]]; then cp "$2" "$STUB_DIR/kind-config.yaml"; fi; shift; done ;;
  "kubectl proxy")
    echo "Starting to serve on 127.0.0.1:34567"
    exec sleep 300 ;;
  "kubectl get")
    if [[ $* == *"get nodes"* ]]; then echo -n "$STUB_WORKERS"; else echo -n "$STUB_NODE_GPUS"; fi ;;
  "curl "*)
    while (($#)); do if [[ $1 == --data ]]; then echo "$2" >>"$STUB_DIR/patches"; fi; shift; done ;;
esac
exit "${STUB_FAIL_EXIT:-0}"
"""


def run_script(tmp_path: Path, *args: str, gpus_reported: str = "8") -> tuple[int, list[dict[str, Any]], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm", "curl", "python"):
        stub = bin_dir / tool
        stub.write_text(STUB)
        stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_DIR": str(tmp_path),
        "STUB_WORKERS": " ".join(WORKERS),
        "STUB_NODE_GPUS": gpus_reported,
        "PYTHON": str(bin_dir / "python"),
        "DUALPATH_KIND_NODE_WAIT_S": "2",
    }
    result = subprocess.run(
        ["bash", str(RUN), *args], capture_output=True, text=True, env=env, timeout=50, check=False
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result.returncode, calls, result.stderr


def commands(calls: list[dict[str, Any]]) -> list[str]:
    return [" ".join([call["tool"], *call["args"][:2]]) for call in calls]


def test_run_sh_sets_up_kind_and_runs_the_e2e_suite(tmp_path: Path) -> None:
    rc, calls, stderr = run_script(tmp_path, "--", "-k", "smoke")
    assert rc == 0, stderr
    order = commands(calls)
    steps = [
        "kind create cluster",
        "kubectl proxy --address=127.0.0.1",
        "curl --silent --show-error",
        "kubectl label node",
        "docker exec dualpath-worker",
        "docker build -f",
        "kind load docker-image",
        "helm upgrade --install",
        "kubectl apply -f",
        "python -m pytest",
        "kind delete cluster",
    ]
    positions = [next(i for i, c in enumerate(order) if c.startswith(step)) for step in steps]
    assert positions == sorted(positions), order

    # every call targets the cluster's own kubeconfig, never the user's
    kubeconfig = calls[0]["kubeconfig"]
    assert kubeconfig.startswith(str(tmp_path)) and kubeconfig.endswith("/kubeconfig")
    assert all(call["kubeconfig"] == kubeconfig for call in calls)
    create = calls[0]["args"]
    assert create[create.index("--kubeconfig") + 1] == kubeconfig

    # the kind config is the repo's, with an existing shared storage directory
    config = yaml.safe_load((tmp_path / "kind-config.yaml").read_text())
    mounts = {m["hostPath"] for n in config["nodes"] for m in n.get("extraMounts", [])}
    (shared,) = mounts
    assert shared.startswith(str(tmp_path)) and shared.endswith("/storage")

    # one status patch per worker with the three extended resources in capacity and allocatable
    patches = [json.loads(line) for line in (tmp_path / "patches").read_text().splitlines()]
    assert len(patches) == len(WORKERS)
    expected = {
        (op, f"/status/{section}/{res}", value)
        for section in ("capacity", "allocatable")
        for res, value in (("nvidia.com~1gpu", "8"), ("nvidia.com~1sriov_rdma", "8"))
        for op in ("add",)
    } | {("add", f"/status/{s}/rdma~1hca_shared_devices_a", "1") for s in ("capacity", "allocatable")}
    for patch in patches:
        assert {(p["op"], p["path"], p["value"]) for p in patch} == expected
    urls = [c["args"][-1] for c in calls if c["tool"] == "curl"]
    assert urls == [f"http://127.0.0.1:34567/api/v1/nodes/{w}/status" for w in WORKERS]
    curl = next(c["args"] for c in calls if c["tool"] == "curl")
    assert "Content-Type: application/json-patch+json" in curl and "PATCH" in curl

    labels = [c["args"] for c in calls if c["tool"] == "kubectl" and c["args"][:2] == ["label", "node"]]
    assert [args[2] for args in labels] == list(WORKERS)
    assert {"nvidia.com/gpu.present=true", "nvidia.com/gpu.count=8"} <= set(labels[0])

    builds = [c["args"] for c in calls if c["tool"] == "docker" and c["args"][0] == "build"]
    engine, operator = builds
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in engine and "TORCH_EXTRA=" in engine
    assert engine[engine.index("-f") + 1] == str(REPO / "engine_image" / "Dockerfile")
    assert operator[operator.index("-f") + 1] == str(REPO / "operator" / "Dockerfile")
    loads = [c["args"][-1] for c in calls if c["tool"] == "kind" and c["args"][0] == "load"]
    assert loads == ["dualpath-engine:0.1.0", "dualpath-operator:0.1.0"]

    helm = next(c["args"] for c in calls if c["tool"] == "helm")
    assert str(REPO / "charts" / "dualpath-operator") in helm
    assert {"image.repository=dualpath-operator", "image.tag=0.1.0"} <= set(helm)

    apply = next(c["args"] for c in calls if c["tool"] == "kubectl" and c["args"][0] == "apply")
    assert apply[-1] == str(KIND / "nic-telemetry.yaml")

    pytest_call = next(c for c in calls if c["tool"] == "python")
    assert pytest_call["args"] == ["-m", "pytest", "-m", "e2e", "tests/e2e", "-k", "smoke"]
    assert pytest_call["env"]["DUALPATH_ENGINE_IMAGE"] == "dualpath-engine:0.1.0"

    # the proxy was stopped and the temporary directory removed with the cluster
    assert not any(p.name.startswith("dualpath-kind.") for p in tmp_path.iterdir())


def test_run_sh_keep_and_skip_flags(tmp_path: Path) -> None:
    rc, calls, stderr = run_script(
        tmp_path, "--keep", "--skip-build", "--no-tests", "--gpus", "2", gpus_reported="2"
    )
    assert rc == 0, stderr
    order = commands(calls)
    assert not any(c.startswith(("docker build", "python", "kind delete")) for c in order), order
    assert any(c.startswith("kind load") for c in order)
    assert "kind delete cluster --name dualpath" in stderr  # tells the user how to clean up
    patch = json.loads((tmp_path / "patches").read_text().splitlines()[0])
    assert {p["value"] for p in patch if "gpu" in p["path"] or "sriov" in p["path"]} == {"2"}


def test_run_sh_fails_when_the_node_does_not_advertise_the_gpus(tmp_path: Path) -> None:
    rc, calls, stderr = run_script(tmp_path, gpus_reported="0")
    assert rc != 0
    assert "allocatable nvidia.com/gpu is '0', expected 8" in stderr
    order = commands(calls)
    assert not any(c.startswith(("helm", "python")) for c in order)
    assert order[-1].startswith("kind delete cluster"), "a failed run deletes its cluster"


def test_run_sh_rejects_bad_arguments(tmp_path: Path) -> None:
    rc, calls, stderr = run_script(tmp_path, "--gpus", "eight")
    assert rc != 0 and "--gpus must be a positive integer" in stderr
    assert calls == []
