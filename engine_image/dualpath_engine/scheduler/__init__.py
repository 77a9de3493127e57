"""dualpath_engine.scheduler."""
