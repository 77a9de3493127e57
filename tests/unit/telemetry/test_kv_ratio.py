"""The engines' KV memory gauge (``dualpath_engine_kv_cache_used_ratio{role}``) reaches the ratio
planner: the scrape collector and the Prometheus collector's default query both fill
``EngineSample.hbm_used_ratio`` from it (fake ``/metrics`` text and a fake Prometheus API)."""

from __future__ import annotations

import pytest
from aiohttp import web

from dualpath_operator.telemetry import prometheus, sample, scrape
from tests.unit.telemetry import servers

pytestmark = pytest.mark.timeout(30)

WINDOW = 10.0

ENGINE_TEXT = """\
# HELP dualpath_engine_running_tokens Tokens of the running requests.
# TYPE dualpath_engine_running_tokens gauge
dualpath_engine_running_tokens{role="prefill"} 0.0
dualpath_engine_running_tokens{role="decode"} 640.0
# HELP dualpath_engine_kv_cache_used_ratio KV bytes of the running requests over the KV capacity.
# TYPE dualpath_engine_kv_cache_used_ratio gauge
dualpath_engine_kv_cache_used_ratio{role="prefill"} 0.0
dualpath_engine_kv_cache_used_ratio{role="decode"} %s
"""


class TextEngine:
    """An engine ``/metrics`` answering fixed text whose decode ratio the test changes."""

    def __init__(self) -> None:
        self.ratio = "0.375"

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=ENGINE_TEXT % self.ratio, content_type="text/plain")


async def test_scrape_fills_hbm_used_ratio_from_the_engine_gauge_and_follows_it_down() -> None:
    engine = TextEngine()
    async with servers.serve(engine.handle) as url:
        target = sample.EngineTarget("de-0", "n1", "decode", f"{url}/metrics")
        async with scrape.ScrapeCollector() as collector:
            busy = await collector.collect([target], window_s=WINDOW)
            engine.ratio = "0.0"
            idle = await collector.collect([target], window_s=WINDOW)
    assert busy.engines[0].hbm_used_ratio == pytest.approx(0.375)
    assert idle.engines[0].hbm_used_ratio == 0.0


async def test_scrape_without_the_gauge_leaves_hbm_used_ratio_unknown() -> None:
    async def old_engine(request: web.Request) -> web.Response:
        text = "".join(line + "\n" for line in ENGINE_TEXT.splitlines()[:4])
        return web.Response(text=text, content_type="text/plain")

    async with servers.serve(old_engine) as url:
        target = sample.EngineTarget("de-0", "n1", "decode", f"{url}/metrics")
        async with scrape.ScrapeCollector() as collector:
            s = await collector.collect([target], window_s=WINDOW)
    assert s.engines[0].hbm_used_ratio is None
    assert s.engines[0].queued_tokens == 640


async def test_prometheus_default_query_reads_the_gauge_by_pod() -> None:
    prom = servers.FakePrometheus()
    async with servers.serve(prom.handle) as url, prometheus.PrometheusCollector(url) as collector:
        query = collector.render(collector.queries.hbm_used_ratio or "", WINDOW)
        assert query == "max by (pod) (dualpath_engine_kv_cache_used_ratio{})"
        prom.answers[query] = [({"pod": "de-0"}, 0.625), ({"pod": "pe-0"}, 0.0)]
        targets = (
            sample.EngineTarget(pod="pe-0", node="n0", role="prefill"),
            sample.EngineTarget(pod="de-0", node="n1", role="decode"),
        )
        s = await collector.collect(targets, window_s=WINDOW)
    assert query in prom.queries
    by_pod = {engine.pod: engine.hbm_used_ratio for engine in s.engines}
    assert by_pod == {"pe-0": 0.0, "de-0": 0.625}
