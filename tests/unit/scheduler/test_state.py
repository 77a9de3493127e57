"""Scheduler state transitions, driven by hand with an explicit clock (no asyncio, no HTTP)."""

from __future__ import annotations

from collections.abc import Sequence

import prometheus_client
import pytest

from dualpath_engine import config
from dualpath_engine.scheduler import metrics, protocol, records, state

pytestmark = pytest.mark.timeout(30)

BLOCK = 4


def hasher(tokens: Sequence[int]) -> list[str]:
    """Chained toy hashes: block i's name covers all tokens up to its end."""
    return ["-".join(map(str, tokens[: (i + 1) * BLOCK])) for i in range(len(tokens) // BLOCK)]


class Harness:
    def __init__(self, **overrides: object) -> None:
        cfg = config.SchedulerConfig.model_validate(
            {"kv": {"block_tokens": BLOCK}, "engine_timeout_s": 5.0, "request_timeout_s": 100.0, **overrides}
        )
        self.updates: list[records.RequestUpdate] = []
        self.woken: list[str] = []
        self.s = state.SchedulerState(
            cfg,
            hasher,
            metrics.SchedulerMetrics(prometheus_client.CollectorRegistry()),
            on_update=self.updates.append,
            on_group_work=self.woken.append,
        )
        self.acks: dict[str, int | None] = {}
        self.incarnations: dict[str, str] = {}

    def fetch(
        self,
        group: str,
        role: protocol.Role,
        node: str,
        now: float,
        engines: int = 1,
        tok: int = 0,
        rq: int = 0,
        free: int = 1 << 40,
        ack: bool = True,
    ) -> protocol.FetchReply:
        message = protocol.FetchRequest(
            group_id=group,
            incarnation=self.incarnations.setdefault(group, "inc-0"),
            role=role,
            node=node,
            engines=tuple(
                protocol.EngineReport(
                    engine_id=f"{group}-e{i}",
                    seq=0,
                    tok=tok,
                    free_hbm_bytes=free,
                    transport=protocol.TransportEndpoint(kind="tcp", host="127.0.0.1", port=9000 + i),
                )
                for i in range(engines)
            ),
            read_queue_tokens=rq,
            ack_reply_id=self.acks.get(group),
        )
        reply = self.s.fetch(message, now)
        if ack:
            self.acks[group] = reply.reply_id
        return reply

    def event(self, group: str, now: float, **fields: object) -> protocol.ResultAck:
        return self.s.record(
            protocol.ResultBatch(group_id=group, events=(protocol.TaskEvent.model_validate(fields),)), now
        )


def sampling(max_tokens: int = 4) -> protocol.SamplingParams:
    return protocol.SamplingParams(max_tokens=max_tokens)


def test_task_is_delivered_to_both_engines_only_once_both_are_chosen() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit(list(range(10)), sampling(), 1)
    pe_reply = h.fetch("pe", "prefill", "np", 1)
    assert pe_reply.assignments == ()  # no DE yet: nothing to deliver
    de_reply = h.fetch("de", "decode", "nd", 2)
    assert [a.role for a in de_reply.assignments] == ["decode"]
    pe_reply = h.fetch("pe", "prefill", "np", 3)
    assert [a.role for a in pe_reply.assignments] == ["prefill"]
    task = pe_reply.assignments[0]
    assert task.task_id == f"{request_id}.0" == de_reply.assignments[0].task_id
    assert task.prefill.transport.port == 9000 and task.decode.node == "nd"


def test_unacknowledged_reply_is_sent_again() -> None:
    h = Harness()
    h.fetch("de", "decode", "nd", 0)
    h.s.submit(list(range(10)), sampling(), 0)
    h.fetch("pe", "prefill", "np", 0)
    first = h.fetch("de", "decode", "nd", 1, ack=False)
    assert len(first.assignments) == 1
    again = h.fetch("de", "decode", "nd", 2)  # the leader never saw `first`
    assert [a.task_id for a in again.assignments] == [first.assignments[0].task_id]
    assert h.fetch("de", "decode", "nd", 3).assignments == ()


def test_hits_come_from_persisted_blocks_and_leave_the_last_token_to_compute() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    prompt = list(range(12))  # three full blocks
    h.event("de", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.s.submit(prompt, sampling(), 1)
    h.fetch("pe", "prefill", "np", 1)
    reply = h.fetch("de", "decode", "nd", 1)
    task = reply.assignments[0]
    assert [b.hash for b in task.hit_blocks] == hasher(prompt)[:2]  # block 3 holds the last token
    assert (task.chunk_plan.cached_tokens, task.chunk_plan.compute_tokens) == (8, 4)


def test_read_side_follows_the_shorter_reported_read_queue() -> None:
    h = Harness()
    prompt = list(range(9))
    h.event("x", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.fetch("pe", "prefill", "np", 0, rq=500)
    h.fetch("de", "decode", "nd", 0, rq=100)
    h.s.submit(prompt, sampling(), 1)
    h.fetch("pe", "prefill", "np", 1, rq=500)
    task = h.fetch("de", "decode", "nd", 1, rq=100).assignments[0]
    assert task.read_side == "de" and {b.side for b in task.hit_blocks} == {"de"}


def test_pe_only_policy_forces_the_pe_side() -> None:
    h = Harness(policy="pe-only")
    prompt = list(range(9))
    h.event("x", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.fetch("pe", "prefill", "np", 0, rq=500)
    h.fetch("de", "decode", "nd", 0, rq=0)
    h.s.submit(prompt, sampling(), 1)
    h.fetch("pe", "prefill", "np", 1, rq=500)
    assert h.fetch("de", "decode", "nd", 1).assignments[0].read_side == "pe"


def test_tokens_stream_in_order_and_duplicates_are_ignored() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit([1, 2, 3], sampling(3), 0)
    h.fetch("pe", "prefill", "np", 0)
    task_id = h.fetch("de", "decode", "nd", 0).assignments[0].task_id
    h.event("pe", 1, task_id=task_id, engine_id="pe-e0", first_index=0, token_ids=[7])  # PE's first token
    h.event("de", 1, task_id=task_id, engine_id="de-e0", first_index=0, token_ids=[7, 8])  # overlap
    h.event("de", 1, task_id=task_id, engine_id="de-e0", first_index=2, token_ids=[9], finish_reason="length")
    assert [u.token_ids for u in h.updates] == [(7,), (8,), (9,)]
    assert h.updates[-1].finish_reason == "length" and request_id not in h.s.requests
    ack = h.event("de", 2, task_id=task_id, engine_id="de-e0", first_index=3, token_ids=[1])
    assert [c.task_id for c in ack.cancels] == [task_id]  # finished: stale events are refused


def test_lost_decode_group_retries_with_streamed_tokens_appended_and_cancels_the_pe() -> None:
    h = Harness(engine_timeout_s=5.0)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de0", "decode", "nd0", 0)
    request_id = h.s.submit([1, 2, 3], sampling(4), 0)
    h.fetch("pe", "prefill", "np", 0)
    task_id = h.fetch("de0", "decode", "nd0", 0).assignments[0].task_id
    h.fetch("pe", "prefill", "np", 0)  # PE acks, receives the task
    h.event("de0", 1, task_id=task_id, engine_id="de0-e0", token_ids=[50, 51])
    h.fetch("pe", "prefill", "np", 4)
    h.s.expire(6.5)  # de0 silent since its last post at t=1 (> 5 s); the PE fetched at t=4
    assert "de0" not in h.s.groups and "pe" in h.s.groups
    assert [c.task_id for c in h.fetch("pe", "prefill", "np", 6).cancels] == [task_id]
    retry = h.fetch("de1", "decode", "nd1", 6).assignments[0]  # the PE already took the new attempt
    assert retry.task_id == f"{request_id}.1"
    assert retry.prompt_token_ids == (1, 2, 3, 50, 51) and retry.sampling.max_tokens == 2
    h.event("de1", 7, task_id=retry.task_id, engine_id="de1-e0", token_ids=[52, 53], finish_reason="length")
    assert [t for u in h.updates for t in u.token_ids] == [50, 51, 52, 53]


def test_pe_loss_after_prefill_done_does_not_disturb_decoding() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit([1, 2, 3], sampling(4), 0)
    h.fetch("pe", "prefill", "np", 0)
    task_id = h.fetch("de", "decode", "nd", 0).assignments[0].task_id
    h.event("pe", 1, task_id=task_id, engine_id="pe-e0", prefill_done=True)
    h.fetch("de", "decode", "nd", 9)
    h.s.expire(9.0)
    assert "pe" not in h.s.groups
    assert h.s.requests[request_id].task_id == task_id  # not retried


def test_restarted_group_loses_its_tasks_which_are_retried() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit([1, 2, 3], sampling(), 0)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    h.incarnations["de"] = "inc-1"
    h.acks["de"] = None
    h.fetch("de", "decode", "nd", 1)  # the new incarnation: the old one's task is retried
    h.fetch("pe", "prefill", "np", 1)
    reply = h.fetch("de", "decode", "nd", 1)
    assert [a.task_id for a in reply.assignments] == [f"{request_id}.1"]


def test_errors_exhaust_attempts_and_fail_the_request() -> None:
    h = Harness(max_attempts=2)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit([1, 2, 3], sampling(), 0)
    for attempt in range(2):
        h.fetch("pe", "prefill", "np", 0)
        task_id = h.fetch("de", "decode", "nd", 0).assignments[0].task_id
        assert task_id == f"{request_id}.{attempt}"
        h.event("de", 0, task_id=task_id, engine_id="de-e0", error="out of memory")
    assert h.updates[-1].error_kind == "failed" and "out of memory" in (h.updates[-1].error or "")
    assert request_id not in h.s.requests


def test_request_times_out_and_says_which_role_is_missing() -> None:
    h = Harness(request_timeout_s=10.0)
    h.fetch("pe", "prefill", "np", 0)
    h.s.submit([1, 2], sampling(), 0)
    h.fetch("pe", "prefill", "np", 9)
    h.s.expire(10.0)
    assert h.updates[-1].error_kind == "timeout" and "no decode engine group" in (h.updates[-1].error or "")


def test_admission_bound_refuses_new_requests() -> None:
    h = Harness(max_waiting_requests=2)
    h.s.submit([1], sampling(), 0)
    h.s.submit([1], sampling(), 0)
    with pytest.raises(records.AdmissionError):
        h.s.submit([1], sampling(), 0)


def test_drained_decode_group_returns_its_private_queue_and_takes_nothing() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de0", "decode", "nd0", 0, free=0)  # no HBM: requests stay in its private queue
    h.s.submit([1, 2], sampling(), 0)
    h.fetch("de0", "decode", "nd0", 0, free=0)
    assert len(h.s.private["de0"]) == 1
    h.s.set_drained("de0", True)
    assert len(h.s.private["de0"]) == 0 and len(h.s.de_queue) == 1
    assert h.fetch("de0", "decode", "nd0", 1).drained is True
    assert len(h.s.de_queue) == 1
    h.fetch("de1", "decode", "nd1", 1)
    h.fetch("pe", "prefill", "np", 1)
    assert len(h.fetch("de1", "decode", "nd1", 1).assignments) == 1


def test_role_switch_waits_for_in_flight_work_then_flips() -> None:
    h = Harness(drain_timeout_s=30.0)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    h.s.submit([1, 2], sampling(2), 0)
    h.fetch("pe", "prefill", "np", 0)
    task_id = h.fetch("de", "decode", "nd", 0).assignments[0].task_id
    h.s.set_role("de", "prefill", 1)
    reply = h.fetch("de", "decode", "nd", 2)
    assert reply.role == "decode" and reply.drained is True  # still busy
    h.event("de", 3, task_id=task_id, engine_id="de-e0", token_ids=[5, 6], finish_reason="length")
    assert h.fetch("de", "decode", "nd", 4).role == "prefill"
    assert h.s.groups["de"].role == "prefill"
    assert not h.s.groups["de"].accepting  # until it reports the new role
    h.fetch("de", "prefill", "nd", 5)
    assert h.s.groups["de"].accepting


def test_role_switch_past_its_deadline_retries_what_is_left_elsewhere() -> None:
    h = Harness(drain_timeout_s=5.0, engine_timeout_s=100.0)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    request_id = h.s.submit([1, 2], sampling(2), 0)
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    h.s.set_role("de", "prefill", 1)
    h.s.expire(7.0)
    assert h.s.groups["de"].role == "prefill"
    assert h.s.requests[request_id].attempt == 1


def test_unacknowledged_assignments_count_as_engine_load() -> None:
    h = Harness(beta_tokens=10, alpha_tokens=10)
    h.fetch("pe", "prefill", "np", 0, engines=2)
    h.fetch("de", "decode", "nd", 0)
    for _ in range(2):
        h.s.submit(list(range(8)), sampling(), 0)
    h.fetch("pe", "prefill", "np", 1, engines=2, ack=False)
    engines = {t.pe[1] for t in h.s.tasks.values() if t.pe is not None}
    assert engines == {"pe-e0", "pe-e1"}  # the second request saw the first one's tokens on e0


def test_state_sample_reports_queues_groups_and_read_queues() -> None:
    h = Harness()
    h.fetch("pe", "prefill", "np", 0, rq=7)
    h.s.submit([1, 2], sampling(), 0)
    sample = h.s.sample()
    assert sample.queues["de_global"] == 1 and sample.queues["pe_global"] == 1
    assert sample.groups == {("prefill", "active"): 1}
    assert sample.read_queue_tokens == {"np": 7}


def test_weights_aware_flag_uses_pushed_capacities() -> None:
    h = Harness(weights_aware_read_side=True)
    prompt = list(range(9))
    h.event("x", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.s.set_weights({"np": 1e9, "nd": 8e9})  # the DE node's storage NIC is 8x faster
    h.fetch("pe", "prefill", "np", 0, rq=100)
    h.fetch("de", "decode", "nd", 0, rq=400)  # a longer queue, but it drains first
    h.s.submit(prompt, sampling(), 1)
    h.fetch("pe", "prefill", "np", 1, rq=100)
    assert h.fetch("de", "decode", "nd", 1, rq=400).assignments[0].read_side == "de"


def test_split_reads_flag_divides_hit_blocks_between_both_sides() -> None:
    h = Harness(split_reads=True)
    prompt = list(range(33))  # eight full blocks, all hit
    h.event("x", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.fetch("pe", "prefill", "np", 0)
    h.fetch("de", "decode", "nd", 0)
    h.s.submit(prompt, sampling(), 1)
    h.fetch("pe", "prefill", "np", 1)
    task = h.fetch("de", "decode", "nd", 1).assignments[0]
    sides = [b.side for b in task.hit_blocks]
    assert sides == ["pe"] * 4 + ["de"] * 4  # equal queues and capacities: half each, PE first


def test_request_ids_of_a_restarted_scheduler_never_repeat_the_old_ones() -> None:
    # Engines ignore task ids they already finished; a replaced scheduler keeps its Service address.
    first, restarted = Harness(), Harness()
    old = {first.s.submit([1, 2, 3], sampling(), now=0.0) for _ in range(3)}
    new = {restarted.s.submit([1, 2, 3], sampling(), now=0.0) for _ in range(3)}
    assert len(old) == len(new) == 3
    assert not old & new


def run_sequential_turns(h: Harness, turns: int) -> list[str]:
    """1P2D, empty read queues: each turn's request is bound and finished before the next arrives.

    The decode selection is steered to alternate the two DE groups (the other one reports load);
    returns the read side of each turn.
    """
    prompt = list(range(9))  # two full blocks, both hit
    h.event("x", 0, task_id="old", engine_id="x", persisted_block_hashes=hasher(prompt))
    h.fetch("pe", "prefill", "np", 0)
    sides: list[str] = []
    for turn in range(turns):
        target, other = ("d0", "d1") if turn % 2 == 0 else ("d1", "d0")
        h.fetch(other, "decode", f"n{other}", turn, tok=1000)
        h.fetch(target, "decode", f"n{target}", turn, tok=0)
        request_id = h.s.submit(prompt, sampling(), turn)
        h.fetch("pe", "prefill", "np", turn)
        (task,) = h.fetch(target, "decode", f"n{target}", turn, tok=0).assignments
        assert task.request_id == request_id and task.decode.node == f"n{target}"
        sides.append(task.read_side)
        h.event(target, turn, task_id=task.task_id, engine_id=task.engine_id, finish_reason="stop")
        assert not h.s.tasks  # nothing left queued: every decision saw empty read queues
    return sides


def test_least_read_tie_break_spreads_sequential_reads_over_all_three_nodes() -> None:
    h = Harness(read_side_tie_break="least_read")
    sides = run_sequential_turns(h, 6)
    assert sides == ["pe", "de", "de", "pe", "de", "de"]
    assert dict(h.s.read_tokens) == {"np": 16, "nd0": 16, "nd1": 16}


def test_prefill_tie_break_gives_every_tie_to_the_pe_node() -> None:
    h = Harness()
    assert run_sequential_turns(h, 6) == ["pe"] * 6
    assert {node: h.s.read_tokens[node] for node in ("np", "nd0", "nd1")} == {"np": 48, "nd0": 0, "nd1": 0}


def test_read_counts_are_forgotten_with_the_last_group_on_a_node() -> None:
    h = Harness(read_side_tie_break="least_read")
    run_sequential_turns(h, 3)
    assert set(h.s.read_tokens) == {"np", "nd0", "nd1"}
    h.fetch("pe", "prefill", "np", 20)
    h.fetch("d0", "decode", "nd0", 20)
    h.s.expire(20)  # d1 silent since t=2: lost
    assert "d1" not in h.s.groups and set(h.s.read_tokens) == {"np", "nd0"}
    h.fetch("d0", "decode", "nd9", 21)  # the group now reports another node
    assert set(h.s.read_tokens) == {"np"}
