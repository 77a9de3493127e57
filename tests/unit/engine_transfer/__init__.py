"""Tests for dualpath_engine: transfer."""
