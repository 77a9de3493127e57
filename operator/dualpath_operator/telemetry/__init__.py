"""Telemetry collectors: NIC and engine metrics (Prometheus HTTP API or direct scrape) into planning types."""
