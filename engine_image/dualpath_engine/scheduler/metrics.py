"""Prometheus metrics of the central scheduler (``dualpath_scheduler_*``, base units).

``SchedulerMetrics`` owns the counters and histograms that ``scheduler.state`` and
``scheduler.service`` update as things happen; ``StateCollector`` yields gauges of the current state
(queue depths, engine loads, read queues, path weights) at scrape time, so label sets of engines that
went away disappear with them. ``dualpath_engine.server`` exposes the registry on ``/metrics``.
Tests pass a private ``CollectorRegistry``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import registry as prom_registry
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
DECISION_BUCKETS = (1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5)


class SchedulerMetrics:
    """Counters and histograms of the scheduler, registered in ``registry``."""

    def __init__(self, registry: prom_registry.CollectorRegistry) -> None:
        ns = "dualpath_scheduler"
        self.requests = prometheus_client.Counter(
            "requests", "Client requests by outcome.", ["result"], namespace=ns, registry=registry
        )
        self.time_to_first_token = prometheus_client.Histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            namespace=ns,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.time_per_output_token = prometheus_client.Histogram(
            "time_per_output_token_seconds",
            "Mean time between output tokens of a finished request (TPOT).",
            namespace=ns,
            registry=registry,
            buckets=TOKEN_LATENCY_BUCKETS,
        )
        self.request_duration = prometheus_client.Histogram(
            "request_duration_seconds",
            "Time from arrival to the last token of a finished request.",
            namespace=ns,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.kv_read_bytes = prometheus_client.Counter(
            "kv_read_bytes",
            "KV bytes read from storage, by read path.",
            ["path"],
            namespace=ns,
            registry=registry,
        )
        self.read_side_decisions = prometheus_client.Counter(
            "read_side_decisions",
            "Read-side choices (pe, de, or split across both).",
            ["path"],
            namespace=ns,
            registry=registry,
        )
        self.pe_assignments = prometheus_client.Counter(
            "pe_assignments",
            "Prefill assignments by the alpha/beta category of the chosen engine.",
            ["category"],
            namespace=ns,
            registry=registry,
        )
        self.de_assignments = prometheus_client.Counter(
            "de_assignments",
            "Decode assignments by the Z rule's outcome.",
            ["choice"],
            namespace=ns,
            registry=registry,
        )
        self.fetch_stops = prometheus_client.Counter(
            "fetch_stops", "Why a group fetch ended.", ["role", "reason"], namespace=ns, registry=registry
        )
        self.fetch_seconds = prometheus_client.Histogram(
            "fetch_seconds",
            "Scheduler CPU time per group fetch (policy decision cost).",
            ["role"],
            namespace=ns,
            registry=registry,
            buckets=DECISION_BUCKETS,
        )
        self.retries = prometheus_client.Counter(
            "retries",
            "Requests re-queued after engine loss or an engine error.",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.prompt_tokens = prometheus_client.Counter(
            "prompt_tokens",
            "Prompt tokens of dispatched tasks by source (cache_hit: planned from storage; computed).",
            ["source"],
            namespace=ns,
            registry=registry,
        )
        self.generation_tokens = prometheus_client.Counter(
            "generation_tokens", "Tokens generated and delivered to clients.", namespace=ns, registry=registry
        )
        self.engine_groups_lost = prometheus_client.Counter(
            "engine_groups_lost",
            "Engine groups declared lost (timeout or restart).",
            ["reason"],
            namespace=ns,
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One engine's load for the scrape-time gauges."""

    engine_id: str
    group_id: str
    role: str
    seq: int
    tok: int
    free_hbm_bytes: int


@dataclass(frozen=True, slots=True)
class StateSample:
    """A point-in-time view of the scheduler for ``StateCollector``."""

    queues: dict[str, int]
    """Requests per queue: pe_global, de_global, de_group."""
    running_requests: int
    engines: tuple[EngineSample, ...]
    groups: dict[tuple[str, str], int]
    """Groups per (role, state), state in active, drained, switching."""
    read_queue_tokens: dict[str, int]
    path_weights: dict[str, float]
    prefix_index_blocks: int


class StateCollector(prom_registry.Collector):
    """Yields gauges of the scheduler's current state at scrape time."""

    def __init__(self, sample: Callable[[], StateSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        """Build fresh metric families from a new sample."""
        return list(self._families(self._sample()))

    def _families(self, s: StateSample) -> Iterator[Metric]:
        ns = "dualpath_scheduler_"
        queue = GaugeMetricFamily(ns + "queue_requests", "Requests waiting in each queue.", labels=["queue"])
        for name, value in sorted(s.queues.items()):
            queue.add_metric([name], value)
        yield queue
        yield GaugeMetricFamily(
            ns + "running_requests", "Requests admitted and not finished.", value=s.running_requests
        )
        tok = GaugeMetricFamily(
            ns + "engine_unfinished_tokens", "tok_e as last reported.", labels=["engine", "group", "role"]
        )
        seq = GaugeMetricFamily(
            ns + "engine_unfinished_requests", "seq_e as last reported.", labels=["engine", "group", "role"]
        )
        hbm = GaugeMetricFamily(
            ns + "engine_free_hbm_bytes", "Free KV HBM as last reported.", labels=["engine", "group", "role"]
        )
        for e in s.engines:
            labels = [e.engine_id, e.group_id, e.role]
            tok.add_metric(labels, e.tok)
            seq.add_metric(labels, e.seq)
            hbm.add_metric(labels, e.free_hbm_bytes)
        yield tok
        yield seq
        yield hbm
        groups = GaugeMetricFamily(
            ns + "engine_groups", "Live engine groups by role and state.", labels=["role", "state"]
        )
        for (role, state), count in sorted(s.groups.items()):
            groups.add_metric([role, state], count)
        yield groups
        rq = GaugeMetricFamily(
            ns + "node_read_queue_tokens",
            "Storage read queue per node (reported + planned).",
            labels=["node"],
        )
        for node, value in sorted(s.read_queue_tokens.items()):
            rq.add_metric([node], value)
        yield rq
        weights = GaugeMetricFamily(
            ns + "path_weight_bytes_per_second",
            "Usable storage-NIC capacity per node pushed through the admin API.",
            labels=["node"],
        )
        for node, capacity in sorted(s.path_weights.items()):
            weights.add_metric([node], capacity)
        yield weights
        yield GaugeMetricFamily(
            ns + "prefix_index_blocks",
            "Block hashes in the scheduler's prefix index.",
            value=s.prefix_index_blocks,
        )
