"""dualpath_engine.transfer."""
