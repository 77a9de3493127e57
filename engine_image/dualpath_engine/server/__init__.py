"""dualpath_engine.server."""
