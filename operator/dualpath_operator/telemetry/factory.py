"""The collector a DualPathCluster asks for: ``spec.telemetry.source`` picks Prometheus or direct scrape,
with the cluster's query overrides, rate window and storage-NIC line rate applied.

Called by the operator's rebalance loop once per cluster (keep the collector between intervals: the
scrape collector's rates need the previous scrape) and closed when the cluster goes away.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Protocol

from dualpath_operator.api.v1alpha1 import cluster, common, rebalancing
from dualpath_operator.planning import telemetry as types
from dualpath_operator.telemetry import prometheus, sample, scrape


class Collector(Protocol):
    """What both collectors offer."""

    async def collect(
        self,
        targets: Sequence[sample.EngineTarget],
        *,
        window_s: float,
        nodes: Iterable[str] = (),
        now: dt.datetime | None = None,
    ) -> types.TelemetrySample:
        """One sample; problems instead of exceptions."""
        ...

    async def close(self) -> None:
        """Release the HTTP session."""
        ...


def window_s(spec: cluster.DualPathClusterSpec) -> float:
    """The rate window, ``spec.telemetry.window``, in seconds."""
    return float(common.parse_duration(spec.telemetry.window))


def build(
    spec: cluster.DualPathClusterSpec,
    *,
    scheduler_metrics_url: str | None = None,
    settings: sample.CollectorSettings | None = None,
) -> Collector:
    """A collector for ``spec``; ``scheduler_metrics_url`` (scrape source) adds TTFT/TPOT."""
    chosen = settings or sample.settings_for(spec)
    telemetry = spec.telemetry
    if telemetry.source is rebalancing.TelemetrySource.PROMETHEUS and telemetry.prometheus_url is not None:
        return prometheus.PrometheusCollector(
            telemetry.prometheus_url, settings=chosen, queries=prometheus.queries_for(telemetry.queries)
        )
    return scrape.ScrapeCollector(settings=chosen, scheduler_url=scheduler_metrics_url)
