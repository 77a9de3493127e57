"""The local real-Kubernetes harness: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok built from the Go module proxy (``hack/build-tools.sh``), started on free loopback ports, with fake
GPU/RDMA nodes whose pod CIDRs are loopback ranges.

Used by the pytest fixtures in ``tests/conftest.py``, by ``make cluster-up``/``cluster-down``/``demo``
(``python -m tests.cluster``) and by later demo/e2e infrastructure. Test infrastructure, not product.
"""
