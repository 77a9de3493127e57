"""dualpath_engine.model."""
