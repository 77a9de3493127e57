"""Replay agentic trajectories against an OpenAI-compatible server and report TTFT, TPOT and JCT.

Called by the ``python -m dualpath_engine.workload`` CLI, by the e2e tests and by the benchmarks.
Each trajectory runs its turns one after another following the paper's replay rule (A.3): turn
``i+1`` sends ``A_1 G_1 ... A_i G_i A_{i+1}`` as token ids, where ``G_j`` are the tokens the server
actually generated, and forces exactly ``g_{i+1}`` generated tokens (``max_tokens`` with
``ignore_eos``; greedy). Requests stream (SSE) so TTFT is measured at the first token; the
trajectory id is sent as ``user`` (the session).

Modes: ``offline`` starts every trajectory at once (optionally at most ``concurrency`` at a time),
like the paper's RL-rollout batch; ``online`` starts trajectories by a Poisson process of ``rate``
trajectories per second (seeded), like its online serving runs. Both are bounded: no request
starts after ``max_requests`` requests or ``max_duration_s`` seconds, and every request has a
timeout, so a replay always ends.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import pydantic

from dualpath_engine import tokenizer
from dualpath_engine.workload import trace


class ReplayConfig(pydantic.BaseModel):
    """How to replay a trace."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    base_url: str = pydantic.Field(description="Server base URL, e.g. http://127.0.0.1:8000 (no /v1).")
    model: str = pydantic.Field(default="tiny", description="Model name sent with every request.")
    mode: Literal["offline", "online"] = pydantic.Field(default="offline", description="Arrival pattern.")
    rate: float = pydantic.Field(default=1.0, gt=0, description="Online: trajectories started per second.")
    concurrency: int | None = pydantic.Field(
        default=None, ge=1, description="Offline: most trajectories running at once; None = all."
    )
    max_requests: int = pydantic.Field(default=1000, ge=1, description="No request starts beyond this count.")
    max_duration_s: float = pydantic.Field(default=300.0, gt=0, description="No request starts after this.")
    request_timeout_s: float = pydantic.Field(default=120.0, gt=0, description="Timeout of one request.")
    seed: int = pydantic.Field(default=0, description="Seed of the online arrival process.")
    api_key: str | None = pydantic.Field(default=None, description="Bearer token sent if set.")


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One turn as the client saw it (times in seconds)."""

    trajectory_id: str
    turn: int
    started_s: float
    prompt_tokens: int
    generated: tuple[int, ...]
    cached_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    latency_s: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """Distribution of one measure."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def of(values: Sequence[float]) -> Summary:
        """Summary of ``values`` (all zeros when empty)."""
        if not values:
            return Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(values)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

        return Summary(len(ordered), statistics.fmean(ordered), pct(0.5), pct(0.9), pct(0.99), ordered[-1])


