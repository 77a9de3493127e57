"""Unit tests of the DualPathCluster API: models, conditions, CRD generation, examples."""
