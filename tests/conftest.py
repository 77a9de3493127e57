"""Shared pytest fixtures.

- ``cluster`` (session): the real local control plane (tests/cluster). Started once per session in a
  temporary run dir and stopped by PID at the end; with ``DUALPATH_TEST_CLUSTER=<run dir>`` (e.g.
  ``.dev/cluster`` after ``make cluster-up``) an already running cluster is reused and left running.
  A control plane that fails to start fails the tests that need it: it never turns into skips.
- ``kube`` (session): a lightkube sync ``Client`` authenticated as the cluster admin.
- ``namespace`` (function): a fresh namespace per test, deleted afterwards.
- ``node_factory`` (function): creates fake GPU/RDMA nodes and deletes them afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, ServiceAccount

from tests.cluster import harness, nodes


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Cluster]:
    reuse = os.environ.get("DUALPATH_TEST_CLUSTER")
    if reuse:
        yield harness.Cluster.from_state(Path(reuse))
        return
    c = harness.Cluster(run_dir=tmp_path_factory.mktemp("k8s"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def kube(cluster: harness.Cluster) -> Client:
    return Client(KubeConfig.from_file(str(cluster.kubeconfig)), field_manager="dualpath-tests")


@pytest.fixture
def namespace(kube: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name, labels={"dualpath.io/test": "true"})))

    def default_sa_exists() -> bool:
        kube.get(ServiceAccount, name="default", namespace=name)
        return True

    harness.wait_for(f"ServiceAccount {name}/default", default_sa_exists, 60)
    yield name
    kube.delete(Namespace, name=name)


@pytest.fixture
def node_factory(kube: Client) -> Iterator[nodes.NodeFactory]:
    factory = nodes.NodeFactory(kube)
    yield factory
    factory.delete_all()
