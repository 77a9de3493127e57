"""Telemetry by scraping engine pods' ``/metrics`` directly (``spec.telemetry.source: Scrape``).

:class:`ScrapeCollector` fetches every engine's Prometheus text (and optionally the scheduler's),
parses it with ``prometheus_client.parser.text_string_to_metric_families`` and keeps a small history
of scrapes per URL, so counters become rates over the window (:mod:`~dualpath_operator.telemetry.rates`,
resets handled) and histograms become quantiles. Per node it sums the engines' own NIC counters
(``dualpath_engine_nic_bytes_total{kind,direction}``), takes the NIC's emulated budget
(``dualpath_engine_nic_budget_bytes_per_second``, 0 = unlimited, then the configured line rate) as
capacity, and the KV reads (``dualpath_engine_kv_read_bytes_total{path}``, path ``pe``/``de`` as the
engine service exports it, or ``pe_read``/``de_read`` as the traffic manager does) as the KV part of the
storage-NIC traffic. Engine signals: ``dualpath_engine_running_tokens``/``_running_requests``,
``dualpath_engine_storage_read_queue_tokens``, ``dualpath_engine_transport_info{kind}``,
``dualpath_engine_transport_rate_bytes_per_second`` and ``dualpath_engine_kv_cache_used_ratio{role}``
(the largest role's value, since a group's idle role reports 0) as ``hbm_used_ratio``; TTFT/TPOT from
the scheduler's ``dualpath_scheduler_time_to_first_token_seconds`` /
``_time_per_output_token_seconds`` histograms.

A rate needs two scrapes: the first sample of a target lists "no earlier scrape" as a problem, and so
does one whose earlier scrapes are older than two windows. Unreachable or unparsable targets become
problems too; :meth:`ScrapeCollector.collect` never raises. Called by the operator's rebalance loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import aiohttp
from prometheus_client import parser

from dualpath_operator.planning import telemetry as types
from dualpath_operator.telemetry import rates, sample, session

Labels = tuple[tuple[str, str], ...]
"""Sorted label pairs of one series."""

TTFT = "dualpath_scheduler_time_to_first_token_seconds_bucket"
TPOT = "dualpath_scheduler_time_per_output_token_seconds_bucket"


@dataclasses.dataclass(frozen=True)
class Scrape:
    """One parsed ``/metrics`` answer: monotonic time and value per (sample name, labels)."""

    at: float
    values: Mapping[tuple[str, Labels], float]

    def select(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        """Samples called ``name`` whose labels include ``match``."""
        out = []
        for (sample_name, labels), value in self.values.items():
            if sample_name != name:
                continue
            as_dict = dict(labels)
            if all(as_dict.get(k) == v for k, v in match.items()):
                out.append((as_dict, value))
        return out


def parse(text: str, at: float) -> Scrape:
    """Parse Prometheus text; raises ``ValueError`` on malformed text."""
    values: dict[tuple[str, Labels], float] = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Scrape(at=at, values=values)


class History:
    """Recent scrapes of one URL, trimmed to two windows."""

    def __init__(self) -> None:
        self.scrapes: collections.deque[Scrape] = collections.deque()

    def add(self, scrape: Scrape, window_s: float) -> None:
        """Append and forget scrapes older than two windows before it."""
        self.scrapes.append(scrape)
        while self.scrapes and scrape.at - self.scrapes[0].at > 2 * window_s:
            self.scrapes.popleft()

    def span(self, window_s: float) -> list[Scrape]:
        """The scrapes a rate uses: those within the window of the newest, else the newest earlier one."""
        if not self.scrapes:
            return []
        newest = self.scrapes[-1]
        inside = [s for s in self.scrapes if newest.at - s.at <= window_s]
        if len(inside) >= 2:
            return inside
        earlier = [s for s in self.scrapes if newest.at - s.at > window_s]
        return [earlier[-1], newest] if earlier else inside

    def rate(self, window_s: float, name: str, **match: str) -> float | None:
        """Summed per-second increase of the matching counters; None without two scrapes."""
        used = self.span(window_s)
        if len(used) < 2:
            return None
        keys = {(name, labels) for (n, labels) in used[-1].values if n == name}
        keys = {k for k in keys if all(dict(k[1]).get(a) == b for a, b in match.items())}
        if not keys:
            return None
        total = 0.0
        for key in keys:
            points = [(s.at, s.values[key]) for s in used if key in s.values]
            value = rates.counter_rate(points)
            total += value if value is not None else 0.0
        return total

    def quantile(self, window_s: float, q: float, bucket: str) -> float:
        """The ``q`` quantile of a histogram's observations over the window; NaN when there were none."""
        used = self.span(window_s)
        if len(used) < 2:
            return math.nan
        snapshots = []
        for s in used:
            per_le: dict[float, float] = {}
            for labels, value in s.select(bucket):
                le = float(labels["le"])
                per_le[le] = per_le.get(le, 0.0) + value
            snapshots.append(per_le)
        found = rates.histogram_quantile(q, rates.histogram_increase(snapshots))
        return math.nan if found is None else found


