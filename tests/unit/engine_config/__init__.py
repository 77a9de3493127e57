"""Tests for dualpath_engine: config."""
