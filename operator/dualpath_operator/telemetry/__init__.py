"""Telemetry collectors: fetch NIC and engine metrics (Prometheus HTTP API or direct scrape) into planning types."""
