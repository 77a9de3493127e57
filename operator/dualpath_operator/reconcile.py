"""One idempotent reconcile pass of a DualPathCluster: gather -> plan -> apply -> status."""
