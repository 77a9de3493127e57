"""The metric names the code really exports, and the metric names PromQL expressions use.

:func:`exported_names` builds every registry the processes build (the operator's ``OperatorMetrics``,
the scheduler's ``SchedulerMetrics`` + ``StateCollector``, an engine process's NIC, store, read-queue,
transport and engine-loop collectors), each with a private ``CollectorRegistry``, and turns the families
into the sample names Prometheus stores (counters ``_total``, histograms ``_bucket``/``_sum``/``_count``),
plus node_exporter's infiniband series (docs: local-kubernetes.md 13.1). :func:`promql_metric_names`
extracts the metric names an expression selects. Used by ``test_metric_names.py`` for the Grafana
dashboard and the Prometheus rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from unittest import mock

import prometheus_client
from prometheus_client.metrics_core import Metric

from dualpath_engine import config as engine_config
from dualpath_engine.engine import decode, prefill, service
from dualpath_engine.kv import layout, readqueue, storage
from dualpath_engine.scheduler import metrics as scheduler_metrics
from dualpath_engine.transfer import base
from dualpath_operator import metrics as operator_metrics

NODE_EXPORTER_INFINIBAND = frozenset(
    {
        "node_infiniband_info",
        "node_infiniband_state_id",
        "node_infiniband_physical_state_id",
        "node_infiniband_rate_bytes_per_second",
        "node_infiniband_port_data_transmitted_bytes_total",
        "node_infiniband_port_data_received_bytes_total",
        "node_infiniband_port_packets_transmitted_total",
        "node_infiniband_port_packets_received_total",
        "node_infiniband_port_errors_received_total",
        "node_infiniband_port_discards_transmitted_total",
        "node_infiniband_port_discards_received_total",
        "node_infiniband_port_transmit_wait_total",
        "node_infiniband_symbol_error_total",
        "node_infiniband_link_downed_total",
        "node_infiniband_link_error_recovery_total",
        "node_infiniband_local_link_integrity_errors_total",
        "node_infiniband_excessive_buffer_overrun_errors_total",
        "node_infiniband_port_receive_remote_physical_errors_total",
        "node_infiniband_port_receive_switch_relay_errors_total",
        "node_infiniband_port_constraint_errors_transmitted_total",
        "node_infiniband_port_constraint_errors_received_total",
        "node_infiniband_unicast_packets_transmitted_total",
        "node_infiniband_unicast_packets_received_total",
        "node_infiniband_multicast_packets_transmitted_total",
        "node_infiniband_multicast_packets_received_total",
        "node_infiniband_vl15_dropped_total",
        # every node_exporter: 0 when a collector (e.g. infiniband) failed on this scrape
        "node_scrape_collector_success",
    }
)
"""node_exporter 1.5 series of the infiniband collector (local-kubernetes.md 13.1) and the collector
success gauge (13.2)."""

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def sample_names(families: Iterable[Metric]) -> set[str]:
    """Names of the series Prometheus stores for ``families`` (labelled families may have no sample yet)."""
    names: set[str] = set()
    for family in families:
        if family.type not in _SUFFIXES:
            raise ValueError(f"unexpected metric type {family.type!r} of {family.name}")
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def operator_names() -> set[str]:
    """What the operator's ``/metrics`` serves (``OperatorMetrics`` with one cluster in view)."""
    registry = prometheus_client.CollectorRegistry()
    view = operator_metrics.ClusterMetricsView(
        namespace="ns",
        name="demo",
        ready=True,
        degraded=False,
        prefill_replicas=1,
        prefill_ready=1,
        prefill_desired=1,
        decode_replicas=2,
        decode_ready=2,
        decode_desired=2,
    )
    operator_metrics.OperatorMetrics(registry, lambda: [view])
    return sample_names(registry.collect())


def scheduler_names() -> set[str]:
    """What the scheduler's ``/metrics`` serves (its counters/histograms and the scrape-time gauges)."""
    registry = prometheus_client.CollectorRegistry()
    scheduler_metrics.SchedulerMetrics(registry)
    sample = scheduler_metrics.StateSample(
        queues={"pe_global": 1},
        running_requests=1,
        engines=(scheduler_metrics.EngineSample("e0", "g0", "prefill", 1, 64, 1 << 20),),
        groups={("prefill", "active"): 1},
        read_queue_tokens={"n1": 64},
        path_weights={"n1": 25e9},
        prefix_index_blocks=3,
    )
    registry.register(scheduler_metrics.StateCollector(lambda: sample))
    return sample_names(registry.collect())


def engine_names() -> set[str]:
    """What an engine process's ``/metrics`` serves: the collectors ``engine.service.serve`` registers."""
    registry = prometheus_client.CollectorRegistry()
    cfg = engine_config.EngineConfig(role="prefill")
    base.build_engine_nics(cfg, base.NicMetrics(registry))
    store_metrics = storage.StoreMetrics(registry)
    geometry = layout.BlockGeometry.from_config(cfg.model, cfg.kv)
    readqueue.ReadQueue(storage.MemoryStore(geometry, store_metrics), workers=1, registry=registry)
    base.TransportMetrics("tcp", registry)
    pe = mock.create_autospec(prefill.PrefillEngine, instance=True)
    pe.load.return_value = (0, 0)
    pe.batches_run = 0
    pe.read_bytes_total = 0
    pe.layer_wait_seconds = 0.0
    pe.tasks_done = 0
    pe.task_seconds = dict.fromkeys(prefill.TASK_PARTS, 0.0)
    de = mock.create_autospec(decode.DecodeEngine, instance=True)
    de.load.return_value = (0, 0)
    de.steps_run = 0
    de.read_bytes_total = 0
    de.persisted_blocks = 0
    de.step_seconds = {"compute": 0.0, "queue": 0.0, "host": 0.0}
    de.batch_steps = {"1": 1}
    de.batch_tokens = {"1": 1}
    de.batch_seconds = {"1": 0.001}
    registry.register(service._Roles(pe, de, "prefill"))
    return sample_names(registry.collect())


def exported_names() -> set[str]:
    """Every series name our processes and node_exporter's infiniband collector export."""
    return operator_names() | scheduler_names() | engine_names() | set(NODE_EXPORTER_INFINIBAND)


# --------------------------------------------------------------------------------------------- PromQL

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_NUMBER_WORD = re.compile(r"(?<![\w.:])\d[\w.]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by ``expr`` (PromQL, possibly with Grafana ``$variables``).

    Strings, label matchers, ranges and grouping label lists are removed; what remains and is neither a
    function call, a keyword nor a number is a metric name (recording-rule names included).
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    text = _NUMBER_WORD.sub("", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def grafana_label_values_metric(query: str) -> set[str]:
    """Metric names of a Grafana variable query such as ``label_values(metric{sel}, label)``."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return promql_metric_names(match.group(1)) if match else promql_metric_names(query)
