"""Replay against the real scheduler app (fake engine leaders): replay rule, bounds, measurements."""

from __future__ import annotations

import time

import pytest

from dualpath_engine.workload import replay, trace
from tests.unit.server import fakes
from tests.unit.server.conftest import Factory

pytestmark = pytest.mark.timeout(60)


def small_trace(trajectories: int = 3, seed: int = 0) -> list[trace.Trajectory]:
    shape = trace.TraceShape(
        preset="32K", trajectories=trajectories, token_scale=64, turn_scale=15, max_len=1024, seed=seed
    )
    return trace.generate(shape)


async def test_offline_replay_follows_the_paper_replay_rule_and_hits_the_cache(
    scheduler_factory: Factory,
) -> None:
    svc, _, base = await scheduler_factory(kv={"block_tokens": 16})
    trajectories = small_trace()
    pe = fakes.FakeLeader(base, "pe-0", "prefill", "node-p")
    de = fakes.FakeLeader(base, "de-0", "decode", "node-d", hasher=svc.state._hasher)
    async with fakes.running(pe, de):
        report = await replay.replay(trajectories, replay.ReplayConfig(base_url=base, mode="offline"))
    total_turns = sum(len(t.turns) for t in trajectories)
    assert report.failed_requests == 0, report.errors
    assert report.requests == total_turns and report.trajectories_completed == len(trajectories)
    # Turn i+1's prompt is turn i's prompt + what was generated + the new append, exactly.
    prompts = {a.request_id: a.prompt_token_ids for a in de.received}
    by_trajectory: dict[str, list[replay.RequestResult]] = {}
    for result in report.results:
        by_trajectory.setdefault(result.trajectory_id, []).append(result)
    for trajectory in trajectories:
        results = sorted(by_trajectory[trajectory.trajectory_id], key=lambda r: r.turn)
        context: list[int] = []
        for turn, result in zip(trajectory.turns, results, strict=True):
            prompt = [*context, *turn.append]
            assert result.prompt_tokens == len(prompt)
            assert list(result.generated) == fakes.expected_output(prompt, turn.generate)
            assert tuple(prompt) in prompts.values()
            context = [*prompt, *result.generated]
    assert report.ttft_s.count == total_turns and report.jct_s.count == len(trajectories)
    assert report.tpot_s.count > 0
    assert report.hit_ratio > 0.5  # later turns re-read their context from persisted blocks


async def test_online_replay_respects_the_request_budget(scheduler_factory: Factory) -> None:
    _, _, base = await scheduler_factory()
    trajectories = small_trace(trajectories=6, seed=2)
    cfg = replay.ReplayConfig(base_url=base, mode="online", rate=50.0, max_requests=4)
    async with fakes.running(
        fakes.FakeLeader(base, "pe-0", "prefill", "node-p"),
        fakes.FakeLeader(base, "de-0", "decode", "node-d"),
    ):
        report = await replay.replay(trajectories, cfg)
    assert report.requests == 4 and report.failed_requests == 0
    assert report.trajectories_completed < report.trajectories_started


async def test_replay_stops_starting_requests_after_its_duration(scheduler_factory: Factory) -> None:
    _, _, base = await scheduler_factory()
    trajectories = small_trace(trajectories=2, seed=5)
    cfg = replay.ReplayConfig(base_url=base, mode="offline", max_duration_s=0.3)
    slow = fakes.FakeLeader(base, "de-0", "decode", "node-d", step_delay_s=0.05)
    started = time.monotonic()
    async with fakes.running(fakes.FakeLeader(base, "pe-0", "prefill", "node-p"), slow):
        report = await replay.replay(trajectories, cfg)
    assert report.failed_requests == 0
    assert report.requests < sum(len(t.turns) for t in trajectories)
    assert time.monotonic() - started < 10


async def test_failed_requests_are_reported_not_raised(scheduler_factory: Factory) -> None:
    _, _, base = await scheduler_factory(request_timeout_s=0.3)  # no engines: every request times out
    cfg = replay.ReplayConfig(base_url=base, mode="offline", max_requests=2)
    report = await replay.replay(small_trace(trajectories=2), cfg)
    assert report.requests == 2 and report.failed_requests == 2
    assert report.trajectories_completed == 0
    assert any("not finished within" in e for e in report.errors), report.errors


def test_summary_percentiles() -> None:
    summary = replay.Summary.of([float(v) for v in range(1, 101)])
    assert (summary.count, summary.p50, summary.p99, summary.max) == (100, 51.0, 99.0, 100.0)
    assert replay.Summary.of([]).count == 0
