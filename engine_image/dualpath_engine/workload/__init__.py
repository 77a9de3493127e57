"""dualpath_engine.workload."""
