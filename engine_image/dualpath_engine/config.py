"""Engine and scheduler configuration (pydantic, frozen). The operator renders it; engines read it once."""
