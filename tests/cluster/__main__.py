"""``python -m tests.cluster {up,down,status,demo}``: the local cluster from the command line.

- ``up``: start the control plane in ``.dev/cluster``, create fake GPU/RDMA nodes, link
  ``.dev/kubeconfig``, leave it running (``make cluster-up``).
- ``down``: stop the processes recorded in ``.dev/cluster/state.json``, by PID (``make cluster-down``).
- ``status``: print the components and nodes of a running cluster.
- ``demo``: up with a throwaway run dir, print the nodes with their GPU and NIC capacity, tear down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightkube import Client, KubeConfig
from lightkube.resources.core_v1 import Node

from tests.cluster import harness, nodes

DEV = harness.REPO_ROOT / ".dev"
RUN_DIR = DEV / "cluster"


def _client(kubeconfig: Path) -> Client:
    return Client(KubeConfig.from_file(str(kubeconfig)), field_manager="dualpath-harness")


def _say(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def print_nodes(client: Client) -> None:
    cols = (
        "NAME",
        "PRODUCT",
        "GPUS",
        nodes.COMPUTE_NIC_RESOURCE,
        nodes.STORAGE_NIC_RESOURCE,
        "POD CIDR",
        "READY",
    )
    rows = [cols]
    for n in sorted(
        client.list(Node), key=lambda n: n.metadata.name if n.metadata and n.metadata.name else ""
    ):
        alloc = (n.status.allocatable if n.status else None) or {}
        labels = (n.metadata.labels if n.metadata else None) or {}
        rows.append(
            (
                str(n.metadata.name if n.metadata else "?"),
                labels.get("nvidia.com/gpu.product", "-"),
                str(alloc.get(nodes.GPU_RESOURCE, "0")),
                str(alloc.get(nodes.COMPUTE_NIC_RESOURCE, "0")),
                str(alloc.get(nodes.STORAGE_NIC_RESOURCE, "0")),
                str(n.spec.podCIDR if n.spec else "-"),
                "True" if nodes.node_ready(n) else "False",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), flush=True)


def up(run_dir: Path, count: int, profile: str) -> harness.Cluster:
    if (run_dir / "state.json").exists():
        existing = harness.Cluster.from_state(run_dir)
        if existing.procs:
            raise SystemExit(f"a cluster is already running from {run_dir}: run `make cluster-down` first")
        shutil.rmtree(run_dir)
    _say(f"starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok in {run_dir}")
    cluster = harness.Cluster(run_dir=run_dir).start()
    _say(f"control plane ready in {cluster.startup_seconds:.1f}s at {cluster.server}")
    client = _client(cluster.kubeconfig)
    factory = nodes.NodeFactory(client)
    t0 = time.monotonic()
    factory.create_many("gpu-node", count, profile)
    _say(f"{count} fake {profile} nodes Ready in {time.monotonic() - t0:.1f}s")
    return cluster


def cmd_up(args: argparse.Namespace) -> int:
    cluster = up(RUN_DIR, args.nodes, args.profile)
    link = DEV / "kubeconfig"
    link.unlink(missing_ok=True)
    link.symlink_to(cluster.kubeconfig)
    print_nodes(_client(cluster.kubeconfig))
    _say(f"KUBECONFIG={link}  (stop with: make cluster-down)")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    if not (RUN_DIR / "state.json").exists():
        _say("no cluster state in .dev/cluster: nothing to stop")
        return 0
    cluster = harness.Cluster.from_state(RUN_DIR)
    _say(f"stopping {len(cluster.procs)} processes by PID: {cluster.pids()}")
    cluster.stop()
    (DEV / "kubeconfig").unlink(missing_ok=True)
    shutil.rmtree(RUN_DIR)
    _say("stopped")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    if not (RUN_DIR / "state.json").exists():
        _say("no cluster running from .dev/cluster")
        return 1
    cluster = harness.Cluster.from_state(RUN_DIR)
    _say(f"server {cluster.server}; processes alive: {cluster.pids()}")
    print_nodes(_client(cluster.kubeconfig))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    DEV.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="demo-", dir=DEV))
    cluster = up(run_dir, args.nodes, args.profile)
    try:
        client = _client(cluster.kubeconfig)
        _say("fake GPU/RDMA nodes (allocatable, as kube-scheduler sees them):")
        print_nodes(client)
        kubectl = cluster.bin_dir / "kubectl"
        _say("the same through kubectl:")
        subprocess.run(
            [str(kubectl), "get", "nodes", "-L", "nvidia.com/gpu.product,topology.kubernetes.io/zone"],
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            check=True,
        )
    finally:
        _say("tearing down (stopping our processes by PID)")
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    _say("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn in (("up", cmd_up), ("demo", cmd_demo)):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=4, help="number of fake GPU nodes (default 4)")
        p.add_argument("--profile", choices=sorted(nodes.PROFILES), default="h200", help="node profile")
        p.set_defaults(fn=fn)
    sub.add_parser("down").set_defaults(fn=cmd_down)
    sub.add_parser("status").set_defaults(fn=cmd_status)
    args = parser.parse_args(argv)
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
