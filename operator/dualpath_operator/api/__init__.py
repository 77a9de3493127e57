"""The DualPathCluster API (``dualpath.io``): pydantic models that are the only source of the CRD schema."""
