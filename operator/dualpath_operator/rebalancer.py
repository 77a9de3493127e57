"""The rebalance I/O around the pure planners: per-cluster runtime state (telemetry collector, ratio
planner memory, tick timing, the scheduler admin token), telemetry samples on each tick, the
scheduler's view of engine groups, and the admin calls a plan asks for.

Used by :mod:`dualpath_operator.reconcile`. Nothing here decides anything: decisions are in
``planning`` (weights, ratio, engine-pod actions); this module only fetches inputs and carries out
scheduler-side actions. Every failure degrades to "unknown" (the planners then hold).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field

from dualpath_operator import scheduler_admin
from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import common
from dualpath_operator.api.v1alpha1 import rebalancing as rebalancing_api
from dualpath_operator.api.v1alpha1 import spec as specs
from dualpath_operator.k8s import apply
from dualpath_operator.k8s import client as k8s_client
from dualpath_operator.planning import observed as obs
from dualpath_operator.planning import plans, ratio, telemetry
from dualpath_operator.rendering import engine_config, names
from dualpath_operator.telemetry import factory, sample

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the operator remembers about one cluster between passes (in memory only)."""

    ratio_state: ratio.RatioState = field(default_factory=ratio.RatioState)
    last_tick: float | None = None
    collector: factory.Collector | None = None
    collector_key: str | None = None
    token: str | None = None

    async def close(self) -> None:
        if self.collector is not None:
            await self.collector.close()
            self.collector = None


def interval_s(spec: api.DualPathClusterSpec) -> float:
    return float(common.parse_duration(spec.rebalance.interval))


def tick_due(rt: Runtime, spec: api.DualPathClusterSpec, now_mono: float) -> bool:
    return spec.rebalance.enabled and (rt.last_tick is None or now_mono - rt.last_tick >= interval_s(spec))


def until_next_tick(rt: Runtime, spec: api.DualPathClusterSpec, now_mono: float) -> float | None:
    if not spec.rebalance.enabled:
        return None
    if rt.last_tick is None:
        return 0.0
    return max(0.0, rt.last_tick + interval_s(spec) - now_mono)


def scheduler_base_url(observed: obs.Observed, spec: api.DualPathClusterSpec) -> str | None:
    """The scheduler at its pod IP (reachable in-cluster and, with loopback pod IPs, locally)."""
    if not observed.scheduler.pod_ips:
        return None
    return f"http://{observed.scheduler.pod_ips[0]}:{spec.scheduler.port}"


