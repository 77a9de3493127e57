"""The whole loop on the local cluster with real engine processes (issue 5 item 6, issue 6 item 2):
traffic through the scheduler on both read paths, path weights that follow storage-NIC load and
degradation, a P/D ratio that follows pressure and holds under constant load, role switches without a
failed request, and a telemetry outage that causes no action.

Clusters are the demo example (tiny CPU model, emulated NICs at 1 Gbit/s of storage budget) with the
changes each test names. "Within N intervals" allows the rate window on top (a rate over a window
reacts over that window).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import harness
from tests.e2e import conftest as e2e
from tests.e2e import stack as stack_mod

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

INTERVAL_S = 5.0
WINDOW_S = 10.0
STORAGE_BPS = 125e6  # 1 Gbit/s emulated storage budget (spec.network.emulation.storageBudgetGbps: 1)


def fixed(stack: stack_mod.LocalStack, prefill: int, decode: int, *, prometheus: bool) -> Any:
    def mutate(spec: dict[str, Any]) -> None:
        spec["ratio"] = {"mode": "Fixed", "prefill": prefill, "decode": decode}
        spec["prefill"].update({"min": 1, "max": 2})
        spec["decode"].update({"min": 1, "max": 2})
        spec["rebalance"].update({"interval": "5s", "cooldown": "10s", "drainTimeout": "20s"})
        spec["telemetry"] = {"source": "Scrape", "interval": "5s", "window": "10s"}
        if prometheus:
            spec["telemetry"].update({"source": "Prometheus", "prometheusUrl": stack.prometheus_url})

    return mutate


@pytest.fixture(scope="class")
def weighted(stack: stack_mod.LocalStack) -> Iterator[str]:
    """A Fixed 1P2D cluster whose telemetry comes from Prometheus (node_exporter + engines); it takes
    three of the stack's four nodes, so it exists only while the weights tests run."""
    stack.apply(e2e.cluster_body("weights", fixed(stack, 1, 2, prometheus=True)))
    e2e.wait_ready(stack, "weights", "1P:2D")
    stack.wait_condition("weights", "TelemetryAvailable", "True", timeout_s=120)
    yield "weights"
    e2e.delete_and_wait(stack, "weights")


class TestPathWeights:
    """Path weights on one Fixed 1P2D cluster fed by Prometheus."""

    def test_traffic_uses_both_paths_and_weights_shift_away_from_a_saturated_pe_storage_nic(
        self, stack: stack_mod.LocalStack, weighted: str
    ) -> None:
        pe, des = e2e.pe_node(stack, weighted), e2e.de_nodes(stack, weighted)
        with e2e.Traffic(stack, weighted) as traffic:
            harness.wait_for("traffic flowing", lambda: traffic.ok >= 6, 180)
            before = e2e.engine_kv_bytes(stack, weighted)
            # Other traffic takes 80 % of the PE node's storage NIC; the DE nodes' NICs stay idle.
            stack.add_background_traffic(pe, 0.8 * STORAGE_BPS)
            t0 = time.monotonic()

            def shifted(st: dict[str, Any]) -> bool:
                w = e2e.weights_of(st)
                return pe in w and all(d in w for d in des) and all(w[pe] < 0.5 * w[d] for d in des)

            st = stack.wait_status(weighted, shifted, "PE node's weight below half of each DE node's", 60)
            shift_s = time.monotonic() - t0
            harness.wait_for("more traffic after the shift", lambda: traffic.ok >= 12, 180)
            after = e2e.engine_kv_bytes(stack, weighted)
        stack.background[pe].stop()

        assert shift_s <= 2 * INTERVAL_S + WINDOW_S + 5, f"weights shifted after {shift_s:.1f}s"
        assert after["de"] > before["de"], (before, after)
        assert after["pe"] > 0 and after["de"] > 0
        assert traffic.failures == [] and traffic.mismatches == []
        final = stack.get(weighted)["status"]
        expected = {
            "Ready": ("True", "AllReady"),
            "Degraded": ("False", "AsExpected"),
            "Rebalancing": ("False", "Disabled"),
            "TelemetryAvailable": ("True", "TelemetryFresh"),
            "RDMAReady": ("False", "KVOverTCP"),  # local engines move KV over TCP, and status says so
        }
        for kind, (status, reason) in expected.items():
            c = stack_mod.condition(final, kind)
            assert c is not None and (c["status"], c["reason"]) == (status, reason), (kind, c)
        assert abs(sum(e2e.weights_of(st).values()) - 1.0) < 0.01

    def test_a_storage_nic_degraded_to_half_gets_about_half_the_weight(
        self, stack: stack_mod.LocalStack, weighted: str
    ) -> None:
        des = e2e.de_nodes(stack, weighted)
        slow, healthy = des[0], des[1]
        stack.set_storage_budget(slow, 0.5 * STORAGE_BPS)

        def halved(st: dict[str, Any]) -> bool:
            w = e2e.weights_of(st)
            return slow in w and healthy in w and 0.35 <= w[slow] / w[healthy] <= 0.65

        stack.wait_status(weighted, halved, "degraded DE node's weight at ~half the healthy one's", 60)
        stack.set_storage_budget(slow, STORAGE_BPS)

        def restored(st: dict[str, Any]) -> bool:
            w = e2e.weights_of(st)
            return slow in w and healthy in w and w[slow] / w[healthy] > 0.85

        stack.wait_status(weighted, restored, "weight restored with the link", 90)

    def test_a_prometheus_outage_causes_no_action_and_recovers(
        self, stack: stack_mod.LocalStack, weighted: str
    ) -> None:
        held = stack.get(weighted)["status"]
        stack.stop_prometheus()
        try:
            cond = stack.wait_condition(
                weighted, "TelemetryAvailable", "False", timeout_s=2 * INTERVAL_S + 15
            )
            assert cond["reason"] == "TelemetryUnreachable", cond
            frozen = e2e.weights_of(stack.get(weighted)["status"])
            assert frozen, "weights were cleared instead of held"
            # Two more intervals without telemetry: nothing moves (weights held, ratio unchanged).
            deadline = time.monotonic() + 2 * INTERVAL_S
            while time.monotonic() < deadline:
                during = stack.get(weighted)["status"]
                assert e2e.weights_of(during) == frozen
                assert during["desiredRatio"] == held["desiredRatio"]
                time.sleep(1)
        finally:
            stack.start_prometheus()
        stack.wait_condition(weighted, "TelemetryAvailable", "True", timeout_s=60)
        events = [e["reason"] for e in stack.events(weighted)]
        assert "TelemetryUnreachable" in events and "TelemetryFresh" in events


