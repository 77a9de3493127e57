"""Prometheus metrics of the operator process and the ``/metrics`` endpoint that serves them.

Holds :class:`OperatorMetrics` (reconcile counter and duration histogram, planner decision counter,
last-success timestamp), :class:`ClusterCollector` (per-DualPathCluster readiness and replica gauges
computed at scrape time from a provider callable, typically over a Kopf index) and
:func:`start_server`. Created once by the operator's startup code in :mod:`dualpath_operator.handlers`
with a registry it owns; tests pass a private ``CollectorRegistry``. Names follow style.md section 8:
prefix ``dualpath_operator_``, base units, ``_total`` on counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

NAMESPACE = "dualpath"
SUBSYSTEM = "operator"

ReconcileResult = Literal["success", "error"]
"""Outcome label of ``dualpath_operator_reconcile_total``: a pass either completed or raised."""

RECONCILE_RESULTS: tuple[ReconcileResult, ...] = ("success", "error")

ROLES: tuple[str, ...] = ("prefill", "decode")

RECONCILE_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds. A pass from caches takes milliseconds; one that applies many children or waits on a slow
API server takes seconds; anything past a minute is a stuck pass."""


@dataclasses.dataclass(frozen=True)
class ClusterMetricsView:
    """What the collector exports about one DualPathCluster, taken from its status at scrape time."""

    namespace: str
    name: str
    ready: bool
    degraded: bool
    prefill_replicas: int
    prefill_ready: int
    prefill_desired: int
    decode_replicas: int
    decode_ready: int
    decode_desired: int

    def per_role(self) -> dict[str, tuple[int, int, int]]:
        """``{role: (replicas, ready, desired)}`` for both roles."""
        return {
            "prefill": (self.prefill_replicas, self.prefill_ready, self.prefill_desired),
            "decode": (self.decode_replicas, self.decode_ready, self.decode_desired),
        }


ClusterViewProvider = Callable[[], Iterable[ClusterMetricsView]]
"""Called on every scrape; must be cheap (read an in-memory index, never the API)."""


class ClusterCollector(Collector):
    """Per-cluster gauges computed at scrape time, so a deleted cluster's series vanish with it."""

    def __init__(self, provider: ClusterViewProvider) -> None:
        self._provider = provider

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check names at registration without calling the provider.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        ready, degraded, replicas, ready_replicas, desired, up = self._families()
        try:
            views = list(self._provider())
        except Exception:
            # A failing provider must not break the whole scrape (the process metrics stay useful).
            logger.exception("cluster metrics provider failed; exporting no per-cluster series")
            up.add_metric([], 0)
            return [up]
        for view in sorted(views, key=lambda v: (v.namespace, v.name)):
            labels = [view.namespace, view.name]
            ready.add_metric(labels, 1 if view.ready else 0)
            degraded.add_metric(labels, 1 if view.degraded else 0)
            for role, (count, ready_count, desired_count) in view.per_role().items():
                replicas.add_metric([*labels, role], count)
                ready_replicas.add_metric([*labels, role], ready_count)
                desired.add_metric([*labels, role], desired_count)
        up.add_metric([], 1)
        return [ready, degraded, replicas, ready_replicas, desired, up]

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        cluster = ["namespace", "cluster"]
        role = [*cluster, "role"]
        prefix = f"{NAMESPACE}_{SUBSYSTEM}_cluster"
        return (
            GaugeMetricFamily(
                f"{prefix}_ready", "1 if the cluster's Ready condition is True.", labels=cluster
            ),
            GaugeMetricFamily(
                f"{prefix}_degraded", "1 if the cluster's Degraded condition is True.", labels=cluster
            ),
            GaugeMetricFamily(f"{prefix}_replicas", "Engine pods that exist, per role.", labels=role),
            GaugeMetricFamily(
                f"{prefix}_ready_replicas", "Engine pods that are Ready, per role.", labels=role
            ),
            GaugeMetricFamily(
                f"{prefix}_desired_replicas", "Engine pods the current plan wants, per role.", labels=role
            ),
            GaugeMetricFamily(
                f"{prefix}_collector_up", "1 if the per-cluster view could be read at this scrape.", labels=[]
            ),
        )


class OperatorMetrics:
    """The operator's own metrics, registered in one registry (the global one only if passed in)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        clusters: ClusterViewProvider,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self.reconcile_total = Counter(
            "reconcile_total",
            "Reconcile passes of a DualPathCluster by outcome.",
            ["result"],
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            registry=registry,
        )
        for result in RECONCILE_RESULTS:
            self.reconcile_total.labels(result=result)  # export zeros before the first pass
        self.reconcile_duration = Histogram(
            "reconcile_duration_seconds",
            "Wall time of one reconcile pass, successful or not.",
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.decisions_total = Counter(
            "decisions_total",
            "Planner decisions that changed something, by action and reason.",
            ["action", "reason"],
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            registry=registry,
        )
        self.api_requests = Counter(
            "api_requests_total",
            "Kubernetes API requests the operator sent, by HTTP method.",
            ["method"],
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            registry=registry,
        )
        self.api_requests_per_pass = Histogram(
            "api_requests_per_reconcile",
            "Kubernetes API requests sent by one reconcile pass (a settled cluster needs only reads).",
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            buckets=(1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233),
            registry=registry,
        )
        self.last_success = Gauge(
            "last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile pass that completed; alert on its age.",
            namespace=NAMESPACE,
            subsystem=SUBSYSTEM,
            registry=registry,
        )
        self.cluster_collector = ClusterCollector(clusters)
        registry.register(self.cluster_collector)

    def observe_reconcile(self, result: ReconcileResult, seconds: float) -> None:
        """Record one finished pass."""
        if result not in RECONCILE_RESULTS:
            raise ValueError(f"unknown reconcile result {result!r}; expected one of {RECONCILE_RESULTS}")
        if seconds < 0:
            raise ValueError(f"reconcile duration must be >= 0, got {seconds}")
        self.reconcile_total.labels(result=result).inc()
        self.reconcile_duration.observe(seconds)
        if result == "success":
            self.last_success.set(self._clock())

    @contextlib.contextmanager
    def time_reconcile(self) -> Iterator[None]:
        """Time the enclosed pass; an exception counts as ``error`` and is re-raised.

        Cancellation (``asyncio.CancelledError``, a ``BaseException``) is not an outcome and is not
        recorded: the pass did not finish and will run again.
        """
        start = self._monotonic()
        try:
            yield
        except Exception:
            self.observe_reconcile("error", max(0.0, self._monotonic() - start))
            raise
        self.observe_reconcile("success", max(0.0, self._monotonic() - start))

    def record_decision(self, action: str, reason: str) -> None:
        """Count one planner decision (enumerated action and reason, never free text)."""
        if not action or not reason:
            raise ValueError(f"decision needs a non-empty action and reason, got {action!r}, {reason!r}")
        self.decisions_total.labels(action=action, reason=reason).inc()


@dataclasses.dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread); :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return int(self.server.server_address[1])

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and wait for the thread to end."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def start_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server=server, thread=thread)
