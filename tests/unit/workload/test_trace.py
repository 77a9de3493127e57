"""The generated trace has the paper's Table 2 shape (scaled) and is reproducible."""

from __future__ import annotations

import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine.workload import trace

pytestmark = pytest.mark.timeout(60)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    shape = trace.TraceShape(trajectories=5, seed=3)
    assert trace.generate(shape) == trace.generate(shape)
    assert trace.generate(shape) != trace.generate(shape.model_copy(update={"seed": 4}))


@pytest.mark.parametrize("preset", ["32K", "48K", "64K"])
def test_scaled_means_follow_table2(preset: trace.Preset) -> None:
    shape = trace.TraceShape(preset=preset, trajectories=300, token_scale=16, turn_scale=4, seed=1)
    trajectories = trace.generate(shape)
    max_len, mean_turns, mean_append, mean_gen = trace.scaled_means(shape)
    appends = [len(t.append) for tr in trajectories for t in tr.turns[1:]]
    gens = [t.generate for tr in trajectories for t in tr.turns]
    assert statistics.fmean(appends) == pytest.approx(mean_append, rel=0.1)
    assert statistics.fmean(gens) == pytest.approx(mean_gen, rel=0.1)
    turns = statistics.fmean(len(tr.turns) for tr in trajectories)
    assert 0.5 * mean_turns <= turns <= 1.1 * mean_turns  # MaxLen truncates long trajectories
    assert all(tr.total_tokens <= max_len for tr in trajectories)
    first = statistics.fmean(len(tr.turns[0].append) for tr in trajectories)
    assert first > 2 * mean_append  # a fresh agent's task and repository context


def test_agentic_reuse_is_high_like_the_paper() -> None:
    full = trace.generate(trace.TraceShape(preset="64K", trajectories=40, token_scale=1, turn_scale=1))
    assert trace.expected_hit_ratio(full, 64) > 0.95  # the paper reports 98.7 % for 64K


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["32K", "48K", "64K"]), st.integers(16, 4096))
def test_property_every_trajectory_fits_and_uses_printable_tokens(
    seed: int, preset: str, max_len: int
) -> None:
    shape = trace.TraceShape(preset=preset, trajectories=3, seed=seed, max_len=max_len)  # type: ignore[arg-type]
    for trajectory in trace.generate(shape):
        assert trajectory.turns
        assert trajectory.total_tokens <= max_len
        for turn in trajectory.turns:
            assert turn.generate >= 1 and turn.append
            assert all(trace.TOKEN_LOW <= t <= trace.TOKEN_HIGH for t in turn.append)


def test_cli_dry_run_describes_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    from dualpath_engine.workload import __main__ as cli

    assert cli.main(["--dry-run", "--trajectories", "4", "--preset", "48K", "--seed", "9"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["trajectories"] == 4
    assert described["requests"] == sum(
        len(t.turns) for t in trace.generate(trace.TraceShape(preset="48K", trajectories=4, seed=9))
    )
    assert cli.main(["--dry-run", "--trajectories", "0"]) == 2
