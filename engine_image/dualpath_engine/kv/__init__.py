"""dualpath_engine.kv."""
