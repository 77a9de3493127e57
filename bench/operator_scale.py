"""Operator at scale on the local real control plane (issue 7 item 6).

    python -m bench.operator_scale [--nodes 100] [--clusters 10] [--markdown]

Scenarios, each on a fresh local cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok):

1. one DualPathCluster with N/2 prefill + N/2 decode engine groups on N fake 8-GPU RDMA nodes: time
   from apply to every engine pod Running, and to status Ready;
2. K DualPathClusters at once sharing the N nodes (N/K groups each);
3. steady state: Kubernetes API requests per reconcile pass (the operator's own counter) and the
   operator's resident memory.

Absolute times depend on this 2-core machine; the goal (<= 30 s for 100 nodes) is stated against it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import yaml
from lightkube import Client, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Namespace, Pod

from bench import report
from tests.cluster import harness, nodes, processes

REPO = Path(__file__).resolve().parents[1]
DPC = create_namespaced_resource("dualpath.io", "v1alpha1", "DualPathCluster", "dualpathclusters")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metric(port: int, name: str) -> float:
    text = harness.http_get(f"http://127.0.0.1:{port}/metrics").decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def _body(name: str, prefill: int, decode: int) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "dualpathcluster-fixed.yaml").read_text())
    body = copy.deepcopy(body)
    body["metadata"] = {"name": name}
    spec = body["spec"]
    spec["prefill"].update({"min": 1, "max": max(prefill, 1)})
    spec["decode"].update({"min": 1, "max": max(decode, 1)})
    spec["ratio"].update({"mode": "Fixed", "prefill": prefill, "decode": decode})
    return body


class Bench:
    def __init__(self, run_dir: Path, node_count: int) -> None:
        self.cluster = harness.Cluster(run_dir=run_dir, api_qps=400).start()
        self.kube = Client(KubeConfig.from_file(str(self.cluster.kubeconfig)), field_manager="bench")
        for path in sorted((REPO / "crds").glob("*.yaml")):
            crd = CustomResourceDefinition.from_dict(yaml.safe_load(path.read_text()))
            self.kube.apply(crd, force=True)  # type: ignore[call-overload]
        harness.wait_for(
            "CRD served", lambda: isinstance(list(self.kube.list(DPC, namespace="default")), list), 30
        )
        factory = nodes.NodeFactory(self.kube)
        t0 = time.monotonic()
        factory.create_many("gpu", node_count, "h200")
        self.nodes_ready_s = time.monotonic() - t0
        self.metrics_port = processes.free_port()
        live = processes.free_port()
        self.operator = processes.start(
            "operator",
            [sys.executable, "-m", "dualpath_operator", f"--liveness=http://127.0.0.1:{live}/healthz"],
            run_dir / "logs",
            env={
                "KUBECONFIG": str(self.cluster.kubeconfig),
                "DUALPATH_OPERATOR_METRICS_PORT": str(self.metrics_port),
                # Steady-state passes come from the resync; make them frequent enough to measure.
                "DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "5",
            },
            cwd=REPO,
        )
        harness.wait_for(
            "operator liveness", lambda: harness.http_get(f"http://127.0.0.1:{live}/healthz") != b"", 60
        )

    def stop(self) -> None:
        self.operator.stop()
        self.cluster.stop()

    def running_engines(self, namespace: str) -> int:
        pods = self.kube.list(Pod, namespace=namespace, labels={"dualpath.io/component": "engine"})
        return sum(1 for p in pods if p.status is not None and p.status.phase == "Running")

    def ready(self, namespace: str, name: str) -> bool:
        st = self.kube.get(DPC, name=name, namespace=namespace).to_dict().get("status") or {}  # type: ignore[no-untyped-call]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))

    def scenario(
        self, namespace: str, clusters: list[tuple[str, int, int]], timeout_s: float = 300
    ) -> dict[str, float]:
        self.kube.create(cast(Namespace, Namespace.from_dict({"metadata": {"name": namespace}})))
        harness.wait_for("namespace SA", lambda: bool(self.kube.get(Namespace, name=namespace)), 30)
        total = sum(p + d for _, p, d in clusters)
        t0 = time.monotonic()
        for name, p, d in clusters:
            obj = DPC.from_dict({**_body(name, p, d), "metadata": {"name": name, "namespace": namespace}})
            self.kube.apply(obj, field_manager="bench", force=True)
        harness.wait_for(
            f"{total} engine pods Running", lambda: self.running_engines(namespace) >= total, timeout_s, 0.1
        )
        running_s = time.monotonic() - t0
        harness.wait_for(
            "every cluster Ready",
            lambda: all(self.ready(namespace, n) for n, _, _ in clusters),
            timeout_s,
            0.2,
        )
        ready_s = time.monotonic() - t0
        return {"engine_pods": float(total), "running_s": running_s, "ready_s": ready_s}

    def steady_state(self, passes: int = 5, timeout_s: float = 180) -> dict[str, float]:
        """Requests per pass of settled clusters: wait for `passes` more passes, diff the counters."""
        c0 = _metric(self.metrics_port, "dualpath_operator_api_requests_per_reconcile_count")
        s0 = _metric(self.metrics_port, "dualpath_operator_api_requests_per_reconcile_sum")
        harness.wait_for(
            f"{passes} reconcile passes",
            lambda: (
                _metric(self.metrics_port, "dualpath_operator_api_requests_per_reconcile_count")
                >= c0 + passes
            ),
            timeout_s,
            0.5,
        )
        c1 = _metric(self.metrics_port, "dualpath_operator_api_requests_per_reconcile_count")
        s1 = _metric(self.metrics_port, "dualpath_operator_api_requests_per_reconcile_sum")
        return {
            "requests_per_pass": (s1 - s0) / max(1.0, c1 - c0),
            "operator_rss_mib": _rss_mib(self.operator.pid),
        }


def run(node_count: int, cluster_count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"nodes": node_count, "clusters": cluster_count}
    with tempfile.TemporaryDirectory(prefix="opscale-") as tmp:
        b = Bench(Path(tmp) / "one", node_count)
        try:
            results["nodes_ready_s"] = b.nodes_ready_s
            half = node_count // 2
            results["one_cluster"] = b.scenario("scale-one", [("big", half, node_count - half)])
            results["one_cluster_steady"] = b.steady_state()
        finally:
            b.stop()
        b = Bench(Path(tmp) / "many", node_count)
        try:
            per = node_count // cluster_count
            spec = [(f"c{i}", per // 2, per - per // 2) for i in range(cluster_count)]
            results["many_clusters"] = b.scenario("scale-many", spec)
            results["many_clusters_steady"] = b.steady_state(passes=2 * cluster_count)
        finally:
            b.stop()
    return results


def _k8s_version() -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1]
    return "unknown"


def markdown(r: dict[str, Any]) -> str:
    one, many = r["one_cluster"], r["many_clusters"]
    steady_one, steady_many = r["one_cluster_steady"], r["many_clusters_steady"]
    command = f"python -m bench.operator_scale --nodes {r['nodes']} --clusters {r['clusters']}"
    header = f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} cores)"
    rows = [
        (f"1 cluster, {r['nodes']} nodes", one, "<= 30 s"),
        (f"{r['clusters']} clusters at once", many, ""),
    ]
    lines = [
        "## Operator at scale (local control plane)",
        "",
        f"{header}, Kubernetes {_k8s_version()}; command: `{command}`.",
        "",
        "| scenario | engine pods | apply -> all Running | apply -> Ready | goal |",
        "|---|---|---|---|---|",
    ]
    for label, res, goal in rows:
        pods, running, ready = res["engine_pods"], res["running_s"], res["ready_s"]
        lines.append(f"| {label} | {pods:.0f} | {running:.1f} s | {ready:.1f} s | {goal} |")
    lines += [
        "",
        f"Steady state: {steady_one['requests_per_pass']:.1f} API requests per reconcile pass with one "
        f"cluster of {one['engine_pods']:.0f} engine groups (the reads of gather plus one server-side apply "
        "per static child, which the API server answers without a write), "
        f"{steady_many['requests_per_pass']:.1f} per pass with {r['clusters']} clusters; operator RSS "
        f"{steady_one['operator_rss_mib']:.0f} MiB (1 cluster) and "
        f"{steady_many['operator_rss_mib']:.0f} MiB ({r['clusters']} clusters).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--markdown", action="store_true", help="print a docs/benchmarks.md section")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    r = run(args.nodes, args.clusters)
    print(markdown(r) if args.markdown or args.write_docs else json.dumps(r, indent=2))
    if args.write_docs:
        report.write_sections(REPO / "docs" / "benchmarks.md", {"operator-scale": markdown(r)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
