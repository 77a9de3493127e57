"""Tests of the cluster simulator in bench/sim (mechanics on tiny cases, no timing claims)."""
