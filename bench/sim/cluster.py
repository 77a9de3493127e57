"""The discrete-event simulation of one cluster run: scheduler, storage NICs, prefill and decode engines.

Built and run by ``bench.sim.scenarios`` (and ``bench.sim.ratio`` for Auto ratio runs) and by the
tests. Decisions come from the real code: PE selection, DE selection and the read side from
``dualpath_engine.scheduler.policy``, PE forward batches from ``dualpath_engine.scheduler.batching``.

Life of a request (one agent turn), mirroring ``scheduler.state``: it enters the global PE FIFO and
the global DE queue; a fetch round (every ``fetch_interval_s`` while work is being assigned, and
after any change of load) runs PE selection for every prefill group and the two-level DE selection
for every decode group; once PE and DE are known the read plan puts the hit tokens on the PE node's
and/or the DE node's storage read queue (a ``links.FifoLink``). When its reads are done the request
joins its PE's ready FIFO; the PE builds quota batches; each batch lasts its compute time, overlapped
with KV streaming over the PE's compute NIC when layer-wise (``dualpath``/``oracle``) and serialised
with it when not (``basic``). The first token ends prefill; the DE copies the prompt KV host->HBM and
decodes in continuous batches (``decode_steps_per_event`` steps per event); the finished turn persists
its new KV through the DE node's storage NIC (write direction, not on the read queue) and the agent's
next turn arrives at once (offline replay, no think time).

Role switches (Auto ratio) are drain-first: the node takes no new work, finishes what it holds and
then serves the other role with fresh engines (no model reload cost is modelled).
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import statistics
from collections.abc import Callable

from bench.sim import config as config_mod
from bench.sim import entities, links, workload
from dualpath_engine.scheduler import batching, policy

Role = entities.Role
Request = entities.Request
PrefillEngine = entities.PrefillEngine
DecodeEngine = entities.DecodeEngine
Node = entities.Node
RunResult = entities.RunResult


class Simulation:
    """One run. ``run()`` returns a ``RunResult``; hooks let ``bench.sim.ratio`` act every interval."""

    def __init__(self, cfg: config_mod.SimConfig, agents: list[workload.Agent]) -> None:
        self.cfg = cfg
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        cost, hw = cfg.cost, cfg.hardware
        self.kvb = cost.kv_bytes_per_token
        self.block = cost.block_tokens
        self.t_attn = batching.AttentionTimeModel(0.0, cost.attn_per_token_s, cost.attn_per_pair_s)
        self.nodes: list[Node] = []
        for index in range(cfg.cluster.prefill_nodes + cfg.cluster.decode_nodes):
            role: Role = "prefill" if index < cfg.cluster.prefill_nodes else "decode"
            name = f"node-{index}"
            health = cfg.cluster.snic_health.get(name, 1.0)
            node = Node(name, role, links.FifoLink(name, hw.snic_bytes_per_s * health))
            self._staff(node)
            self.nodes.append(node)
        self.by_name = {n.name: n for n in self.nodes}
        self.capacity: dict[str, float] = {}
        """Usable storage capacity per node as pushed to the scheduler (weights-aware read side)."""
        self.agents = agents
        self._next_turn_index = [0] * len(agents)
        self._context = [a.stored_context for a in agents]
        self.pe_queue: collections.deque[Request] = collections.deque()
        self.de_queue: collections.deque[Request] = collections.deque()
        self.private: dict[str, collections.deque[Request]] = {
            n.name: collections.deque() for n in self.nodes
        }
        self._private_tokens: collections.Counter[str] = collections.Counter()
        self._rq = {n.name: 0 for n in self.nodes}
        self._read_tokens = {n.name: 0.0 for n in self.nodes}
        """Hit tokens planned per node so far (the ``least_read`` tie-break's input, as in the scheduler)."""
        """``rq`` kept up to date as reads are queued and finish (no copy per decision)."""
        self.finished: list[Request] = []
        self._tick_at: float | None = None
        self._last_tick = -1.0
        self._ids = itertools.count()
        self._rr = {"pe": 0, "de": 0, "side": 0, "fetch": 0}
        self.counters: collections.Counter[str] = collections.Counter()
        self.role_switches = 0
        self.alpha = int(cfg.alpha_seconds * hw.snic_bytes_per_s / self.kvb)
        self.beta = self._profile_beta()
        self.interval_hooks: list[Callable[[Simulation], None]] = []
        self.prefill_log: list[tuple[float, str, float]] = []
        """(time, PE node, TTFT) of every prefill that finished, in time order."""
        self.decode_log: list[tuple[float, str, float]] = []
        """(time, DE node, TPOT) of every decode that finished (generation > 1), in time order."""

    # --- setup --------------------------------------------------------------------------------

    def _staff(self, node: Node) -> None:
        gpus = self.cfg.hardware.gpus_per_node
        if node.role == "prefill":
            node.prefill = [PrefillEngine(f"{node.name}-p{i}", node) for i in range(gpus)]
            node.decode = []
        else:
            hbm = self.cfg.hardware.hbm_kv_bytes_per_gpu
            node.decode = [DecodeEngine(f"{node.name}-d{i}", node, hbm) for i in range(gpus)]
            node.prefill = []

    def _profile_beta(self) -> int:
        """beta: prompt tokens one GPU gets through in ``beta_seconds`` for the workload's mean turn."""
        prompts, appends = [], []
        for agent in self.agents:
            context = agent.stored_context
            for turn in agent.turns:
                prompts.append(context + turn.append)
                appends.append(turn.append)
                context += turn.append + turn.generate
        if not prompts:
            return 1
        prompt, append = statistics.fmean(prompts), statistics.fmean(appends)
        cost = self.cfg.cost
        compute = self.t_attn(int(prompt - append), int(append)) + cost.linear_per_token_s * append
        seconds = compute
        if self.cfg.mode != "oracle":
            share = self.cfg.hardware.snic_bytes_per_s / self.cfg.hardware.gpus_per_node
            seconds = max(compute, (prompt - append) * self.kvb / share)
        return max(1, int(self.cfg.beta_seconds * prompt / seconds))

    # --- event loop ---------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at simulated time ``when`` (never before now)."""
        heapq.heappush(self._heap, (max(when, self.now), next(self._order), action))

    def run(self) -> RunResult:
        """Replay every agent's turns to the end (or ``max_sim_seconds``) and measure."""
        for index, agent in enumerate(self.agents):
            if agent.start_s > 0:
                self.at(agent.start_s, functools.partial(self._next_turn, index))
            else:
                self._next_turn(index)
        if self.cfg.rebalance_interval_s is not None:
            self.at(self.cfg.rebalance_interval_s, self._interval)
        while self._heap:
            when, _, action = heapq.heappop(self._heap)
            if when > self.cfg.max_sim_seconds:
                break
            self.now = when
            action()
        return self._result()

    def _interval(self) -> None:
        for hook in self.interval_hooks:
            hook(self)
        if self.cfg.rebalance_interval_s is not None and len(self.finished) < self._total_turns():
            self.at(self.now + self.cfg.rebalance_interval_s, self._interval)

    def _total_turns(self) -> int:
        return sum(len(a.turns) for a in self.agents)

    # --- agents -------------------------------------------------------------------------------

    def _next_turn(self, agent_index: int) -> None:
        agent = self.agents[agent_index]
        turn_index = self._next_turn_index[agent_index]
        if turn_index >= len(agent.turns):
            return
        self._next_turn_index[agent_index] += 1
        turn = agent.turns[turn_index]
        context = self._context[agent_index]
        prompt = context + turn.append
        hit_blocks = min(context // self.block, (prompt - 1) // self.block)
        request = Request(
            f"r{next(self._ids)}", agent_index, prompt, hit_blocks * self.block, turn.generate, self.now
        )
        self.pe_queue.append(request)
        self.de_queue.append(request)
        self.wake()

    # --- scheduler ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed: run a fetch round soon (at most one per ``fetch_interval_s``)."""
        if self._tick_at is None:
            self._tick_at = max(self.now, self._last_tick + self.cfg.fetch_interval_s)
            self.at(self._tick_at, self._tick)

    def read_queues(self) -> dict[str, int]:
        """The paper's ``rq`` per node, in tokens (a fresh copy)."""
        return {n.name: n.snic.queued_tokens for n in self.nodes}

    def _tick(self) -> None:
        self._tick_at = None
        self._last_tick = self.now
        if self.cfg.scheduler == "round_robin":
            assigned = self._round_robin()
        else:
            assigned = self._fetch_prefill() + self._fetch_decode()
        if assigned and (self.pe_queue or self.de_queue or any(self.private.values())):
            self.wake()

    def _fetch_prefill(self) -> int:
        assigned = 0
        groups = [n for n in self.nodes if n.role == "prefill" and n.accepting]
        # Leaders fetch on their own clocks: which group asks first rotates from round to round.
        if groups:
            first = self._rr["fetch"] % len(groups)
            groups = groups[first:] + groups[:first]
            self._rr["fetch"] += 1
        for node in groups:
            if not self.pe_queue:
                break
            head = list(itertools.islice(self.pe_queue, self.cfg.fetch_limit))
            views = [policy.RequestView(r.request_id, r.prompt) for r in head]
            engines = {e.engine_id: e for e in node.prefill}
            result = policy.select_prefill_engines(
                views,
                [policy.EngineView(e.engine_id, node.name, e.seq, e.tok) for e in node.prefill],
                self._rq,
                self.alpha,
                self.beta,
            )
            for assignment in result.assignments:
                request = self.pe_queue.popleft()
                if request.request_id != assignment.request_id:
                    raise RuntimeError("PE selection broke FIFO order")
                self._bind_pe(request, engines[assignment.engine_id])
                assigned += 1
        return assigned

    def _fetch_decode(self) -> int:
        groups = [n for n in self.nodes if n.role == "decode" and n.accepting]
        if self.de_queue and groups:
            loads = {n.name: sum(e.tok for e in n.decode) + self._private_tokens[n.name] for n in groups}
            views = [policy.RequestView(r.request_id, r.de_tokens, self._hbm(r)) for r in self.de_queue]
            spread = policy.distribute_to_decode_groups(views, loads)
            by_id = {r.request_id: r for r in self.de_queue}
            for name, ids in spread.items():
                self.private[name].extend(by_id[i] for i in ids)
                self._private_tokens[name] += sum(by_id[i].de_tokens for i in ids)
            self.de_queue.clear()
        assigned = 0
        for node in groups:
            private = self.private[node.name]
            if not private:
                continue
            head = list(itertools.islice(private, self.cfg.fetch_limit))
            engines = {e.engine_id: e for e in node.decode}
            result = policy.select_decode_engines(
                [policy.RequestView(r.request_id, r.de_tokens, self._hbm(r)) for r in head],
                [policy.EngineView(e.engine_id, node.name, e.seq, e.tok, e.free_hbm) for e in node.decode],
                self.cfg.z_factor,
            )
            for assignment in result.assignments:
                request = private.popleft()
                self._private_tokens[node.name] -= request.de_tokens
                if request.request_id != assignment.request_id:
                    raise RuntimeError("DE selection broke queue order")
                self._bind_de(request, engines[assignment.engine_id])
                assigned += 1
        return assigned

    def _round_robin(self) -> int:
        """The balance baseline: engines in turn, read side alternating (no load signals)."""
        assigned = 0
        pes = [e for n in self.nodes if n.role == "prefill" and n.accepting for e in n.prefill]
        des = [e for n in self.nodes if n.role == "decode" and n.accepting for e in n.decode]
        while self.pe_queue and pes:
            request = self.pe_queue.popleft()
            self._bind_pe(request, pes[self._rr["pe"] % len(pes)])
            self._rr["pe"] += 1
            assigned += 1
        while self.de_queue and des:
            request = self.de_queue[0]
            for offset in range(len(des)):
                engine = des[(self._rr["de"] + offset) % len(des)]
                if engine.free_hbm >= self._hbm(request):
                    self._rr["de"] += offset + 1
                    self.de_queue.popleft()
                    self._bind_de(request, engine)
                    assigned += 1
                    break
            else:
                break
        return assigned

    def _hbm(self, request: Request) -> int:
        return request.de_tokens * self.kvb

    def _bind_pe(self, request: Request, engine: PrefillEngine) -> None:
        engine.tok += request.prompt
        engine.seq += 1
        request.pe = engine
        self._bind(request)

    def _bind_de(self, request: Request, engine: DecodeEngine) -> None:
        engine.tok += request.de_tokens
        engine.seq += 1
        engine.free_hbm -= self._hbm(request)
        request.de = engine
        self._bind(request)

    def _read_mode(self) -> policy.ReadMode:
        if self.cfg.mode == "basic":
            return "pe_only"
        if self.cfg.scheduler == "round_robin":
            self._rr["side"] += 1
            return "pe_only" if self._rr["side"] % 2 else "de_only"
        return "weights_aware" if self.cfg.weights_aware else "shorter_queue"

    def _bind(self, request: Request) -> None:
        if request.pe is None or request.de is None:
            return
        if self.cfg.mode == "oracle":
            request.pe_hit_tokens = request.hit_tokens
            self._ready(request)
            return
        pe_node, de_node = request.pe.node, request.de.node
        plan = policy.plan_read(
            self._read_mode(),
            self.cfg.split_reads and self.cfg.mode == "dualpath",
            request.hit_tokens // self.block,
            self.block,
            pe_node.name,
            de_node.name,
            self._rq,
            float(self.kvb),
            self.capacity,
            self.cfg.hardware.snic_bytes_per_s,
            tie_break=self.cfg.read_side_tie_break,
            read_tokens=self._read_tokens,
        )
        self._read_tokens[pe_node.name] += plan.pe_tokens
        self._read_tokens[de_node.name] += plan.de_tokens
        request.pe_hit_tokens, request.de_hit_tokens = plan.pe_tokens, plan.de_tokens
        self.counters["pe_path_bytes"] += plan.pe_tokens * self.kvb
        self.counters["de_path_bytes"] += plan.de_tokens * self.kvb
        for node, tokens in ((pe_node, plan.pe_tokens), (de_node, plan.de_tokens)):
            if tokens:
                request.reads_left += 1
                end = node.snic.enqueue(self.now, tokens * self.kvb, tokens)
                self._rq[node.name] += tokens
                self.at(end, functools.partial(self._read_done, request, node, tokens))
        if request.reads_left == 0:
            self._ready(request)

    def _read_done(self, request: Request, node: Node, tokens: int) -> None:
        node.snic.complete(tokens)
        self._rq[node.name] -= tokens
        request.reads_left -= 1
        if request.reads_left == 0:
            self._ready(request)
        self.wake()

    # --- prefill ------------------------------------------------------------------------------

    def _ready(self, request: Request) -> None:
        if request.pe is None:
            raise RuntimeError("a request became ready without a prefill engine")
        request.cached = request.hit_tokens
        request.remaining = request.prompt - request.hit_tokens
        request.pe.ready.append(request)
        self._kick_prefill(request.pe)

    def _kick_prefill(self, engine: PrefillEngine) -> None:
        if engine.busy or not engine.ready:
            return
        head = list(itertools.islice(engine.ready, 256))
        items = [batching.PrefillItem(r.request_id, r.cached, r.remaining) for r in head]
        batch = batching.build_prefill_batch(items, self.t_attn, self.cfg.cost.quota_s)
        cost, kvb = self.cfg.cost, self.kvb
        new_tokens = sum(entry.bsz for entry in batch)
        compute = (
            cost.batch_fixed_s
            + sum(entry.predicted_seconds for entry in batch)
            + cost.linear_per_token_s * new_tokens
        )
        load_in = sum(entry.cached for entry in batch) * kvb
        out = sum(
            (entry.bsz + (r.pe_hit_tokens if entry.cached == r.hit_tokens else 0)) * kvb
            for entry, r in zip(batch, head, strict=False)
        )
        for entry, r in zip(batch, head, strict=False):
            if r.de is not None and self.cfg.mode != "oracle":
                first = r.de_hit_tokens if entry.cached == r.hit_tokens else 0
                self.counters["cnic:" + r.de.node.name] += (first + entry.bsz) * kvb
        bandwidth = self.cfg.hardware.cnic_bytes_per_s
        if self.cfg.mode == "oracle":
            duration = compute
        elif self.cfg.mode == "dualpath":
            duration = max(compute, load_in / bandwidth, out / bandwidth) + compute / cost.layers
        else:
            duration = load_in / bandwidth + compute + out / bandwidth
        if self.cfg.mode != "oracle":
            self.counters["cnic:" + engine.node.name] += load_in + out
            self.counters["pe_cnic_in_bytes"] += load_in
            self.counters["pe_cnic_out_bytes"] += out
        engine.busy = True
        engine.busy_seconds += duration
        self.counters["computed_tokens"] += new_tokens
        self.at(self.now + duration, functools.partial(self._batch_done, engine, batch))

    def _batch_done(self, engine: PrefillEngine, batch: tuple[batching.BatchEntry, ...]) -> None:
        engine.busy = False
        for entry in batch:
            request = engine.ready[0]
            if request.request_id != entry.request_id:
                raise RuntimeError("prefill batch out of FIFO order")
            request.cached += entry.bsz
            request.remaining -= entry.bsz
            if request.remaining == 0:
                engine.ready.popleft()
                self._prefill_done(engine, request)
        self._kick_prefill(engine)

    def _prefill_done(self, engine: PrefillEngine, request: Request) -> None:
        request.first_token = self.now
        self.prefill_log.append((self.now, engine.node.name, self.now - request.arrived))
        engine.tok -= request.prompt
        engine.seq -= 1
        self._after_release(engine.node)
        h2d = (
            0.0
            if self.cfg.mode == "oracle"
            else request.prompt * self.kvb / self.cfg.hardware.cnic_bytes_per_s
        )
        self.at(self.now + h2d, functools.partial(self._join_decode, request))

    # --- decode -------------------------------------------------------------------------------

    def _join_decode(self, request: Request) -> None:
        request.to_generate = request.generate - 1
        request.context = request.prompt + 1
        engine = request.de
        if engine is None:
            raise RuntimeError("a request finished prefill without a decode engine")
        if request.to_generate <= 0:
            self._finish(engine, request)
            return
        engine.joining.append(request)
        self._kick_decode(engine)

    def _kick_decode(self, engine: DecodeEngine) -> None:
        if engine.busy:
            return
        engine.running.extend(engine.joining)
        engine.joining.clear()
        if not engine.running:
            return
        cost = self.cfg.cost
        count = len(engine.running)
        context = sum(r.context for r in engine.running)
        steps = min(self.cfg.decode_steps_per_event, min(r.to_generate for r in engine.running))
        step = (
            cost.decode_step_fixed_s
            + cost.decode_per_seq_s * count
            + cost.decode_per_context_token_s * context
        )
        duration = steps * step + cost.decode_per_context_token_s * count * steps * (steps - 1) / 2
        engine.busy = True
        self.at(self.now + duration, functools.partial(self._decode_done, engine, steps))

    def _decode_done(self, engine: DecodeEngine, steps: int) -> None:
        engine.busy = False
        still = []
        for request in engine.running:
            request.to_generate -= steps
            request.context += steps
            if request.to_generate <= 0:
                self._finish(engine, request)
            else:
                still.append(request)
        engine.running = still
        self._kick_decode(engine)

    def _finish(self, engine: DecodeEngine, request: Request) -> None:
        request.done = self.now
        if request.generate > 1:
            tpot = (self.now - request.first_token) / (request.generate - 1)
            self.decode_log.append((self.now, engine.node.name, tpot))
        engine.tok -= request.de_tokens
        engine.seq -= 1
        engine.free_hbm += self._hbm(request)
        if self.cfg.mode != "oracle":
            engine.node.snic.written_bytes += (
                request.prompt + request.generate - request.hit_tokens
            ) * self.kvb
        self.finished.append(request)
        self._context[request.agent] = request.prompt + request.generate
        self._after_release(engine.node)
        self._next_turn(request.agent)

    # --- role switches ------------------------------------------------------------------------

    def request_switch(self, name: str, role: Role) -> None:
        """Drain ``name`` and give it ``role`` once its in-flight work is done."""
        node = self.by_name[name]
        if node.role == role or node.switch_to is not None:
            return
        node.accepting = False
        node.switch_to = role
        if node.role == "decode":
            self.de_queue.extendleft(reversed(self.private[node.name]))
            self.private[node.name].clear()
            self._private_tokens[node.name] = 0
        self._after_release(node)

    def _after_release(self, node: Node) -> None:
        if node.switch_to is not None and self._idle(node):
            node.role = node.switch_to
            node.switch_to = None
            node.accepting = True
            self._staff(node)
            self.role_switches += 1
        self.wake()

    @staticmethod
    def _idle(node: Node) -> bool:
        return all(e.seq == 0 for e in node.prefill) and all(e.seq == 0 for e in node.decode)

    # --- results ------------------------------------------------------------------------------

    def _result(self) -> RunResult:
        done = self.finished
        completed = len(done) == self._total_turns()
        jct = max((r.done for r in done), default=0.0)
        windows = max(1, int(jct // self.cfg.window_s))
        nodes = [n for n in self.nodes if self.cfg.mode == "dualpath" or n.role == "prefill"]
        per_link = [n.snic.window_bytes(self.cfg.window_s, windows) for n in nodes]
        balance = (
            links.max_over_avg(per_link, 0.5, self.cfg.hardware.snic_bytes_per_s * self.cfg.window_s)
            if self.cfg.mode != "oracle"
            else 1.0
        )
        usable = sum(n.snic.rate for n in self.nodes if self.cfg.mode != "basic" or n.role == "prefill")
        hit = sum(r.hit_tokens for r in done)
        ttft = sorted(r.first_token - r.arrived for r in done)
        tpot = [(r.done - r.first_token) / (r.generate - 1) for r in done if r.generate > 1]
        return RunResult(
            label=f"{self.cfg.mode} {self.cfg.cluster.label}",
            completed=completed,
            jct_s=jct,
            requests=len(done),
            prompt_tokens=sum(r.prompt for r in done),
            hit_tokens=hit,
            computed_tokens=self.counters["computed_tokens"],
            generated_tokens=sum(r.generate for r in done),
            pe_path_bytes=float(self.counters["pe_path_bytes"]),
            de_path_bytes=float(self.counters["de_path_bytes"]),
            snic_read_bytes={n.name: n.snic.read_bytes for n in self.nodes},
            snic_written_bytes=sum(n.snic.written_bytes for n in self.nodes),
            pe_cnic_in_bytes=float(self.counters["pe_cnic_in_bytes"]),
            snic_max_over_avg=balance,
            ttft_p50_s=_quantile(ttft, 0.5),
            ttft_p99_s=_quantile(ttft, 0.99),
            tpot_mean_s=statistics.fmean(tpot) if tpot else 0.0,
            storage_bound_jct_s=0.0 if self.cfg.mode == "oracle" else hit * self.kvb / usable,
            role_switches=self.role_switches,
            read_wait_s={n.name: n.snic.wait_seconds / n.snic.jobs for n in self.nodes if n.snic.jobs},
        )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def simulate(cfg: config_mod.SimConfig, agents: list[workload.Agent]) -> RunResult:
    """Run one configuration on one workload."""
    return Simulation(cfg, agents).run()