class ScrapeCollector(session.SessionOwner):
    """Scrapes engine (and scheduler) ``/metrics`` and keeps a history per URL for rates."""

    def __init__(
        self,
        *,
        settings: sample.CollectorSettings | None = None,
        scheduler_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or sample.CollectorSettings()
        self.scheduler_url = scheduler_url
        self._clock = clock
        self._history: dict[str, History] = {}
        super().__init__()
        self._storage = re.compile(self.settings.storage_device_regex)

    async def _fetch(self, url: str, window_s: float) -> str | None:
        """Scrape ``url`` into its history; returns a problem text instead of raising."""
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        try:
            async with self.session().get(url, timeout=timeout) as response:
                text = await response.text()
                if response.status != 200:
                    return f"{url} answered HTTP {response.status}"
        except TimeoutError:
            return f"{url} did not answer within {self.settings.request_timeout_s:g}s"
        except aiohttp.ClientError as exc:
            return f"{url} unreachable: {exc}"
        except UnicodeDecodeError as exc:
            return f"{url} answered bytes that are not text: {exc}"
        try:
            scrape = parse(text, self._clock())
        except ValueError as exc:
            return f"{url} answered text that is not Prometheus exposition format: {exc}"
        self._history.setdefault(url, History()).add(scrape, window_s)
        return None

    async def collect(
        self,
        targets: Sequence[sample.EngineTarget],
        *,
        window_s: float,
        nodes: Iterable[str] = (),
        now: dt.datetime | None = None,
    ) -> types.TelemetrySample:
        """Scrape every target once and build a sample from the histories; never raises."""
        taken_at = now or dt.datetime.now(dt.UTC)
        builder = sample.SampleBuilder(self.settings, window_s, targets, nodes)
        urls: dict[str, str] = {}
        for target in targets:
            if target.metrics_url is None:
                builder.problem(f"engine {target.pod}: no metrics URL (pod has no IP yet?)")
            else:
                urls[target.pod] = target.metrics_url
        if self.scheduler_url is not None:
            urls[""] = self.scheduler_url
        keep = set(urls.values())
        for url in [u for u in self._history if u not in keep]:
            del self._history[url]
        failures = await asyncio.gather(*(self._fetch(url, window_s) for url in urls.values()))
        failed: set[str] = set()
        for pod, problem in zip(urls, failures, strict=True):
            if problem is not None:
                failed.add(pod)
                builder.problem(f"scheduler: {problem}" if pod == "" else f"engine {pod}: {problem}")
        per_node: dict[str, dict[sample.NodeField, list[float]]] = {}
        for target in targets:
            if target.pod in urls and target.pod not in failed:
                self._engine(builder, target, self._history[urls[target.pod]], window_s, per_node)
        for node, lists in per_node.items():
            for name, values in lists.items():
                builder.set_node(node, name, sum(values))
        if "" in urls and "" not in failed:
            history = self._history[urls[""]]
            q = self.settings.ttft_quantile
            builder.set_all_engines("ttft_p90_s", history.quantile(window_s, q, TTFT))
            builder.set_all_engines("tpot_p90_s", history.quantile(window_s, q, TPOT))
        return builder.build(taken_at)

    def _engine(
        self,
        builder: sample.SampleBuilder,
        target: sample.EngineTarget,
        history: History,
        window_s: float,
        per_node: dict[str, dict[sample.NodeField, list[float]]],
    ) -> None:
        latest = history.scrapes[-1]
        if not latest.values:
            return
        builder.reported.add(target.pod)
        node = per_node.setdefault(target.node, {})
        self._gauges(builder, target.pod, latest, node)
        if len(history.span(window_s)) < 2:
            builder.problem(
                f"engine {target.pod}: no earlier scrape within 2 windows ({2 * window_s:g}s): no rates yet"
            )
            return
        for engine_field, path_values in sample.KV_READ_PATHS.items():
            found = [
                history.rate(window_s, "dualpath_engine_kv_read_bytes_total", path=p) for p in path_values
            ]
            rates_found = [r for r in found if r is not None]
            if rates_found:
                builder.set_engine(target.pod, engine_field, sum(rates_found))
        nics: tuple[tuple[sample.NodeField, str, str], ...] = (
            ("snic_rx_bps", "storage", "rx"),
            ("cnic_tx_bps", "compute", "tx"),
            ("cnic_rx_bps", "compute", "rx"),
        )
        for node_field, kind, direction in nics:
            rate = history.rate(window_s, "dualpath_engine_nic_bytes_total", kind=kind, direction=direction)
            if rate is not None:
                node.setdefault(node_field, []).append(rate)

    def _gauges(
        self,
        builder: sample.SampleBuilder,
        pod: str,
        latest: Scrape,
        node: dict[sample.NodeField, list[float]],
    ) -> None:
        gauges: tuple[tuple[sample.EngineField, str], ...] = (
            ("queued_tokens", "dualpath_engine_running_tokens"),
            ("inflight_requests", "dualpath_engine_running_requests"),
            ("read_queue_tokens", "dualpath_engine_storage_read_queue_tokens"),
            ("transport_rate_bps", "dualpath_engine_transport_rate_bytes_per_second"),
        )
        for engine_field, name in gauges:
            found = latest.select(name)
            if found:
                builder.set_engine(pod, engine_field, sum(v for _, v in found))
        ratios = [value for _, value in latest.select("dualpath_engine_kv_cache_used_ratio")]
        if ratios:
            builder.set_engine(pod, "hbm_used_ratio", max(ratios))
        for labels, value in latest.select("dualpath_engine_transport_info"):
            if value == 1:
                builder.set_transport(pod, labels.get("kind", "unknown"))
        storage_budget = 0.0
        compute_budget = 0.0
        for labels, value in latest.select("dualpath_engine_nic_budget_bytes_per_second"):
            if self._storage.fullmatch(labels.get("nic", "")):
                storage_budget = max(storage_budget, value)
            else:
                compute_budget += value
        # Engines of one node share its storage NIC: the node's capacity is one NIC's budget, not a sum.
        if storage_budget > 0:
            caps = node.setdefault("snic_capacity_bps", [])
            caps[:] = [max([storage_budget, *caps])]
        if compute_budget > 0:
            node.setdefault("cnic_capacity_bps", []).append(compute_budget)
