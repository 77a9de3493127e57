"""The CPU-quick variant of the engine benchmarks (``python -m bench.engine --cpu --quick``): the KV-load
microbenchmark's mechanics (every mode moves every block through the read path it should, each landed
block verified, ratios computed from the measured rates), the overlap section's measurements and the
markdown summary. No timing claims: the 2-core CI machine measures contention, not the design.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.engine import cluster, kvload, overlap, replay, report, settings
from dualpath_engine.workload import replay as workload

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def quick() -> settings.BenchSettings:
    return settings.preset("cpu-quick")


@pytest.fixture(scope="module")
def kv_results(quick: settings.BenchSettings) -> dict[str, Any]:
    return asyncio.run(kvload.run(quick.kvload, "cpu", 0))


def test_every_mode_loads_every_block_on_its_read_paths(
    quick: settings.BenchSettings, kv_results: dict[str, Any]
) -> None:
    cfg = quick.kvload
    expected = cfg.requests * cfg.blocks_per_request * kv_results["block_bytes"]
    by_mode = {row["mode"]: row for row in kv_results["results"]}
    assert list(by_mode) == list(kvload.MODES)
    for row in by_mode.values():
        assert row["bytes"] == expected
        assert sum(row["read_bytes_per_node"].values()) == expected
        assert row["blocks_verified"] > 0
        assert row["seconds"] > 0
    assert by_mode["pe_only"]["read_bytes_per_node"] == {"pe0": expected, "de0": 0, "de1": 0}
    assert by_mode["pe_only"]["cnic_rx_bytes_pe"] == 0
    assert by_mode["de_only"]["read_bytes_per_node"]["pe0"] == 0
    assert by_mode["de_only"]["cnic_rx_bytes_pe"] == expected  # DE-path KV crosses the PE's compute NIC
    # The shorter-queue rule spreads a batch submitted at once over all three storage NICs.
    assert all(value > 0 for value in by_mode["dualpath"]["read_bytes_per_node"].values())
    assert all(value > 0 for value in by_mode["split"]["read_bytes_per_node"].values())


def test_ratios_are_the_measured_rates_against_basic_and_the_budgets(
    quick: settings.BenchSettings, kv_results: dict[str, Any]
) -> None:
    ratios = kv_results["ratios"]
    by_mode = {row["mode"]: row["bytes_per_s"] for row in kv_results["results"]}
    assert ratios["ideal_dualpath_over_basic"] == 3.0
    assert ratios["pe_only_over_basic"] == 1.0
    assert ratios["dualpath_over_basic"] == pytest.approx(by_mode["dualpath"] / by_mode["pe_only"])
    budgets = 3 * quick.kvload.storage_budget_bytes_per_s
    assert ratios["sum_of_budgets_bytes_per_s"] == budgets
    assert ratios["dualpath_over_sum_of_budgets"] == pytest.approx(by_mode["dualpath"] / budgets)
    summary = report.kvload(kv_results)
    assert any(line.startswith("| dualpath |") for line in summary)
    assert any("DualPath / Basic" in line for line in summary)


def test_overlap_section_measures_load_compute_and_overlap(quick: settings.BenchSettings) -> None:
    data = overlap.run(quick.overlap, "cpu", h2d_ceiling_bytes_per_s=1e9)
    assert [p["appended_tokens"] for p in data["points"]] == list(quick.overlap.appended)
    for point in data["points"]:
        assert point["t_load_s"] > 0 and point["t_comp_s"] > 0 and point["t_overlap_s"] > 0
        expected = (point["t_load_s"] + point["t_comp_s"] - point["t_overlap_s"]) / min(
            point["t_load_s"], point["t_comp_s"]
        )
        assert point["overlap_efficiency"] == pytest.approx(expected)
    assert data["full_block_over_ceiling"] == pytest.approx(data["copies"]["full_block_bytes_per_s"] / 1e9)
    assert "| Hit tokens |" in "\n".join(report.overlap(data))


def test_presets_and_unknown_names() -> None:
    gpu4 = settings.preset("gpu", gpus=4)
    assert [t.name for t in gpu4.replay.topologies] == ["1P2D", "1P3D", "2P2D"]
    assert [t.name for t in settings.preset("gpu", gpus=2).replay.topologies] == ["1P2D", "1P1D"]
    with pytest.raises(ValueError, match="unknown preset"):
        settings.preset("tpu")


def test_placement_puts_prefill_and_decode_engines_on_separate_gpus() -> None:
    def gpus(prefill: int, decode: int, count: int) -> list[int | None]:
        topology = settings.Topology(prefill=prefill, decode=decode, gpus=count)
        return [gpu for _, _, gpu in cluster.placement(topology)]

    assert gpus(1, 2, 2) == [0, 1, 1]
    assert gpus(1, 1, 2) == [0, 1]
    assert gpus(1, 3, 4) == [0, 1, 2, 3]
    assert gpus(2, 2, 4) == [0, 1, 2, 3]
    assert gpus(1, 2, 0) == [None, None, None]


def _result(started_s: float, ttft_s: float, error: str | None = None) -> workload.RequestResult:
    return workload.RequestResult("t", 0, started_s, 10, (1, 2), 0, ttft_s, 0.01, ttft_s + 0.02, error)


def test_online_warmup_leaves_early_requests_out_of_the_judged_window() -> None:
    results = (_result(0.5, 9.0), _result(1.0, 9.0, "boom"), _result(3.0, 0.1), _result(4.0, 0.3))
    summary = workload.Summary.of([])
    rep = workload.Report("dualpath", 5.0, 4, 1, 2, 2, 40, 0, 8, summary, summary, summary, (), results)
    window = replay.after_warmup(rep, 2.0)
    assert (window["requests"], window["failed_requests"]) == (2, 0)
    assert window["ttft_s"]["mean"] == pytest.approx(0.2)
    assert replay.within_slo(window, ttft_s=0.25, tpot_s=0.05)
    assert not replay.within_slo(replay.after_warmup(rep, 0.0), ttft_s=0.25, tpot_s=0.05)  # the failure
    with pytest.raises(ValueError, match="online_warmup_s"):
        settings.ReplaySettings(online_duration_s=10.0, online_warmup_s=10.0)


def _search(rates: list[float], refine: int, limit: float) -> replay.Capacity:
    async def measure(rate: float) -> dict[str, Any]:
        return {"rate": rate, "within_slo": rate <= limit}

    return asyncio.run(replay.search_capacity(rates, refine, measure))


def test_capacity_search_climbs_then_bisects_the_bracket() -> None:
    found = _search([0.25, 0.5, 1.0, 2.0], refine=2, limit=0.7)
    assert [step["rate"] for step in found.steps] == [0.25, 0.5, 1.0, 0.75, 0.625]
    assert (found.within, found.beyond) == (0.625, 0.75)
    assert _search([0.25, 0.5], refine=3, limit=9.0).beyond is None  # never failed: nothing to bisect
    first_fails = _search([0.5, 1.0], refine=1, limit=0.3)
    assert (first_fails.within, first_fails.beyond) == (0.25, 0.5)  # bisected from [0, 0.5)


def test_online_summary_states_the_capacity_bracket() -> None:
    def step(rate: float, ok: bool) -> dict[str, Any]:
        return {"rate": rate, "within_slo": ok, "ttft_s": {"mean": 0.1}, "tpot_s": {"mean": 0.002},
                "requests": 10, "failed_requests": 0}  # fmt: skip

    data = {
        "topology": "1P2D",
        "slo": {"ttft_mean_s": 0.25, "tpot_mean_s": 0.05},
        "modes": {
            "basic": {
                "capacity_rate": 0.375,
                "beyond_rate": 0.4,
                "steps": [step(0.375, True), step(0.4, False)],
            },
            "dualpath": {
                "capacity_rate": 0.9,
                "beyond_rate": 0.95,
                "steps": [step(0.9, True), step(0.95, False)],
            },
        },
        "capacity_dualpath_over_basic": 2.4,
        "capacity_ratio_bounds": [0.9 / 0.4, 0.95 / 0.375],
    }
    text = "\n".join(report.online(data))
    assert "basic [0.375, 0.4), dualpath [0.9, 0.95): the ratio lies in [2.25, 2.53)" in text


def _counters(**buckets: tuple[float, float, float]) -> dict[str, float]:
    """Summed engine counters with the given decode buckets (steps, tokens, seconds) and no prefill."""
    out = dict.fromkeys((*cluster.DECODE_KEYS, *cluster.PREFILL_KEYS), 0.0)
    for bucket, (steps, tokens, seconds) in buckets.items():
        name = bucket.removeprefix("b").replace("_", "-")
        out |= {
            f"batch:{name}:steps": steps,
            f"batch:{name}:tokens": tokens,
            f"batch:{name}:seconds": seconds,
        }
    return out


def test_decode_by_batch_is_the_difference_of_two_readings_in_bucket_order() -> None:
    before = _counters(b1=(10, 10, 0.02))
    after = _counters(b1=(30, 30, 0.06), b5_8=(5, 30, 0.025), b3_4=(4, 14, 0.012))
    split = replay._decode_split(before, after)
    assert list(split["decode_by_batch"]) == ["1", "3-4", "5-8"]  # numeric order, not text order
    assert split["decode_by_batch"]["1"] == {"steps": 20, "tokens": 20, "step_ms": pytest.approx(2.0)}
    assert split["decode_by_batch"]["5-8"]["step_ms"] == pytest.approx(5.0)
    assert split["decode_batch_mean"] == pytest.approx((20 + 30 + 14) / (20 + 5 + 4))


def test_equal_batch_ratio_compares_step_times_at_the_same_batch_not_the_batch_mix() -> None:
    # DualPath decodes bigger batches (higher TPOT) but each step costs what Basic's step costs at that
    # batch size: the equal-batch ratio is 1.0 although the mean step time differs by a factor of 2.
    basic = {
        "1": {"steps": 100, "tokens": 100, "step_ms": 2.0},
        "5-8": {"steps": 40, "tokens": 240, "step_ms": 4.0},
    }
    dual = {
        "1": {"steps": 20, "tokens": 20, "step_ms": 2.0},
        "5-8": {"steps": 100, "tokens": 600, "step_ms": 4.0},
    }
    assert replay.equal_batch_step_ratio(dual, basic) == pytest.approx(1.0)
    slower = {**dual, "5-8": {**dual["5-8"], "step_ms": 4.4}}
    assert replay.equal_batch_step_ratio(slower, basic) == pytest.approx(
        (20 * 2.0 + 600 * 4.4) / (20 * 2 + 600 * 4)
    )
    # Buckets with fewer than min_steps steps in either mode are left out; none shared -> None.
    assert replay.equal_batch_step_ratio(slower, basic, min_steps=21) == pytest.approx(1.1)
    assert replay.equal_batch_step_ratio({"9-16": dual["5-8"]}, basic) is None


def test_offline_ratios_flag_modes_that_reused_different_shares_of_the_context() -> None:
    def run(makespan: float, hit: float, balance: float = 1.0) -> dict[str, Any]:
        return {"makespan_s": makespan, "hit_ratio": hit, "storage_max_over_avg": balance,
                "tpot_s": {"mean": 0.002}, "nic_bytes": {"n": {"storage_rx": 100.0}}}  # fmt: skip

    runs = {"basic": run(100, 0.82, 3.0), "dualpath": run(40, 0.81, 1.02), "oracle": run(20, 0.88)}
    ratios = replay.offline_ratios(runs)
    assert ratios["jct_basic_over_dualpath"] == pytest.approx(2.5)
    assert ratios["hit_ratio_spread"] == pytest.approx(0.01)  # Oracle (no I/O) is not part of the spread
    assert "not comparable" not in "\n".join(report.offline({**_offline(runs), "ratios": ratios}))
    runs["dualpath-split"] = run(25, 0.35, 1.1)
    ratios = replay.offline_ratios(runs)
    assert ratios["jct_basic_over_dualpath_split"] == pytest.approx(4.0)
    assert ratios["storage_max_over_avg_dualpath_split"] == pytest.approx(1.1)
    assert ratios["hit_ratio_spread"] == pytest.approx(0.47)
    assert "**not comparable**" in "\n".join(report.offline({**_offline(runs), "ratios": ratios}))


def _offline(runs: dict[str, Any]) -> dict[str, Any]:
    modes = {mode: {**r, "ttft_s": {"mean": 0.1}, "failed_requests": 0} for mode, r in runs.items()}
    return {"name": "1P2D", "ideal_ratio": 3.0, "requests": 10, "modes": modes}


def test_online_ratios_need_both_modes_and_bound_the_capacity_ratio() -> None:
    def step(rate: float, ok: bool, step_ms: float) -> dict[str, Any]:
        batches = {"1": {"steps": 500, "tokens": 500, "step_ms": step_ms}}
        return {"rate": rate, "within_slo": ok, "decode_by_batch": batches}

    basic = {
        "capacity_rate": 0.1,
        "beyond_rate": 0.15,
        "steps": [step(0.1, True, 1.6), step(0.15, False, 1.7)],
    }
    dual = {"capacity_rate": 0.5, "beyond_rate": 0.55, "steps": [step(0.1, True, 1.68), step(0.5, True, 1.7)]}
    # One mode per process (two GPU pairs side by side): no ratio from a lone ladder, not 0.
    alone = replay.online_ratios({"basic": basic})
    assert alone["capacity_dualpath_over_basic"] is None
    slo = {"ttft_mean_s": 0.25, "tpot_mean_s": 0.05}
    text = "\n".join(report.online({"topology": "1P2D", "slo": slo, "modes": {}, **alone}))
    assert "Capacity DualPath / Basic = -" in text
    ratios = replay.online_ratios({"basic": basic, "dualpath": dual})
    assert ratios["capacity_dualpath_over_basic"] == pytest.approx(5.0)
    assert ratios["capacity_ratio_bounds"] == pytest.approx([0.5 / 0.15, 0.55 / 0.1])
    assert ratios["decode_step_equal_batch_by_rate"] == {"0.1": pytest.approx(1.05)}  # the one shared rate