def test_the_ratio_holds_under_constant_load_then_follows_prefill_and_decode_pressure(
    stack: stack_mod.LocalStack,
) -> None:
    def auto(spec: dict[str, Any]) -> None:
        spec["ratio"] = {"mode": "Auto", "prefill": 1, "decode": 2, "gpuBudget": 24}
        spec["prefill"].update({"min": 1, "max": 2})
        spec["decode"].update({"min": 1, "max": 2})
        spec["rebalance"].update(
            {"interval": "5s", "cooldown": "10s", "stabilizationWindows": 2, "mode": "RoleSwitch",
             "drainTimeout": "20s", "slo": {"ttftMs": 600000, "tpotMs": 60000}}
        )  # fmt: skip
        spec["telemetry"] = {"source": "Scrape", "interval": "5s", "window": "10s"}

    body = e2e.cluster_body("auto", auto)
    stack.apply(body)
    try:
        e2e.wait_ready(stack, "auto", "1P:2D")
        with e2e.Traffic(stack, "auto") as traffic:
            # (d) 20 intervals of constant load and generous SLOs: the ratio does not move.
            stack.wait_condition("auto", "TelemetryAvailable", "True", timeout_s=120)
            deadline = time.monotonic() + 20 * INTERVAL_S
            while time.monotonic() < deadline:
                st = stack.get("auto")["status"]
                assert st["desiredRatio"] == "1P:2D", st.get("lastDecision")
                time.sleep(1)
            assert not [e for e in stack.events("auto") if e["reason"].startswith("Shift")]

            # (c) prefill pressure (TTFT far above its objective): a decode group becomes a prefill group.
            body["spec"]["rebalance"]["slo"] = {"ttftMs": 1, "tpotMs": 60000}
            stack.apply(body)
            st = e2e.wait_ready(stack, "auto", "2P:1D", timeout_s=180)
            assert st["desiredRatio"] == "2P:1D" and st["lastDecision"]["action"] == "ShiftToPrefill"

            # ... and decode pressure (TPOT above its objective) moves it back after the cooldown.
            body["spec"]["rebalance"]["slo"] = {"ttftMs": 600000, "tpotMs": 1}
            stack.apply(body)
            st = e2e.wait_ready(stack, "auto", "1P:2D", timeout_s=180)
            assert st["lastDecision"]["action"] == "ShiftToDecode"
        reasons = [e["reason"] for e in stack.events("auto")]
        assert (
            "ShiftToPrefill" in reasons and "ShiftToDecode" in reasons and "EngineGroupSwitching" in reasons
        )
        assert traffic.failures == [] and traffic.mismatches == []
    finally:
        e2e.delete_and_wait(stack, "auto")


def test_ten_in_place_role_switches_under_traffic_fail_no_request_and_restart_no_engine(
    stack: stack_mod.LocalStack,
) -> None:
    body = e2e.cluster_body("switch", fixed(stack, 1, 2, prometheus=False))
    body["spec"]["rebalance"]["mode"] = "RoleSwitch"
    stack.apply(body)
    try:
        e2e.wait_ready(stack, "switch", "1P:2D")
        pids = {p.pod: p.pid for p in stack.pods("switch") if p.component == "engine"}
        with e2e.Traffic(stack, "switch") as traffic:
            harness.wait_for("traffic flowing", lambda: traffic.ok >= 3, 180)
            for i in range(10):
                p, d = (2, 1) if i % 2 == 0 else (1, 2)
                body["spec"]["ratio"].update({"prefill": p, "decode": d})
                stack.apply(body)
                e2e.wait_ready(stack, "switch", f"{p}P:{d}D", timeout_s=120)
                stack.wait_condition("switch", "Rebalancing", "False", timeout_s=120)
            served = traffic.ok
            harness.wait_for("traffic after the last switch", lambda: traffic.ok >= served + 3, 120)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.mismatches == [], traffic.mismatches[:5]
        now = {p.pod: p.pid for p in stack.pods("switch") if p.component == "engine"}
        assert now == pids  # same pods, same processes: switched in place, no restart, no model reload
        switches = [e for e in stack.events("switch") if e["reason"] == "EngineGroupSwitching"]
        assert len(switches) >= 10
    finally:
        e2e.delete_and_wait(stack, "switch")
