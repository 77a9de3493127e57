"""Tests for dualpath_engine: kv."""
