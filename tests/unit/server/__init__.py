"""Tests of dualpath_engine.server."""
