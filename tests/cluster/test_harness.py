"""The harness itself: a cluster comes up on loopback, writes a working kubeconfig, and stopping it
leaves no process it started alive (checked on a second, throwaway cluster)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from lightkube import Client, KubeConfig
from lightkube.resources.core_v1 import Namespace

from tests.cluster import harness, processes

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_session_cluster_listens_only_on_loopback(cluster: harness.Cluster) -> None:
    cfg = KubeConfig.from_file(str(cluster.kubeconfig))
    assert cfg.clusters["dualpath-local"].server.startswith("https://127.0.0.1:")
    for port in (cluster.ports.apiserver, cluster.ports.etcd, cluster.ports.scheduler):
        assert listening(port)


def test_stop_leaves_no_process_alive_and_frees_the_ports(tmp_path: Path) -> None:
    c = harness.Cluster(run_dir=tmp_path / "throwaway").start()
    try:
        names = {
            ns.metadata.name
            for ns in Client(KubeConfig.from_file(str(c.kubeconfig))).list(Namespace)
            if ns.metadata
        }
        assert {"default", "kube-system"} <= names
        pids = c.pids()
        assert set(pids) == set(harness.COMPONENTS)
    finally:
        c.stop()
    assert not [name for name, pid in pids.items() if processes.pid_alive(pid)]
    assert not [p for p in (c.ports.apiserver, c.ports.etcd) if listening(p)]
