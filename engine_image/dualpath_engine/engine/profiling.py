"""Profile the runner's prefill time and fit the attention-time model used for the compute quota.

Called once at prefill-engine start-up by ``engine.service`` (torch-free: it drives the injected
``ModelRunner``). The fit is ``scheduler.batching.AttentionTimeModel`` (fixed + per token + per
query-key pair), least squares over a few ``(cached, bsz)`` shapes, coefficients clamped at zero so the
model stays monotone in ``bsz`` (the binary search relies on it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from dualpath_engine.engine import runner as runner_api
from dualpath_engine.scheduler import batching

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((0, 8), (0, 64), (0, 256), (256, 64), (512, 256), (1024, 128))
"""``(cached, bsz)`` pairs timed by default; small enough to take well under a second on CPU."""


def time_prefill(runner: runner_api.ModelRunner, cached: int, bsz: int) -> float:
    """Seconds for one full layer-wise prefill of ``bsz`` tokens over ``cached`` zero KV tokens."""
    zeros = np.zeros((cached, runner.kv_bytes_per_token_layer), np.uint8)
    item = runner_api.PrefillItem("profile", cached, tuple(i % 256 for i in range(bsz)))
    started = time.perf_counter()
    prefill = runner.begin_prefill([item])
    for layer in range(runner.num_layers):
        prefill.run_layer(layer, [zeros])
    prefill.finish()
    return time.perf_counter() - started


def fit(samples: Sequence[tuple[int, int, float]]) -> batching.AttentionTimeModel:
    """Least-squares fit of ``(cached, bsz, seconds)`` samples, clamped to non-negative coefficients."""
    rows = np.array([[1.0, bsz, bsz * (cached + bsz / 2.0)] for cached, bsz, _ in samples])
    seconds = np.array([s for _, _, s in samples])
    coef, *_ = np.linalg.lstsq(rows, seconds, rcond=None)
    fixed, per_token, per_pair = (max(0.0, float(c)) for c in coef)
    if per_token == 0.0 and per_pair == 0.0:
        per_token = float(max(seconds) / max(bsz for _, bsz, _ in samples))
    return batching.AttentionTimeModel(fixed, per_token, per_pair)


def profile(
    runner: runner_api.ModelRunner,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    repeats: int = 2,
    max_context: int | None = None,
) -> batching.AttentionTimeModel:
    """Time each shape (best of ``repeats`` after a warm-up) and fit the model."""
    usable = [(c, b) for c, b in shapes if max_context is None or c + b <= max_context]
    time_prefill(runner, 0, 8)
    samples = [(c, b, min(time_prefill(runner, c, b) for _ in range(repeats))) for c, b in usable]
    return fit(samples)
