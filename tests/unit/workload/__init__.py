"""Tests of dualpath_engine.workload."""
