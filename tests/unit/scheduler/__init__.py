"""Tests of dualpath_engine.scheduler."""
