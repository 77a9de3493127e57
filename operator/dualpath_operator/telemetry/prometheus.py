"""Telemetry from the Prometheus HTTP API: instant PromQL queries (``/api/v1/query``) into a
:class:`~dualpath_operator.planning.telemetry.TelemetrySample`.

Every signal has a built-in query (:class:`PrometheusQueries`): node NIC rates from node_exporter's
infiniband collector (``node_infiniband_port_data_{received,transmitted}_bytes_total``,
``node_infiniband_rate_bytes_per_second``; devices told apart by regex, the node named by the scrape
target's ``node`` label), engine signals from the engines' own series (``dualpath_engine_*``, by
``pod``) and TTFT/TPOT quantiles from the scheduler's histograms. ``spec.telemetry.queries`` overrides
some of them (:func:`queries_for`). Queries are templates: ``$window`` (the rate window, e.g. ``60s``),
``$storage_devices``/``$compute_devices`` (the device regexes), ``$engines``/``$scheduler`` (extra label
matchers) and ``$quantile`` are substituted before sending.

Nothing raises out of :meth:`PrometheusCollector.collect`: an unreachable server, a failed or empty
query, series older than two windows, a failed infiniband collector and garbage values all become
``problems`` (checked by :class:`~dualpath_operator.telemetry.sample.SampleBuilder`). Called by the
operator's rebalance loop when ``spec.telemetry.source`` is Prometheus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from dualpath_operator.api.v1alpha1 import rebalancing
from dualpath_operator.planning import telemetry as types
from dualpath_operator.telemetry import sample, session

SNIC = 'device=~"$storage_devices"'
CNIC = 'device=~"$compute_devices"'


@dataclasses.dataclass(frozen=True)
class PrometheusQueries:
    """PromQL templates, one per signal. Node queries return series by ``node``, engine ones by ``pod``."""

    snic_rx: str = f"sum by (node) (rate(node_infiniband_port_data_received_bytes_total{{{SNIC}}}[$window]))"
    snic_capacity: str = f"sum by (node) (node_infiniband_rate_bytes_per_second{{{SNIC}}})"
    cnic_tx: str = (
        f"sum by (node) (rate(node_infiniband_port_data_transmitted_bytes_total{{{CNIC}}}[$window]))"
    )
    cnic_rx: str = f"sum by (node) (rate(node_infiniband_port_data_received_bytes_total{{{CNIC}}}[$window]))"
    cnic_capacity: str = f"sum by (node) (node_infiniband_rate_bytes_per_second{{{CNIC}}})"
    #: Override only (``spec.telemetry.queries.cnicBytes``): transmit+receive by node, replacing
    #: cnic_tx/cnic_rx. Series with a ``direction`` label (tx/rx) fill that direction; a series without one
    #: is recorded as the rate of both directions (a conservative bound on each).
    cnic_total: str | None = None
    #: Freshness: the newest sample time of a node's storage-NIC series / an engine's series.
    node_freshness: str = f"max by (node) (timestamp(node_infiniband_rate_bytes_per_second{{{SNIC}}}))"
    engine_freshness: str = "max by (pod) (timestamp(dualpath_engine_running_tokens{$engines}))"
    #: Nodes whose node_exporter infiniband collector failed (then no node_infiniband_* at all).
    collector_failures: str = 'node_scrape_collector_success{collector="infiniband"} == 0'
    queued_tokens: str = "sum by (pod) (dualpath_engine_running_tokens{$engines})"
    inflight_requests: str = "sum by (pod) (dualpath_engine_running_requests{$engines})"
    read_queue_tokens: str = "sum by (pod) (dualpath_engine_storage_read_queue_tokens{$engines})"
    kv_read: str = "sum by (pod, path) (rate(dualpath_engine_kv_read_bytes_total{$engines}[$window]))"
    transport_info: str = "max by (pod, kind) (dualpath_engine_transport_info{$engines}) == 1"
    transport_rate: str = "max by (pod) (dualpath_engine_transport_rate_bytes_per_second{$engines})"
    #: Fraction of KV memory in use by pod (the engine group's active role; the idle role reports 0).
    hbm_used_ratio: str | None = "max by (pod) (dualpath_engine_kv_cache_used_ratio{$engines})"
    #: Series with a ``pod`` label are per engine; one without is the cluster's and goes on every engine.
    ttft: str = (
        "histogram_quantile($quantile, sum by (le) "
        "(rate(dualpath_scheduler_time_to_first_token_seconds_bucket{$scheduler}[$window])))"
    )
    tpot: str = (
        "histogram_quantile($quantile, sum by (le) "
        "(rate(dualpath_scheduler_time_per_output_token_seconds_bucket{$scheduler}[$window])))"
    )


def queries_for(overrides: rebalancing.TelemetryQueries | None) -> PrometheusQueries:
    """Built-in queries with the cluster's ``spec.telemetry.queries`` applied."""
    queries = PrometheusQueries()
    if overrides is None:
        return queries
    changes: dict[str, str] = {}
    if overrides.snic_read_bytes:
        changes["snic_rx"] = overrides.snic_read_bytes
    if overrides.cnic_bytes:
        changes["cnic_total"] = overrides.cnic_bytes
    if overrides.ttft_seconds:
        changes["ttft"] = overrides.ttft_seconds
    if overrides.tpot_seconds:
        changes["tpot"] = overrides.tpot_seconds
    return dataclasses.replace(queries, **changes)