class Rebalancer:
    """Per-cluster runtimes and the I/O of rebalance ticks."""

    def __init__(self, client: k8s_client.AsyncClient) -> None:
        self.client = client
        self.runtimes: dict[tuple[str, str], Runtime] = {}

    def runtime(self, key: tuple[str, str]) -> Runtime:
        return self.runtimes.setdefault(key, Runtime())

    async def forget(self, key: tuple[str, str]) -> None:
        rt = self.runtimes.pop(key, None)
        if rt is not None:
            await rt.close()

    async def close(self) -> None:
        for key in list(self.runtimes):
            await self.forget(key)

    # ---- the scheduler ---------------------------------------------------------------------------------
    async def _admin(
        self, rt: Runtime, namespace: str, name: str, base_url: str
    ) -> scheduler_admin.SchedulerAdmin | None:
        if rt.token is None:
            rt.token = await apply.read_admin_token(
                self.client, namespace, names.admin_secret(name), engine_config.ADMIN_TOKEN_KEY
            )
        if rt.token is None:
            return None
        return scheduler_admin.SchedulerAdmin(base_url=base_url, token=rt.token, timeout_s=3.0)

    async def groups(
        self, key: tuple[str, str], spec: api.DualPathClusterSpec, observed: obs.Observed
    ) -> tuple[obs.ObservedGroup, ...] | None:
        """The scheduler's engine groups, or None when it cannot be asked."""
        base = scheduler_base_url(observed, spec)
        if base is None:
            return None
        rt = self.runtime(key)
        admin = await self._admin(rt, key[0], key[1], base)
        if admin is None:
            return None
        try:
            raw = await admin.groups()
        except scheduler_admin.AdminError as e:
            log.info("scheduler of %s/%s not reachable: %s", key[0], key[1], e)
            rt.token = None  # re-read next time (it may have been recreated)
            return None
        return tuple(
            obs.ObservedGroup(
                group_id=g.group_id, node=g.node, role=g.role, drained=g.drained, in_flight=g.in_flight,
                switching_to=g.switching_to,
            )
            for g in raw
        )  # fmt: skip

    async def carry_out(
        self, key: tuple[str, str], spec: api.DualPathClusterSpec, observed: obs.Observed, plan: plans.Plan
    ) -> list[str]:
        """Admin calls of the plan (drains, role switches, weights). Returns the failures, as text."""
        if not plan.scheduler_actions and plan.push_capacities is None:
            return []
        base = scheduler_base_url(observed, spec)
        rt = self.runtime(key)
        admin = await self._admin(rt, key[0], key[1], base) if base is not None else None
        if admin is None:
            return ["scheduler admin API unavailable (no ready scheduler pod or no admin token yet)"]
        errors: list[str] = []
        for action in plan.scheduler_actions:
            try:
                if action.kind == "drain":
                    await admin.drain(action.group_id, True)
                elif action.kind == "role" and action.role is not None:
                    await admin.set_role(action.group_id, action.role)
            except scheduler_admin.AdminError as e:
                errors.append(str(e))
        if plan.push_capacities:
            try:
                await admin.put_weights(plan.push_capacities)
            except scheduler_admin.AdminError as e:
                errors.append(str(e))
        return errors

    # ---- telemetry -------------------------------------------------------------------------------------
    async def sample(
        self, key: tuple[str, str], spec: api.DualPathClusterSpec, observed: obs.Observed, now: dt.datetime
    ) -> telemetry.TelemetrySample:
        rt = self.runtime(key)
        base = scheduler_base_url(observed, spec)
        wanted = f"{spec.telemetry.model_dump_json()}|{base}"
        if rt.collector is None or rt.collector_key != wanted:
            await rt.close()
            rt.collector = factory.build(spec, scheduler_metrics_url=f"{base}/metrics" if base else None)
            rt.collector_key = wanted
        targets = [
            sample.EngineTarget(
                pod=p.name,
                node=p.node,
                role=p.role,
                metrics_url=f"http://{p.pod_ip}:{spec.engine.port}/metrics" if p.pod_ip else None,
            )
            for p in observed.pods
            if p.node is not None and not p.terminating
        ]
        nodes = sorted({t.node for t in targets})
        return await rt.collector.collect(targets, window_s=factory.window_s(spec), nodes=nodes, now=now)


def needs_groups(
    spec: api.DualPathClusterSpec,
    observed: obs.Observed,
    tick: bool,
    want: dict[str, int] | None = None,
    rebalancing: bool = False,
) -> bool:
    """Ask the scheduler only when its view matters: drains in flight, a ratio change in flight
    (``rebalancing``), Auto mode, a tick, or (RoleSwitch) pod counts per role that differ from
    ``want``, so that a group can switch role in place."""
    draining = any(p.draining_since is not None for p in observed.pods)
    if draining or rebalancing or tick or spec.ratio.mode is specs.RatioMode.AUTO:
        return True
    if want is None or spec.rebalance.mode is not rebalancing_api.RebalanceMode.ROLE_SWITCH:
        return False
    live = [p for p in observed.pods if not p.terminating]
    return any(sum(1 for p in live if p.role == role) != n for role, n in want.items())


def with_groups(observed: obs.Observed, groups: tuple[obs.ObservedGroup, ...] | None) -> obs.Observed:
    return dataclasses.replace(observed, groups=groups)
