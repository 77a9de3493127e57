"""Preview what the rebalancer would decide, offline: ``python -m dualpath_operator.planning``.

    python -m dualpath_operator.planning --spec cluster.yaml --observed observed.yaml [--now T]

``--spec`` is a DualPathCluster (or just its ``spec``). ``--observed`` is a YAML document in the
shape of :class:`ObservedFile`: the telemetry sample (``nodes``, ``engines``, ``problems``), the
current ratio, the previous path weights (``status.pathWeights`` form) and the planner state. It
prints, as YAML, the path weights (status form and the scheduler admin body) and the ratio decision
with the state to feed into the next run. Reads two files and writes stdout; the planning itself is
the pure code of :mod:`planning.weights`, :mod:`planning.ratio` and :mod:`planning.bounds`.
Run by users and operators tuning a cluster, and by ``tests/unit/planning``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import Field
from pydantic.alias_generators import to_camel

from dualpath_operator.api.v1alpha1 import cluster as api
from dualpath_operator.api.v1alpha1 import status as api_status
from dualpath_operator.planning import bounds, telemetry
from dualpath_operator.planning import ratio as ratio_planner
from dualpath_operator.planning import weights as weight_planner


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class NodeIn(_Model):
    """Per-node NIC rates, bytes/s (see ``planning.telemetry.NodeSample``)."""

    snic_rx_bps: float | None = Field(None, description="Storage-NIC receive rate.")
    snic_capacity_bps: float | None = Field(None, description="Storage-NIC line rate.")
    snic_kv_rx_bps: float | None = Field(None, description="Of snicRxBps, KV reads of our engines.")
    cnic_tx_bps: float | None = Field(None, description="Compute-NIC transmit rate, summed over NICs.")
    cnic_rx_bps: float | None = Field(None, description="Compute-NIC receive rate, summed over NICs.")
    cnic_capacity_bps: float | None = Field(None, description="Summed compute-NIC line rate.")


class EngineIn(_Model):
    """Signals of one engine group (see ``planning.telemetry.EngineSample``)."""

    pod: str = Field(description="Engine pod name.")
    node: str = Field(description="Node the pod runs on.")
    role: telemetry.Role = Field(description="prefill or decode.")
    queued_tokens: float | None = Field(None, description="Tokens assigned and not finished.")
    read_queue_tokens: float | None = Field(None, description="Tokens in the node's storage read queue.")
    inflight_requests: float | None = Field(None, description="Requests in flight.")
    hbm_used_ratio: float | None = Field(None, description="KV memory in use, 0 to 1.")
    ttft_p90_s: float | None = Field(None, description="Time to first token p90, seconds.")
    tpot_p90_s: float | None = Field(None, description="Time per output token p90, seconds.")


class StateIn(_Model):
    """The ratio planner's memory (``state`` printed by a previous run)."""

    direction: Literal["prefill", "decode"] | None = Field(None, description="Direction of the streak.")
    streak: int = Field(0, ge=0, description="Consecutive intervals agreeing on the direction.")
    last_counted_at: pydantic.AwareDatetime | None = Field(
        None, description="takenAt of the last counted sample."
    )
    last_change_at: pydantic.AwareDatetime | None = Field(
        None, description="When the planner last changed the ratio."
    )


class ParamsIn(_Model):
    """Planner knobs that are operator settings rather than CR fields."""

    weights: weight_planner.WeightParams = Field(
        default_factory=weight_planner.WeightParams, description="Path-weight knobs."
    )
    ratio: ratio_planner.RatioParams = Field(
        default_factory=ratio_planner.RatioParams, description="Ratio knobs."
    )


class ObservedFile(_Model):
    """The ``--observed`` document."""

    taken_at: pydantic.AwareDatetime | None = Field(
        None, description="When the sample was taken; default --now."
    )
    window_s: float = Field(60.0, gt=0, description="Rate window of the sample, seconds.")
    current: str = Field(pattern=api_status.RATIO_PATTERN, description="Ratio running now, e.g. 2P:4D.")
    last_change: pydantic.AwareDatetime | None = Field(
        None, description="Time of the last ratio change (status.lastDecision.time if it changed it)."
    )
    nodes: dict[str, NodeIn] = Field(default_factory=dict, description="NIC rates per node name.")
    engines: list[EngineIn] = Field(default_factory=list, description="One entry per engine group.")
    problems: list[str] = Field(default_factory=list, description="Why the sample is incomplete.")
    previous_weights: list[api_status.PathWeight] = Field(
        default_factory=list, description="status.pathWeights from before."
    )
    state: StateIn = Field(default_factory=StateIn, description="Ratio planner state.")
    params: ParamsIn = Field(default_factory=ParamsIn, description="Planner knobs.")


