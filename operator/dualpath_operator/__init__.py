"""dualpath-operator: runs DualPath prefill/decode inference clusters on Kubernetes.

The package is layered (see docs/architecture.md): ``api`` (CRD models) and the pure ``planning`` and
``rendering`` packages at the bottom, ``k8s`` (the only Kubernetes I/O) and ``telemetry`` above them,
``reconcile`` and ``handlers`` on top.
"""

__version__ = "0.1.0"
