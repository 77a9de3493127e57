"""Agentic trajectories for the simulator: turn lengths only, shaped like the paper's Table 2.

Called by ``bench.sim.scenarios`` and the tests. It reuses the engine's trace generator's shape
(``dualpath_engine.workload.trace.TraceShape``, ``TABLE2``) and its length sampler
(``trace.draw_turns``), but keeps only lengths: the simulator needs no token ids, and drawing ids for
thousands of full-size trajectories would cost minutes.

Windows: a full 64K trajectory has 157 turns on average. To keep a run short while keeping the
paper's context lengths (which set the I/O-to-compute balance), an agent may replay a window of
``window_turns`` consecutive turns starting at a random turn of its trajectory; the turns before
the window count as context already persisted in storage (a warm start, as if the agent had been
running). ``window_turns=None`` replays whole trajectories from an empty context.

Phases: ``append_scale_first_half`` multiplies the appends of the first half of every window and
``generate_scale_second_half`` the generations of the second half: a workload whose prefill pressure
changes halfway (the paper notes offline prefill pressure is much higher in the first half of a run,
dualpath-paper.md 10.2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dualpath_engine.workload import trace


@dataclass(frozen=True, slots=True)
class Turn:
    """One round: tokens appended to the context, then tokens generated."""

    append: int
    generate: int


@dataclass(frozen=True, slots=True)
class Agent:
    """One agent: context already in storage when the run starts, then the turns it replays."""

    agent_id: str
    stored_context: int
    turns: tuple[Turn, ...]
    start_s: float = 0.0
    """When the agent's first turn arrives (0: at the start of the run, as the offline replays)."""


def trajectory_lengths(shape: trace.TraceShape, rng: random.Random) -> list[Turn]:
    """One trajectory's turns, with the lengths ``trace.generate`` draws (no token ids)."""
    return [Turn(append, gen) for append, gen in trace.draw_turns(shape, rng, lambda count: count)]


def agents(
    shape: trace.TraceShape,
    window_turns: int | None = None,
    append_scale_first_half: float = 1.0,
    generate_scale_second_half: float = 1.0,
) -> list[Agent]:
    """``shape.trajectories`` agents (deterministic in ``shape.seed``)."""
    rng = random.Random(shape.seed)
    starts = random.Random(shape.seed + 1_000_003)  # window starts: the trajectories stay the same
    result = []
    for index in range(shape.trajectories):
        turns = trajectory_lengths(shape, rng)
        start = 0
        if window_turns is not None and len(turns) > window_turns:
            start = starts.randrange(0, len(turns) - window_turns + 1)
        stop = len(turns) if window_turns is None else start + window_turns
        stored = sum(t.append + t.generate for t in turns[:start])
        window = turns[start:stop]
        half = len(window) // 2
        if append_scale_first_half != 1.0 or generate_scale_second_half != 1.0:
            window = [
                Turn(max(1, round(t.append * append_scale_first_half)), t.generate) for t in window[:half]
            ] + [
                Turn(t.append, max(1, round(t.generate * generate_scale_second_half))) for t in window[half:]
            ]
        result.append(Agent(f"agent-{index}", stored, tuple(window)))
    return result