@dataclass(frozen=True, slots=True)
class Report:
    """What a replay measured."""

    mode: str
    duration_s: float
    requests: int
    failed_requests: int
    trajectories_started: int
    trajectories_completed: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    ttft_s: Summary
    tpot_s: Summary
    jct_s: Summary
    """Job completion time of completed trajectories (first request start to last response end)."""
    errors: tuple[str, ...] = ()
    results: tuple[RequestResult, ...] = field(default=(), repr=False)

    @property
    def hit_ratio(self) -> float:
        """Cached prompt tokens / prompt tokens, as the server reported them."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self, with_results: bool = False) -> dict[str, Any]:
        """JSON-ready form (per-request results only when asked)."""
        data = asdict(self)
        if not with_results:
            data.pop("results")
        data["hit_ratio"] = self.hit_ratio
        return data


class _Budget:
    def __init__(self, cfg: ReplayConfig, start: float) -> None:
        self.cfg = cfg
        self.start = start
        self.started = 0

    def take(self) -> bool:
        if self.started >= self.cfg.max_requests or time.monotonic() - self.start >= self.cfg.max_duration_s:
            return False
        self.started += 1
        return True


async def replay(trajectories: Sequence[trace.Trajectory], cfg: ReplayConfig) -> Report:
    """Replay ``trajectories`` against ``cfg.base_url`` and report what was measured."""
    start = time.monotonic()
    budget = _Budget(cfg, start)
    results: list[RequestResult] = []
    jcts: list[float] = []
    completed = 0
    started = 0
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

    async with aiohttp.ClientSession(headers=headers) as session:

        async def run(trajectory: trace.Trajectory) -> None:
            nonlocal completed
            if limit is not None:
                async with limit:
                    outcome = await _trajectory(session, trajectory, cfg, budget, start, results)
            else:
                outcome = await _trajectory(session, trajectory, cfg, budget, start, results)
            if outcome is not None:
                completed += 1
                jcts.append(outcome)

        tasks: list[asyncio.Task[None]] = []
        if cfg.mode == "offline":
            tasks = [asyncio.create_task(run(t)) for t in trajectories]
            started = len(tasks)
        else:
            rng = random.Random(cfg.seed)
            next_start = start
            for trajectory in trajectories:
                next_start += rng.expovariate(cfg.rate)
                delay = next_start - time.monotonic()
                if next_start - start >= cfg.max_duration_s or budget.started >= cfg.max_requests:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run(trajectory)))
                started += 1
        await asyncio.gather(*tasks)

    failed = [r for r in results if r.error is not None]
    ok = [r for r in results if r.error is None]
    return Report(
        mode=cfg.mode,
        duration_s=time.monotonic() - start,
        requests=len(results),
        failed_requests=len(failed),
        trajectories_started=started,
        trajectories_completed=completed,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        cached_tokens=sum(r.cached_tokens for r in ok),
        generated_tokens=sum(len(r.generated) for r in ok),
        ttft_s=Summary.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Summary.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        jct_s=Summary.of(jcts),
        errors=tuple(sorted({r.error for r in failed if r.error})),
        results=tuple(sorted(results, key=lambda r: (r.started_s, r.trajectory_id, r.turn))),
    )


async def _trajectory(
    session: aiohttp.ClientSession,
    trajectory: trace.Trajectory,
    cfg: ReplayConfig,
    budget: _Budget,
    start: float,
    results: list[RequestResult],
) -> float | None:
    """Run one trajectory's turns in order; returns its JCT if every turn completed."""
    context: list[int] = []
    first_start: float | None = None
    for index, turn in enumerate(trajectory.turns):
        if not budget.take():
            return None
        prompt = [*context, *turn.append]
        begun = time.monotonic()
        first_start = first_start if first_start is not None else begun
        result = await _request(
            session, cfg, trajectory.trajectory_id, index, prompt, turn.generate, begun - start
        )
        results.append(result)
        if result.error is not None:
            return None
        context = [*prompt, *result.generated]
    if first_start is None:
        return None
    return time.monotonic() - first_start


async def _request(
    session: aiohttp.ClientSession,
    cfg: ReplayConfig,
    trajectory_id: str,
    turn: int,
    prompt: list[int],
    generate: int,
    started_s: float,
) -> RequestResult:
    body = {
        "model": cfg.model,
        "prompt": prompt,
        "max_tokens": generate,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": trajectory_id,
    }
    begun = time.monotonic()
    generated: list[int] = []
    first: float | None = None
    last = begun
    cached = 0
    error: str | None = None
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        async with session.post(
            cfg.base_url.rstrip("/") + "/v1/completions", json=body, timeout=timeout
        ) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        error = str(chunk["error"].get("message", chunk["error"]))
                        break
                    if chunk.get("usage"):
                        details = chunk["usage"].get("prompt_tokens_details") or {}
                        cached = int(details.get("cached_tokens") or 0)
                    for choice in chunk.get("choices", []):
                        ids = choice.get("token_ids")
                        if ids is None:
                            ids = tokenizer.encode(choice.get("text") or "")
                        if ids:
                            last = time.monotonic()
                            first = first if first is not None else last
                            generated.extend(ids)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.monotonic()
    if error is None and len(generated) != generate:
        error = f"expected {generate} generated tokens, got {len(generated)}"
    tpot = (last - first) / (len(generated) - 1) if first is not None and len(generated) > 1 else None
    return RequestResult(
        trajectory_id=trajectory_id,
        turn=turn,
        started_s=started_s,
        prompt_tokens=len(prompt),
        generated=tuple(generated),
        cached_tokens=cached,
        ttft_s=(first - begun) if first is not None else None,
        tpot_s=tpot,
        latency_s=end - begun,
        error=error,
    )