def promql_duration(seconds: float) -> str:
    """A PromQL range such as ``60s`` or ``1500ms``."""
    if seconds <= 0:
        raise ValueError(f"window must be positive, got {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


@dataclasses.dataclass(frozen=True)
class Series:
    """One element of an instant vector: labels, the evaluation time and the value."""

    labels: Mapping[str, str]
    time: float
    value: float


class QueryError(Exception):
    """A query that returned no usable answer; the message is the problem text."""


class PrometheusCollector(session.SessionOwner):
    """Samples a cluster's telemetry from one Prometheus server (one aiohttp session, reused)."""

    def __init__(
        self,
        base_url: str,
        *,
        settings: sample.CollectorSettings | None = None,
        queries: PrometheusQueries | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.settings = settings or sample.CollectorSettings()
        self.queries = queries or PrometheusQueries()
        super().__init__()

    def render(self, template: str, window_s: float) -> str:
        """A template with its placeholders filled."""
        s = self.settings
        values = {
            "$window": promql_duration(window_s),
            "$storage_devices": s.storage_device_regex.replace("\\", "\\\\"),
            "$compute_devices": s.compute_device_regex.replace("\\", "\\\\"),
            "$engines": s.engine_selector,
            "$scheduler": s.scheduler_selector,
            "$quantile": f"{s.ttft_quantile:g}",
        }
        for key, value in values.items():
            template = template.replace(key, value)
        return template

    async def query(self, promql: str) -> list[Series]:
        """One instant query; raises :class:`QueryError` with a problem text on any failure."""
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self.session().get(url, params={"query": promql}, timeout=timeout) as response:
                text = await response.text()
        except TimeoutError as exc:
            raise QueryError(
                f"Prometheus at {self.base_url} did not answer within {self.settings.request_timeout_s:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise QueryError(f"Prometheus at {self.base_url} unreachable: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise QueryError(
                f"Prometheus at {self.base_url} answered bytes that are not text: {exc}"
            ) from exc
        return _parse(text, response.status, promql)

    async def _named(
        self, name: str, template: str, window_s: float
    ) -> tuple[str, list[Series] | QueryError]:
        try:
            return name, await self.query(self.render(template, window_s))
        except QueryError as exc:
            return name, exc

    async def collect(
        self,
        targets: Sequence[sample.EngineTarget],
        *,
        window_s: float,
        nodes: Iterable[str] = (),
        now: dt.datetime | None = None,
    ) -> types.TelemetrySample:
        """One sample of ``targets`` (engine pods) and ``nodes`` (plus the targets' nodes), never raising."""
        taken_at = now or dt.datetime.now(dt.UTC)
        builder = sample.SampleBuilder(self.settings, window_s, targets, nodes)
        templates = {
            f.name: getattr(self.queries, f.name)
            for f in dataclasses.fields(self.queries)
            if getattr(self.queries, f.name) is not None
        }
        if "cnic_total" in templates:
            del templates["cnic_tx"], templates["cnic_rx"]
        results = dict(await asyncio.gather(*(self._named(n, t, window_s) for n, t in templates.items())))
        required = self._required(engines=bool(targets))
        for name, result in results.items():
            if isinstance(result, QueryError):
                builder.problem(str(result))
            elif not result and name in required:
                builder.problem(
                    f"Prometheus query {name} returned no series: {self.render(templates[name], window_s)}"
                )
        ok = {n: r for n, r in results.items() if not isinstance(r, QueryError)}
        self._fill_nodes(builder, ok)
        self._fill_engines(builder, ok)
        self._check_freshness(builder, ok, window_s)
        return builder.build(taken_at)

    def _required(self, *, engines: bool) -> set[str]:
        """Queries whose empty answer is a problem (engine ones only when engines are expected)."""
        s = self.settings
        required = {"snic_rx"}
        if s.snic_capacity_fallback_bps is None:
            required.add("snic_capacity")
        if s.require_compute_nic:
            required |= {"cnic_tx", "cnic_rx", "cnic_total"}
            if s.cnic_capacity_fallback_bps is None:
                required.add("cnic_capacity")
        by_signal = {
            "queued_tokens": "queued_tokens",
            "read_queue_tokens": "read_queue_tokens",
            "inflight_requests": "inflight_requests",
            "kv_read_pe_bps": "kv_read",
            "kv_read_de_bps": "kv_read",
            "transport_rate_bps": "transport_rate",
            "hbm_used_ratio": "hbm_used_ratio",
            "ttft_p90_s": "ttft",
            "tpot_p90_s": "tpot",
        }
        if engines:
            required |= {by_signal[signal] for signal in s.required_engine_signals}
        return required

    def _fill_nodes(self, builder: sample.SampleBuilder, ok: Mapping[str, list[Series]]) -> None:
        label = self.settings.node_label
        simple: dict[str, sample.NodeField] = {
            "snic_rx": "snic_rx_bps",
            "snic_capacity": "snic_capacity_bps",
            "cnic_tx": "cnic_tx_bps",
            "cnic_rx": "cnic_rx_bps",
            "cnic_capacity": "cnic_capacity_bps",
        }
        for name, field in simple.items():
            for series in ok.get(name, ()):
                if label in series.labels:
                    builder.set_node(series.labels[label], field, series.value)
        totals: dict[str, dict[str, float]] = {}
        for series in ok.get("cnic_total", ()):
            if label in series.labels:
                direction = series.labels.get("direction", "both")
                per = totals.setdefault(series.labels[label], {})
                per[direction] = per.get(direction, 0.0) + series.value
        for node, per in totals.items():
            tx = per.get("tx", per.get("transmit", per.get("both")))
            rx = per.get("rx", per.get("receive", per.get("both")))
            if tx is not None:
                builder.set_node(node, "cnic_tx_bps", tx)
            if rx is not None:
                builder.set_node(node, "cnic_rx_bps", rx)
        for series in ok.get("collector_failures", ()):
            node = series.labels.get(label, series.labels.get("instance", "?"))
            builder.problem(f"node {node}: node_exporter's infiniband collector failed (no NIC counters)")

    def _fill_engines(self, builder: sample.SampleBuilder, ok: Mapping[str, list[Series]]) -> None:
        pod_label = self.settings.pod_label
        simple: dict[str, sample.EngineField] = {
            "queued_tokens": "queued_tokens",
            "inflight_requests": "inflight_requests",
            "read_queue_tokens": "read_queue_tokens",
            "transport_rate": "transport_rate_bps",
            "hbm_used_ratio": "hbm_used_ratio",
        }
        for name, field in simple.items():
            for series in ok.get(name, ()):
                if pod_label in series.labels:
                    builder.set_engine(series.labels[pod_label], field, series.value)
        paths = {value: name for name, values in sample.KV_READ_PATHS.items() for value in values}
        kv: dict[tuple[str, sample.EngineField], float] = {}
        for series in ok.get("kv_read", ()):
            path_field = paths.get(series.labels.get("path", ""))
            if path_field is not None and pod_label in series.labels:
                key = (series.labels[pod_label], path_field)
                kv[key] = kv.get(key, 0.0) + series.value
        for (pod, path_field), value in kv.items():
            builder.set_engine(pod, path_field, value)
        for series in ok.get("transport_info", ()):
            if pod_label in series.labels:
                builder.set_transport(series.labels[pod_label], series.labels.get("kind", "unknown"))
        latency: dict[str, sample.EngineField] = {"ttft": "ttft_p90_s", "tpot": "tpot_p90_s"}
        for name, field in latency.items():
            per_pod = [s for s in ok.get(name, ()) if pod_label in s.labels]
            cluster = [s.value for s in ok.get(name, ()) if pod_label not in s.labels]
            if cluster:
                finite = [v for v in cluster if not math.isnan(v)]
                builder.set_all_engines(field, max(finite) if finite else math.nan)
            for series in per_pod:
                builder.set_engine(series.labels[pod_label], field, series.value)

    def _check_freshness(
        self, builder: sample.SampleBuilder, ok: Mapping[str, list[Series]], window_s: float
    ) -> None:
        limit = 2 * window_s
        for name, label, kind in (
            ("node_freshness", self.settings.node_label, "node"),
            ("engine_freshness", self.settings.pod_label, "engine"),
        ):
            for series in ok.get(name, ()):
                age = series.time - series.value
                who = series.labels.get(label)
                if who is None or age <= limit:
                    continue
                builder.problem(
                    f"stale: {kind} {who} series are {age:.0f}s old (more than 2 windows, {limit:g}s)"
                )
                if kind == "node" and who in builder.nodes:
                    builder.nodes[who] = {k: None for k in builder.nodes[who]}
                elif who in builder.engines:
                    builder.engines[who] = {k: None for k in builder.engines[who]}


def _parse(text: str, status: int, promql: str) -> list[Series]:
    try:
        body: Any = json.loads(text)
    except ValueError as exc:
        raise QueryError(
            f"Prometheus answered HTTP {status} with a body that is not JSON: {text[:200]!r}"
        ) from exc
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error", text[:200]) if isinstance(body, dict) else text[:200]
        raise QueryError(f"Prometheus query failed (HTTP {status}): {error}; query: {promql}")
    try:
        data = body["data"]
        if data["resultType"] == "scalar":
            return [Series({}, float(data["result"][0]), float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise QueryError(
                f"Prometheus query returned a {data['resultType']}, not an instant vector: {promql}"
            )
        return [
            Series(dict(item["metric"]), float(item["value"][0]), float(item["value"][1]))
            for item in data["result"]
        ]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise QueryError(f"Prometheus answered a malformed result ({exc!r}) to: {promql}") from exc
