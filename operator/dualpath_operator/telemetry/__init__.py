"""Telemetry collectors: NIC and engine metrics (Prometheus HTTP API or direct scrape) into planning types.

Modules: ``factory`` (the collector ``spec.telemetry`` asks for), ``prometheus`` (PromQL over the
Prometheus HTTP API), ``scrape`` (engine and scheduler ``/metrics`` with a per-URL scrape history),
``sample`` (settings, expected engine pods, checked assembly of a ``TelemetrySample``), ``rates``
(counter rates with resets, histogram quantiles). Used by the operator's rebalance loop.
"""