def load_spec(doc: Any) -> api.DualPathClusterSpec:
    """A DualPathClusterSpec from a whole DualPathCluster or from its spec alone."""
    if isinstance(doc, dict) and doc.get("kind") == "DualPathCluster":
        return api.DualPathCluster.model_validate(doc).spec
    if isinstance(doc, dict) and "spec" in doc and "model" not in doc:
        return api.DualPathClusterSpec.model_validate(doc["spec"])
    return api.DualPathClusterSpec.model_validate(doc)


def to_sample(obs: ObservedFile, now: dt.datetime) -> telemetry.TelemetrySample:
    return telemetry.TelemetrySample(
        taken_at=obs.taken_at or now,
        window_s=obs.window_s,
        nodes={name: telemetry.NodeSample(node=name, **n.model_dump()) for name, n in obs.nodes.items()},
        engines=tuple(telemetry.EngineSample(**e.model_dump()) for e in obs.engines),
        problems=tuple(obs.problems),
    )


def preview(spec: api.DualPathClusterSpec, obs: ObservedFile, now: dt.datetime) -> dict[str, Any]:
    """Everything the rebalancer would do with these inputs, as plain data (the CLI's output)."""
    sample = to_sample(obs, now)
    w = weight_planner.compute(sample, weight_planner.from_status(obs.previous_weights), obs.params.weights)
    state = ratio_planner.RatioState(**obs.state.model_dump())
    outcome, new_state = ratio_planner.decide(
        spec,
        api_status.parse_ratio(obs.current),
        sample,
        state,
        now,
        last_change=obs.last_change,
        params=obs.params.ratio,
    )
    shape = bounds.shape_from_spec(
        spec, cnic_gbps=obs.params.ratio.cnic_gbps, memory_bytes_per_s=obs.params.ratio.memory_bytes_per_s
    )
    limits = bounds.limits_from_spec(spec, shape, enforce_bound=obs.params.ratio.enforce_validity_bound)
    return {
        "pathWeights": {
            "held": w.held,
            "reason": w.reason,
            "status": [p.model_dump(mode="json", by_alias=True) for p in w.path_weights()],
            "adminBody": weight_planner.admin_body(w.weights),
        },
        "decision": outcome.decision.model_dump(mode="json", by_alias=True, exclude_none=True),
        "desiredRatio": api_status.format_ratio(outcome.prefill, outcome.decode),
        "changed": outcome.changed,
        "limits": {
            "validityBound": limits.bound.describe() if limits.bound is not None else None,
            "notes": list(limits.notes),
            # One entry per prefill count: the decode counts allowed with it.
            "feasible": [f"{p}P:{lo}-{hi}D" for p, lo, hi in bounds.feasible_ranges(limits)],
        },
        "state": StateIn(**dataclasses.asdict(new_state)).model_dump(mode="json", by_alias=True),
    }


def _parse_now(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--now needs a time zone, e.g. {text}Z")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dualpath_operator.planning",
        description="Preview the rebalancer's path weights and P/D ratio decision for a sample.",
    )
    parser.add_argument("--spec", required=True, type=Path, help="DualPathCluster (or its spec), YAML")
    parser.add_argument("--observed", required=True, type=Path, help="sample + current ratio + state, YAML")
    parser.add_argument("--now", type=_parse_now, help="decision time, RFC 3339 (default: the sample's)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(yaml.safe_load(args.spec.read_text()))
        obs = ObservedFile.model_validate(yaml.safe_load(args.observed.read_text()) or {})
    except (OSError, yaml.YAMLError, pydantic.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    now: dt.datetime | None = args.now or obs.taken_at
    if now is None:
        print("error: give --now or takenAt in the observed file", file=sys.stderr)
        return 2
    yaml.safe_dump(preview(spec, obs, now), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
