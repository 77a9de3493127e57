"""One idempotent reconcile pass of a DualPathCluster: gather -> plan -> apply -> status.

``Reconciler.run((namespace, name))`` is what the controller's work queue calls. A pass:

1. reads the DualPathCluster (gone: nothing to do; garbage collection removes the children);
2. validates its spec with the API models (a spec the API server accepted but the models reject is
   reported as Degraded, never acted on);
3. gathers the owned children (:mod:`k8s.gather`) into a pure ``Observed``;
4. plans (:func:`planning.planner.plan`: pure, with ``now`` passed in);
5. applies: server-side apply of the rendered children, create-once Secret, pod metadata patches,
   deletes of owned pods only. Errors are collected, not fatal to the status write;
6. writes the whole status through the status subresource, unless it equals the live status;
7. posts the plan's events (transitions only).

It never writes the DualPathCluster's spec or metadata.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from prometheus_client import CollectorRegistry

from dualpath_operator import metrics as metrics_mod
from dualpath_operator import rebalancer as rebalancer_mod
from dualpath_operator import settings as settings_mod
from dualpath_operator.api import conditions as cond
from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import common
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.k8s import apply, events, gather
from dualpath_operator.k8s import client as k8s_client
from dualpath_operator.planning import planner, plans
from dualpath_operator.rendering import engine_config, labels, manifests

log = logging.getLogger(__name__)
Key = tuple[str, str]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Reconciler:
    """Holds the API client, the metrics and the last status seen per cluster (for the collector)."""

    client: k8s_client.AsyncClient
    config: settings_mod.OperatorConfig
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    clock: Callable[[], dt.datetime] = _now
    views: dict[Key, metrics_mod.ClusterMetricsView] = field(default_factory=dict)
    metrics: metrics_mod.OperatorMetrics = field(init=False)
    counter: k8s_client.RequestCounter | None = field(default=None, init=False)
    monotonic: Callable[[], float] = time.monotonic
    rebalancer: rebalancer_mod.Rebalancer = field(init=False)
    _server: metrics_mod.MetricsServer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.metrics = metrics_mod.OperatorMetrics(self.registry, self._cluster_views)
        self.rebalancer = rebalancer_mod.Rebalancer(self.client)

    @classmethod
    def from_config(cls, config: settings_mod.OperatorConfig, kubeconfig: str | None = None) -> Reconciler:
        registry = CollectorRegistry()
        counter = k8s_client.RequestCounter()
        rec = cls(
            client=k8s_client.make_client(kubeconfig, config.field_manager, counter),
            config=config,
            registry=registry,
        )
        rec.counter = counter
        counter.listeners.append(rec.count_request)
        return rec

    def count_request(self, method: str) -> None:
        self.metrics.api_requests.labels(method=method).inc()

    def _cluster_views(self) -> Iterable[metrics_mod.ClusterMetricsView]:
        return list(self.views.values())

    def start_metrics_server(self) -> metrics_mod.MetricsServer:
        if self._server is None:
            self._server = metrics_mod.start_server(
                self.registry, self.config.metrics_host, self.config.metrics_port
            )
        return self._server

    async def close(self) -> None:
        await self.rebalancer.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.client.close()

    # ---- one pass ------------------------------------------------------------------------------------
    async def run(self, key: Key) -> float | None:
        if self.counter is None:
            with self.metrics.time_reconcile():
                return await self.reconcile(*key)
        with self.counter.counting_pass() as requests, self.metrics.time_reconcile():
            try:
                return await self.reconcile(*key)
            finally:
                self.metrics.api_requests_per_pass.observe(sum(requests.values()))

    async def reconcile(self, namespace: str, name: str) -> float | None:
        try:
            obj = await self.client.get(k8s_client.DualPathCluster, name=name, namespace=namespace)
        except k8s_client.ApiError as e:
            if e.status.code == 404:
                self.views.pop((namespace, name), None)
                await self.rebalancer.forget((namespace, name))
                return None
            raise
        body: dict[str, Any] = obj.to_dict()  # type: ignore[no-untyped-call]
        meta = body["metadata"]
        live_status: dict[str, Any] = body.get("status") or {}
        previous = _previous_status(live_status)
        now = self.clock()
        try:
            cluster = api.DualPathCluster.model_validate(body)
        except pydantic.ValidationError as e:
            await self._write_invalid(body, previous, now, _validation_message(e))
            return None
        ref = manifests.ClusterRef(name=name, namespace=namespace, uid=meta["uid"])
        key = (namespace, name)
        spec = cluster.spec
        observed = await gather.gather(self.client, namespace, name, ref.uid)
        rt = self.rebalancer.runtime(key)
        mono = self.monotonic()
        tick = rebalancer_mod.tick_due(rt, spec, mono) and bool(observed.pods)
        in_flight = cond.is_true(previous.conditions or [], cond.ConditionType.REBALANCING)
        if rebalancer_mod.needs_groups(
            spec, observed, tick, planner.desired_counts(spec, previous), in_flight
        ):
            observed = rebalancer_mod.with_groups(observed, await self.rebalancer.groups(key, spec, observed))
        sample = await self.rebalancer.sample(key, spec, observed, now) if tick else None
        view = planner.View(
            ref=ref,
            generation=int(meta.get("generation") or 0),
            spec=cluster.spec,
            observed=observed,
            previous=previous,
            now=now,
            drain_timeout_s=common.parse_duration(cluster.spec.rebalance.drain_timeout),
            sample=sample,
            ratio_state=rt.ratio_state,
        )
        plan = planner.plan(view)
        admin_errors = await self.rebalancer.carry_out(key, spec, observed, plan)
        if tick:
            rt.last_tick = mono
            rt.ratio_state = plan.ratio_state
        for err in admin_errors:
            log.warning("%s/%s: scheduler admin call failed: %s", namespace, name, err)
        if admin_errors:
            # A role switch the scheduler did not accept must not be recorded on the pod either: the
            # label would claim a role the engine does not serve. The next pass tries again.
            plan = dataclasses.replace(
                plan, patch_pods=tuple(p for p in plan.patch_pods if labels.ROLE not in p.labels)
            )
        errors = await self._apply(ref, plan)
        new_status = plan.status
        if errors:
            new_status = _with_apply_failure(new_status, errors, now, view.generation)
        if new_status != live_status:
            await apply.apply_status(self.client, namespace, name, new_status)
        await self._post_events(body, plan.events)
        self._record(namespace, name, new_status, plan)
        if errors:
            raise RuntimeError(f"{len(errors)} write(s) failed for {namespace}/{name}: {errors[0]}")
        delays = [
            d
            for d in (plan.requeue_after_s, rebalancer_mod.until_next_tick(rt, spec, self.monotonic()))
            if d is not None
        ]
        return min(delays) if delays else None

    async def _apply(self, ref: manifests.ClusterRef, plan: plans.Plan) -> list[str]:
        errors: list[str] = []
        for secret in plan.create_secrets:
            try:
                await apply.ensure_admin_secret(self.client, secret, engine_config.ADMIN_TOKEN_KEY)
            except k8s_client.ApiError as e:
                errors.append(f"Secret {secret['metadata']['name']}: {e.status.message}")
        for manifest in plan.apply:
            try:
                await apply.apply(self.client, manifest)
            except k8s_client.ApiError as e:
                errors.append(f"{manifest['kind']} {manifest['metadata']['name']}: {e.status.message}")
        for patch in plan.patch_pods:
            try:
                await apply.patch_pod_metadata(
                    self.client, ref.namespace, patch.name, patch.labels, patch.annotations
                )
            except k8s_client.ApiError as e:
                errors.append(f"Pod {patch.name}: {e.status.message}")
        for delete in plan.delete_pods:
            try:
                await apply.delete_pod(self.client, ref.namespace, delete.name)
            except k8s_client.ApiError as e:
                errors.append(f"Pod {delete.name}: {e.status.message}")
        return errors

    async def _post_events(self, body: dict[str, Any], evs: Iterable[plans.Event]) -> None:
        for ev in evs:
            try:
                await events.post(self.client, body, ev.type, ev.reason, ev.message)
            except k8s_client.ApiError as e:  # an event is best effort: never fail a pass over one
                log.warning("could not post event %s: %s", ev.reason, e.status.message)

    async def _write_invalid(
        self, body: dict[str, Any], previous: api_status.DualPathClusterStatus, now: dt.datetime, message: str
    ) -> None:
        meta = body["metadata"]
        gen = int(meta.get("generation") or 0)
        c, s, r = cond.ConditionType, cond.ConditionStatus, cond.Reason
        msg = f"spec rejected by the operator: {message}"
        conds = cond.set_condition(
            list(previous.conditions or []),
            c.DEGRADED,
            s.TRUE,
            r.APPLY_FAILED,
            msg,
            now,
            observed_generation=gen,
        )
        conds = cond.set_condition(
            conds, c.READY, s.FALSE, r.ENGINES_NOT_READY, "spec is invalid; nothing was changed", now,
            observed_generation=gen,
        )  # fmt: skip
        status = previous.model_copy(update={"observed_generation": gen, "conditions": conds})
        new = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        if new != (body.get("status") or {}):
            await apply.apply_status(self.client, meta["namespace"], meta["name"], new)

    def _record(self, namespace: str, name: str, status: dict[str, Any], plan: plans.Plan) -> None:
        st = _previous_status(status)
        p = st.prefill or api_status.RoleStatus(replicas=0, ready=0)
        d = st.decode or api_status.RoleStatus(replicas=0, ready=0)
        want_p, want_d = api_status.parse_ratio(st.desired_ratio) if st.desired_ratio else (0, 0)
        conds = st.conditions or []
        self.views[(namespace, name)] = metrics_mod.ClusterMetricsView(
            namespace=namespace,
            name=name,
            ready=cond.is_true(conds, cond.ConditionType.READY),
            degraded=cond.is_true(conds, cond.ConditionType.DEGRADED),
            prefill_replicas=p.replicas,
            prefill_ready=p.ready,
            prefill_desired=want_p,
            decode_replicas=d.replicas,
            decode_ready=d.ready,
            decode_desired=want_d,
        )
        if plan.decision is not None:
            self.metrics.record_decision(*plan.decision)


def _previous_status(live: dict[str, Any]) -> api_status.DualPathClusterStatus:
    try:
        return api_status.DualPathClusterStatus.model_validate(live)
    except pydantic.ValidationError:
        log.warning("ignoring an unparsable status; it will be rewritten whole")
        return api_status.DualPathClusterStatus()


def _validation_message(e: pydantic.ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _with_apply_failure(
    status: dict[str, Any], errors: list[str], now: dt.datetime, gen: int
) -> dict[str, Any]:
    st = _previous_status(status)
    c, s, r = cond.ConditionType, cond.ConditionStatus, cond.Reason
    msg = "; ".join(errors)[:2000]
    conds = cond.set_condition(
        list(st.conditions or []), c.DEGRADED, s.TRUE, r.APPLY_FAILED, msg, now, observed_generation=gen
    )
    return st.model_copy(update={"conditions": conds}).model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
