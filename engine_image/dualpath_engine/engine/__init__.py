"""dualpath_engine.engine."""
