"""``dualpath.io/v1alpha1``: the first version of the DualPathCluster API.

Modules: ``cluster`` (the resource and its spec), ``spec`` (spec sections), ``rebalancing`` (the
telemetry and rebalance sections), ``status`` (observed state), ``corev1`` (embedded Kubernetes core
types), ``common`` (base model, formats, durations).
This file holds the identity of the resource, used by crdgen, the Kubernetes client code and tests.
"""

GROUP = "dualpath.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DualPathCluster"
LIST_KIND = "DualPathClusterList"
PLURAL = "dualpathclusters"
SINGULAR = "dualpathcluster"
SHORT_NAMES = ("dpc",)
CATEGORIES = ("dualpath", "all")
CRD_NAME = f"{PLURAL}.{GROUP}"
