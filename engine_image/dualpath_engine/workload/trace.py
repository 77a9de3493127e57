"""Agentic trajectory generator shaped like the DualPath paper's Table 2, scaled down by factors.

Pure and seeded: ``generate(shape)`` returns the same trajectories for the same shape. Used by
``workload.replay`` (which sends them to the OpenAI API), the ``python -m dualpath_engine.workload``
CLI, and the simulator in ``bench/``.

Table 2 (dualpath-paper.md 1.4) gives per-trajectory means of three production agentic-RL datasets
(500 trajectories each): MaxLen 32K: 60 turns, 608 appended and 148 generated tokens per turn;
48K: 106 / 474 / 172; 64K: 157 / 429 / 176. A trajectory is a sequence of turns; turn ``i`` appends
``A_i`` (tool output or user input) to the context and generates ``g_i`` tokens, and the next turn's
prompt is ``A_1 G_1 ... A_i G_i A_{i+1}`` (the paper's replay rule, A.3), so each turn re-reads
almost all of its context from the KV cache.

Scaling: ``token_scale`` divides appends, generations and MaxLen (the hit rate, about
``1 - append/context``, stays that of the full-size trace); ``turn_scale`` divides the number of
turns (fewer requests per trajectory). Lengths are drawn from log-normal distributions with the
table's means (``spread`` is the log-space sigma); the first append is ``first_append_factor``
times the mean (the task statement and repository context of a fresh agent). A trajectory ends
after its drawn number of turns or when the next turn would exceed MaxLen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import pydantic

Preset = Literal["32K", "48K", "64K"]

TABLE2: dict[str, tuple[int, int, int, int]] = {
    "32K": (32 * 1024, 60, 608, 148),
    "48K": (48 * 1024, 106, 474, 172),
    "64K": (64 * 1024, 157, 429, 176),
}
"""Preset -> (MaxLen tokens, mean turns, mean append per turn, mean generated per turn)."""

TOKEN_LOW, TOKEN_HIGH = 32, 126
"""Appended tokens are printable ASCII byte ids, so prompts are valid text as well as ids."""


class TraceShape(pydantic.BaseModel):
    """Parameters of a generated trace."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    preset: Preset = pydantic.Field(default="64K", description="Row of the paper's Table 2 to imitate.")
    trajectories: int = pydantic.Field(default=8, ge=1, le=100_000, description="Trajectories to generate.")
    token_scale: float = pydantic.Field(
        default=16.0, ge=1.0, description="Divides appends, generations and MaxLen."
    )
    turn_scale: float = pydantic.Field(default=4.0, ge=1.0, description="Divides the number of turns.")
    first_append_factor: float = pydantic.Field(
        default=4.0, ge=1.0, description="The first turn's append, as a multiple of the mean append."
    )
    spread: float = pydantic.Field(
        default=0.5, ge=0.0, le=2.0, description="Log-space sigma of the log-normal length draws."
    )
    seed: int = pydantic.Field(default=0, description="Random seed; the same seed gives the same trace.")
    max_len: int | None = pydantic.Field(
        default=None, ge=8, description="Override of the scaled MaxLen (e.g. the model's context)."
    )


@dataclass(frozen=True, slots=True)
class Turn:
    """One round: tokens appended to the context, then tokens to generate (forced length)."""

    append: tuple[int, ...]
    generate: int


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One agent's session."""

    trajectory_id: str
    turns: tuple[Turn, ...]

    @property
    def total_tokens(self) -> int:
        """Tokens of the final context including the last generation."""
        return sum(len(t.append) + t.generate for t in self.turns)


def scaled_means(shape: TraceShape) -> tuple[int, float, float, float]:
    """(MaxLen, mean turns, mean append, mean generated) after scaling."""
    max_len, turns, append, gen = TABLE2[shape.preset]
    scaled_max = shape.max_len if shape.max_len is not None else max(8, int(max_len / shape.token_scale))
    return (
        scaled_max,
        max(1.0, turns / shape.turn_scale),
        max(1.0, append / shape.token_scale),
        max(1.0, gen / shape.token_scale),
    )


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    """A positive integer with the given mean (log-normal with log-sigma ``sigma``)."""
    if sigma == 0:
        return max(1, round(mean))
    mu = math.log(mean) - sigma * sigma / 2
    return max(1, round(rng.lognormvariate(mu, sigma)))


T = TypeVar("T")


def draw_turns(shape: TraceShape, rng: random.Random, tokens: Callable[[int], T]) -> list[tuple[T, int]]:
    """One trajectory's turns as ``(tokens(append_length), generated)``, drawn from ``rng``.

    ``tokens`` is called where ``generate`` draws a turn's token ids, so a caller that keeps lengths
    only (the simulator: ``tokens=lambda n: n``) walks the same sequence of lengths.
    """
    max_len, mean_turns, mean_append, mean_gen = scaled_means(shape)
    wanted = _lognormal(rng, mean_turns, shape.spread)
    turns: list[tuple[T, int]] = []
    context = 0
    for index in range(wanted):
        mean = mean_append * (shape.first_append_factor if index == 0 else 1.0)
        append = _lognormal(rng, mean, shape.spread)
        gen = _lognormal(rng, mean_gen, shape.spread)
        if index == 0:
            append = min(append, max(1, max_len - 2))
            gen = min(gen, max(1, max_len - append))
        elif context + append + gen > max_len:
            break
        turns.append((tokens(append), gen))
        context += append + gen
    return turns


def generate(shape: TraceShape) -> list[Trajectory]:
    """The trace for ``shape`` (deterministic in ``shape.seed``)."""
    rng = random.Random(shape.seed)

    def token_ids(count: int) -> tuple[int, ...]:
        return tuple(rng.randint(TOKEN_LOW, TOKEN_HIGH) for _ in range(count))

    return [
        Trajectory(
            f"traj-{shape.seed}-{index}",
            tuple(Turn(ids, gen) for ids, gen in draw_turns(shape, rng, token_ids)),
        )
        for index in range(shape.trajectories)
    ]


def expected_hit_ratio(trajectories: list[Trajectory], block_tokens: int) -> float:
    """Fraction of prompt tokens that a perfect block cache (persisting everything) would hit.

    Turn ``i+1`` can hit the full blocks of ``A_1 G_1 ... A_i G_i``; the first turn hits nothing.
    """
    prompt_tokens = 0
    hit_tokens = 0
    for trajectory in trajectories:
        context = 0
        for turn in trajectory.turns:
            prompt = context + len(turn.append)
            prompt_tokens += prompt
            hit_tokens += min(
                (context // block_tokens) * block_tokens, ((prompt - 1) // block_tokens) * block_tokens
            )
            context = prompt + turn.generate
    return hit_tokens / prompt_tokens if prompt_tokens else 0.0
