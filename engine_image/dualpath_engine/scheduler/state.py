"""The running scheduler's state: queues, engine registry, tasks, prefix index, and its transitions.

Called only by ``scheduler.service`` (which adds asyncio: long polls, timers, client streams). Every
method is synchronous and takes ``now`` (seconds, monotonic) from the caller, so tests drive time by
hand. Decisions are delegated to the pure ``scheduler.policy`` functions.

Life of a request: ``submit`` creates attempt 0 as a task and puts it in both the global PE FIFO and
the global DE queue. A prefill group's ``fetch`` binds it to a PE (paper PE selection), a decode
group's ``fetch`` drains the DE queue into per-group private queues and binds it to a DE (two-level
selection). Once both are known the read side is planned, hit blocks are taken from the prefix index,
and the task goes into both groups' outboxes; each group's next (or waiting) fetch delivers it.
Engines post events; tokens flow to the client through ``on_update``; ``finish_reason`` ends it.

Engine loss: ``expire`` declares a group lost when its leader has not fetched for
``engine_timeout_s`` (a new ``incarnation`` means the same). Each unfinished task that needed that
group (its DE, or its PE before ``prefill_done``) is retried as a new attempt whose prompt carries the
tokens already streamed, so the client's output continues where it stopped. Drain keeps a group from
new work; a role switch drains, waits for in-flight work (at most ``drain_timeout_s``, then retries
what is left elsewhere) and then tells the group its new role.

Load accounting: engines report ``seq``/``tok``/free HBM covering the tasks they received in replies
they acknowledged; tasks assigned but not yet acknowledged are added on top. A node's read queue is
the sum its groups report plus the hit tokens planned on that node for unacknowledged tasks.
``read_tokens`` counts, per node, all hit tokens ever planned there (the ``least_read`` tie-break's
input); a node is forgotten once no group is on it.
"""

from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import Callable, Sequence

from dualpath_engine import config as config_mod
from dualpath_engine.scheduler import metrics as metrics_mod
from dualpath_engine.scheduler import policy, protocol, records


class SchedulerState:
    """All mutable scheduler state; see the module docstring for the protocol it implements."""

    def __init__(
        self,
        cfg: config_mod.SchedulerConfig,
        hasher: records.BlockHasher,
        metrics: metrics_mod.SchedulerMetrics,
        on_update: Callable[[records.RequestUpdate], None] = lambda update: None,
        on_group_work: Callable[[str], None] = lambda group_id: None,
    ) -> None:
        self.cfg = cfg
        self._hasher = hasher
        self._metrics = metrics
        self._on_update = on_update
        self._on_group_work = on_group_work
        self.groups: dict[str, records.GroupRecord] = {}
        self.requests: dict[str, records.RequestRecord] = {}
        self.tasks: dict[str, records.TaskRecord] = {}
        self.pe_queue: dict[str, None] = {}
        self.de_queue: dict[str, None] = {}
        self.private: dict[str, dict[str, None]] = {}
        self.weights: dict[str, float] = {}
        self.read_tokens: collections.Counter[str] = collections.Counter()
        self.index: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._kv_bytes_per_token = cfg.model.kv_bytes_per_token
        self._ids = itertools.count()
        self._instance = secrets.token_hex(3)

    # --- clients ---------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: protocol.SamplingParams, now: float) -> str:
        """Admit a request; returns its id. Raises ``records.AdmissionError`` when too many are waiting."""
        waiting = sum(1 for task in self.tasks.values() if task.plan is None)
        if waiting >= self.cfg.max_waiting_requests:
            self._metrics.requests.labels(result="rejected").inc()
            raise records.AdmissionError(
                f"{self.cfg.max_waiting_requests} requests are already waiting for engines"
            )
        # The instance prefix keeps ids unique across scheduler restarts: engines ignore a task id they
        # already finished, and a replaced scheduler keeps its Service address.
        request_id = f"req-{self._instance}-{next(self._ids)}"
        request = records.RequestRecord(request_id, tuple(prompt), sampling, now + self.cfg.request_timeout_s)
        self.requests[request_id] = request
        self._new_attempt(request, front=False)
        return request_id

    def cancel(self, request_id: str, reason: str) -> None:
        """The client went away: stop the request's task everywhere and forget it."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self._drop_task(request.task_id, reason)
        self._metrics.requests.labels(result="cancelled").inc()

    # --- engines ---------------------------------------------------------------------------------

    def fetch(self, message: protocol.FetchRequest, now: float) -> protocol.FetchReply:
        """Handle a leader's fetch: register, acknowledge, run the policy, build the reply."""
        group = self._register(message, now)
        if message.ack_reply_id is not None:
            for reply_id in [r for r in group.unacked if r <= message.ack_reply_id]:
                for task_id in group.unacked.pop(reply_id):
                    task = self.tasks.get(task_id)
                    if task is not None:
                        task.acked.add(group.group_id)
        for reply_id in sorted(group.unacked):  # lost replies: send their tasks again
            group.outbox[:0] = [t for t in group.unacked.pop(reply_id) if t not in group.outbox]
        self._advance_switch(group, now)
        if group.accepting:
            if group.role == "prefill":
                self._assign_prefill(group, message.max_assignments)
            else:
                self._assign_decode(group, message.max_assignments)
        return self._reply(group)

    def record(self, batch: protocol.ResultBatch, now: float) -> protocol.ResultAck:
        """Apply engine events; returns cancels for tasks the scheduler no longer runs."""
        group = self.groups.get(batch.group_id)
        if group is not None:
            group.last_seen = now
        cancels: list[protocol.Cancel] = []
        for event in batch.events:
            for block in event.persisted_block_hashes:
                self._remember(block)
            self._metrics.kv_read_bytes.labels(path="pe").inc(event.kv_read_bytes_pe)
            self._metrics.kv_read_bytes.labels(path="de").inc(event.kv_read_bytes_de)
            task = self.tasks.get(event.task_id)
            request = self.requests.get(task.request_id) if task is not None else None
            if task is None or request is None or request.task_id != task.task_id:
                cancels.append(protocol.Cancel(task_id=event.task_id, reason="task is no longer scheduled"))
                continue
            self._apply_event(request, task, event, now)
        return protocol.ResultAck(cancels=tuple(cancels))

    def expire(self, now: float) -> None:
        """Declare silent groups lost, time out old requests, finish role switches past deadline."""
        for group in list(self.groups.values()):
            if now - group.last_seen > self.cfg.engine_timeout_s:
                self._lose_group(group, "timeout", now)
            else:
                self._advance_switch(group, now)
        for request in [r for r in self.requests.values() if r.deadline <= now]:
            self.requests.pop(request.request_id)
            self._drop_task(request.task_id, "request timed out")
            self._metrics.requests.labels(result="timeout").inc()
            self._on_update(
                records.RequestUpdate(
                    request.request_id,
                    error=self._timeout_message(request),
                    error_kind="timeout",
                )
            )

    # --- admin -----------------------------------------------------------------------------------

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the per-node usable storage-NIC capacities (bytes/s) for weights-aware reads."""
        self.weights = dict(weights)

    def set_drained(self, group_id: str, drained: bool) -> None:
        """Drain (no new work) or undrain a group; its private DE queue goes back to the global one."""
        group = self._group(group_id)
        group.drained = drained
        if drained:
            self._return_private(group)
        self._on_group_work(group_id)

    def set_role(self, group_id: str, role: protocol.Role, now: float) -> None:
        """Switch a group's role in place: drain it, then flip when in-flight work is done."""
        group = self._group(group_id)
        if group.role == role:
            group.switch_to = None
            return
        group.switch_to = role
        group.switch_deadline = now + self.cfg.drain_timeout_s
        self._return_private(group)
        self._advance_switch(group, now)
        self._on_group_work(group_id)

    def in_flight(self, group_id: str) -> int:
        """Unfinished tasks that still need the group."""
        return sum(1 for task in self.tasks.values() if self._needs(task, group_id))

    def sample(self) -> metrics_mod.StateSample:
        """The current state for the scrape-time metrics collector and the admin status."""
        engines = tuple(
            metrics_mod.EngineSample(e.engine_id, g.group_id, g.role, e.seq, e.tok, e.free_hbm_bytes)
            for g in self.groups.values()
            for e in g.engines.values()
        )
        counts: dict[tuple[str, str], int] = collections.Counter(
            (g.role, "switching" if g.switch_to else "drained" if g.drained else "active")
            for g in self.groups.values()
        )
        return metrics_mod.StateSample(
            queues={
                "pe_global": len(self.pe_queue),
                "de_global": len(self.de_queue),
                "de_group": sum(len(q) for q in self.private.values()),
            },
            running_requests=len(self.requests),
            engines=engines,
            groups=dict(counts),
            read_queue_tokens=self._read_queues(),
            path_weights=dict(self.weights),
            prefix_index_blocks=len(self.index),
        )

    # --- internals: registration and replies -----------------------------------------------------

    def _register(self, message: protocol.FetchRequest, now: float) -> records.GroupRecord:
        group = self.groups.get(message.group_id)
        if group is not None and group.incarnation != message.incarnation:
            self._lose_group(group, "restart", now)
            group = None
        if group is None:
            group = records.GroupRecord(
                group_id=message.group_id,
                role=message.role,
                reported_role=message.role,
                node=message.node,
                incarnation=message.incarnation,
                engines={},
                read_queue_tokens=0,
                last_seen=now,
            )
            self.groups[message.group_id] = group
            if message.role == "decode":
                self.private.setdefault(group.group_id, {})
        group.reported_role = message.role
        if group.node != message.node:
            group.node = message.node
            self._forget_idle_nodes()
        group.engines = {e.engine_id: e for e in message.engines}
        group.read_queue_tokens = message.read_queue_tokens
        group.last_seen = now
        return group

    def _reply(self, group: records.GroupRecord) -> protocol.FetchReply:
        reply_id = group.next_reply_id
        group.next_reply_id += 1
        assignments = []
        delivered = []
        for task_id in group.outbox:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            assignment = self._assignment(task, group.group_id)
            if assignment is not None:
                assignments.append(assignment)
                delivered.append(task_id)
                task.sent.add(group.group_id)
        group.outbox.clear()
        if delivered:
            group.unacked[reply_id] = delivered
        cancels = tuple(group.cancels)
        group.cancels.clear()
        return protocol.FetchReply(
            reply_id=reply_id,
            assignments=tuple(assignments),
            cancels=cancels,
            role=group.role,
            drained=group.drained or group.switch_to is not None,
        )

    def _assignment(self, task: records.TaskRecord, group_id: str) -> protocol.Assignment | None:
        if task.pe is None or task.de is None or task.plan is None:
            return None
        pe_peer, de_peer = self._peer(task.pe), self._peer(task.de)
        if pe_peer is None or de_peer is None:
            return None
        role: protocol.Role = "prefill" if task.pe[0] == group_id else "decode"
        engine_id = task.pe[1] if role == "prefill" else task.de[1]
        block_tokens = self.cfg.kv.block_tokens
        hits = tuple(
            protocol.HitBlock(index=i, hash=h, side=side)
            for i, (h, side) in enumerate(zip(task.hit_hashes, task.plan.sides, strict=True))
        )
        cached = len(hits) * block_tokens
        return protocol.Assignment(
            task_id=task.task_id,
            request_id=task.request_id,
            attempt=task.attempt,
            role=role,
            engine_id=engine_id,
            prompt_token_ids=task.prompt,
            sampling=task.sampling,
            block_tokens=block_tokens,
            hit_blocks=hits,
            read_side=task.plan.primary,
            prefill=pe_peer,
            decode=de_peer,
            chunk_plan=protocol.ChunkPlan(
                cached_tokens=cached,
                compute_tokens=len(task.prompt) - cached,
                compute_quota_ms=self.cfg.compute_quota_ms,
            ),
        )

    def _peer(self, where: tuple[str, str]) -> protocol.PeerInfo | None:
        group = self.groups.get(where[0])
        engine = group.engines.get(where[1]) if group is not None else None
        if group is None or engine is None:
            return None
        return protocol.PeerInfo(
            engine_id=engine.engine_id, group_id=group.group_id, node=group.node, transport=engine.transport
        )

    # --- internals: policy -----------------------------------------------------------------------

    def _engine_views(self, group: records.GroupRecord) -> list[policy.EngineView]:
        pending_tok: dict[str, int] = collections.Counter()
        pending_seq: dict[str, int] = collections.Counter()
        pending_hbm: dict[str, int] = collections.Counter()
        for task in self.tasks.values():
            where = task.pe if group.role == "prefill" else task.de
            if where is None or where[0] != group.group_id or group.group_id in task.acked:
                continue
            pending_tok[where[1]] += task.pe_tokens if group.role == "prefill" else task.de_tokens
            pending_seq[where[1]] += 1
            pending_hbm[where[1]] += task.hbm_bytes if group.role == "decode" else 0
        return [
            policy.EngineView(
                engine_id=e.engine_id,
                node=group.node,
                seq=e.seq + pending_seq[e.engine_id],
                tok=e.tok + pending_tok[e.engine_id],
                free_hbm_bytes=max(0, e.free_hbm_bytes - pending_hbm[e.engine_id]),
            )
            for e in group.engines.values()
        ]

    def _read_queues(self) -> dict[str, int]:
        queues: dict[str, int] = collections.Counter()
        for group in self.groups.values():
            queues[group.node] += group.read_queue_tokens
        block_tokens = self.cfg.kv.block_tokens
        for task in self.tasks.values():
            if task.plan is None or task.pe is None or task.de is None:
                continue
            pe_blocks = task.plan.sides.count("pe")
            for where, count in ((task.pe, pe_blocks), (task.de, len(task.plan.sides) - pe_blocks)):
                if where[0] in task.acked or where[0] not in self.groups:
                    continue
                queues[self.groups[where[0]].node] += count * block_tokens
        return dict(queues)

    def _view(self, task: records.TaskRecord, role: protocol.Role) -> policy.RequestView:
        tokens = task.pe_tokens if role == "prefill" else task.de_tokens
        return policy.RequestView(task.task_id, tokens, task.hbm_bytes if role == "decode" else 0)

    def _assign_prefill(self, group: records.GroupRecord, limit: int | None) -> None:
        queue = [self._view(self.tasks[t], "prefill") for t in self.pe_queue]
        result = policy.select_prefill_engines(
            queue,
            self._engine_views(group),
            self._read_queues(),
            self.cfg.alpha_tokens,
            self.cfg.beta_tokens,
            limit,
        )
        if queue:
            self._metrics.fetch_stops.labels(role="prefill", reason=result.stop).inc()
        for assignment in result.assignments:
            task = self.tasks[assignment.request_id]
            del self.pe_queue[task.task_id]
            task.pe = (group.group_id, assignment.engine_id)
            self._metrics.pe_assignments.labels(category=assignment.category).inc()
            self._bind(task)

    def _assign_decode(self, group: records.GroupRecord, limit: int | None) -> None:
        targets = {
            g.group_id: sum(v.tok for v in self._engine_views(g))
            + sum(self.tasks[t].de_tokens for t in self.private.get(g.group_id, {}))
            for g in self.groups.values()
            if g.role == "decode" and g.accepting
        }
        spread = policy.distribute_to_decode_groups(
            [self._view(self.tasks[t], "decode") for t in self.de_queue], targets
        )
        for group_id, task_ids in spread.items():
            for task_id in task_ids:
                del self.de_queue[task_id]
                self.private.setdefault(group_id, {})[task_id] = None
        private = self.private.setdefault(group.group_id, {})
        queue = [self._view(self.tasks[t], "decode") for t in private]
        result = policy.select_decode_engines(queue, self._engine_views(group), self.cfg.z_factor, limit)
        if queue:
            self._metrics.fetch_stops.labels(role="decode", reason=result.stop).inc()
        for assignment in result.assignments:
            task = self.tasks[assignment.request_id]
            del private[task.task_id]
            task.de = (group.group_id, assignment.engine_id)
            self._metrics.de_assignments.labels(choice=assignment.choice).inc()
            self._bind(task)

    def _bind(self, task: records.TaskRecord) -> None:
        if task.pe is None or task.de is None:
            return
        hits = self._hits(task.hashes)
        # The PE must compute at least the prompt's last token (its logits give the first token).
        hits = hits[: (len(task.prompt) - 1) // self.cfg.kv.block_tokens]
        task.hit_hashes = tuple(hits)
        pe_node, de_node = self.groups[task.pe[0]].node, self.groups[task.de[0]].node
        mode: policy.ReadMode
        if self.cfg.policy == "pe-only":
            mode = "pe_only"
        elif self.cfg.policy == "de-only":
            mode = "de_only"
        else:
            mode = "weights_aware" if self.cfg.weights_aware_read_side else "shorter_queue"
        task.plan = policy.plan_read(
            mode,
            self.cfg.split_reads,
            len(hits),
            self.cfg.kv.block_tokens,
            pe_node,
            de_node,
            self._read_queues(),
            float(self._kv_bytes_per_token),
            self.weights,
            self.cfg.default_storage_capacity_bytes_per_s,
            tie_break=self.cfg.read_side_tie_break,
            read_tokens=self.read_tokens,
        )
        self.read_tokens[pe_node] += task.plan.pe_tokens
        self.read_tokens[de_node] += task.plan.de_tokens
        split = bool(task.plan.pe_tokens and task.plan.de_tokens)
        self._metrics.read_side_decisions.labels(path="split" if split else task.plan.primary).inc()
        cached = len(hits) * self.cfg.kv.block_tokens
        self._metrics.prompt_tokens.labels(source="cache_hit").inc(cached)
        self._metrics.prompt_tokens.labels(source="computed").inc(len(task.prompt) - cached)
        request = self.requests.get(task.request_id)
        if request is not None:
            request.cached_tokens = cached
        for group_id in {task.pe[0], task.de[0]}:
            self.groups[group_id].outbox.append(task.task_id)
            self._on_group_work(group_id)

    def _hits(self, hashes: Sequence[str]) -> list[str]:
        hits = []
        for block in hashes:
            if block not in self.index:
                break
            self.index.move_to_end(block)
            hits.append(block)
        return hits

    def _remember(self, block: str) -> None:
        self.index[block] = None
        self.index.move_to_end(block)
        while len(self.index) > self.cfg.prefix_index_max_blocks:
            self.index.popitem(last=False)

    # --- internals: events, retries, loss --------------------------------------------------------

    def _apply_event(
        self, request: records.RequestRecord, task: records.TaskRecord, event: protocol.TaskEvent, now: float
    ) -> None:
        if event.prefill_done:
            task.prefill_done = True
        if event.error is not None:
            self._retry(request, f"engine {event.engine_id} failed: {event.error}", "engine_error", now)
            return
        new: list[int] = []
        position = task.base + event.first_index
        for token in event.token_ids:
            if position == len(request.emitted) and len(request.emitted) < request.sampling.max_tokens:
                request.emitted.append(token)
                new.append(token)
            position += 1
        if new and task.de is not None and event.engine_id == task.de[1]:
            task.prefill_done = True  # a DE only decodes once the PE handed over all KV
        if event.cached_tokens is not None:
            request.cached_tokens = event.cached_tokens
        finish = event.finish_reason
        if finish is None and len(request.emitted) >= request.sampling.max_tokens:
            finish = "length"
        if finish is not None:
            self.requests.pop(request.request_id, None)
            self._finish_task(task)
            self._metrics.requests.labels(result="ok").inc()
        if new or finish is not None:
            self._metrics.generation_tokens.inc(len(new))
            self._on_update(
                records.RequestUpdate(
                    request.request_id, tuple(new), finish, cached_tokens=request.cached_tokens
                )
            )

    def _retry(self, request: records.RequestRecord, reason: str, label: str, now: float) -> None:
        self._drop_task(request.task_id, reason)
        self._metrics.retries.labels(reason=label).inc()
        if request.attempt + 1 >= self.cfg.max_attempts:
            self.requests.pop(request.request_id, None)
            self._metrics.requests.labels(result="error").inc()
            message = f"request failed after {request.attempt + 1} attempts; last: {reason}"
            self._on_update(records.RequestUpdate(request.request_id, error=message, error_kind="failed"))
            return
        request.attempt += 1
        self._new_attempt(request, front=True)

    def _new_attempt(self, request: records.RequestRecord, front: bool) -> None:
        prompt = request.prompt + tuple(request.emitted)
        remaining = request.sampling.max_tokens - len(request.emitted)
        sampling = request.sampling.model_copy(update={"max_tokens": max(1, remaining)})
        task_id = f"{request.request_id}.{request.attempt}"
        total = len(prompt) + sampling.max_tokens
        task = records.TaskRecord(
            task_id=task_id,
            request_id=request.request_id,
            attempt=request.attempt,
            prompt=prompt,
            sampling=sampling,
            hashes=self._hasher(prompt),
            pe_tokens=len(prompt),
            de_tokens=total,
            hbm_bytes=total * self._kv_bytes_per_token,
            base=len(request.emitted),
        )
        self.tasks[task_id] = task
        request.task_id = task_id
        if front:
            self.pe_queue = {task_id: None, **self.pe_queue}
            self.de_queue = {task_id: None, **self.de_queue}
        else:
            self.pe_queue[task_id] = None
            self.de_queue[task_id] = None
        for group in self.groups.values():
            if group.accepting:
                self._on_group_work(group.group_id)

    def _drop_task(self, task_id: str, reason: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        self.pe_queue.pop(task_id, None)
        self.de_queue.pop(task_id, None)
        for queue in self.private.values():
            queue.pop(task_id, None)
        for group_id in {w[0] for w in (task.pe, task.de) if w is not None}:
            group = self.groups.get(group_id)
            if group is None:
                continue
            if task_id in group.outbox:
                group.outbox.remove(task_id)
            if group_id in task.sent:
                group.cancels.append(protocol.Cancel(task_id=task_id, reason=reason))
                self._on_group_work(group_id)

    def _finish_task(self, task: records.TaskRecord) -> None:
        self.tasks.pop(task.task_id, None)

    def _needs(self, task: records.TaskRecord, group_id: str) -> bool:
        if task.de is not None and task.de[0] == group_id:
            return True
        return task.pe is not None and task.pe[0] == group_id and not task.prefill_done

    def _lose_group(self, group: records.GroupRecord, reason: str, now: float) -> None:
        del self.groups[group.group_id]
        self._forget_idle_nodes()
        self._metrics.engine_groups_lost.labels(reason=reason).inc()
        self._return_private(group)
        self.private.pop(group.group_id, None)
        for task in [t for t in self.tasks.values() if self._needs(t, group.group_id)]:
            request = self.requests.get(task.request_id)
            if request is not None and request.task_id == task.task_id:
                self._retry(request, f"engine group {group.group_id} lost ({reason})", "engine_lost", now)

    def _forget_idle_nodes(self) -> None:
        nodes = {g.node for g in self.groups.values()}
        for node in [n for n in self.read_tokens if n not in nodes]:
            del self.read_tokens[node]

    def _return_private(self, group: records.GroupRecord) -> None:
        queue = self.private.get(group.group_id)
        if queue:
            self.de_queue = {**queue, **self.de_queue}
            queue.clear()

    def _advance_switch(self, group: records.GroupRecord, now: float) -> None:
        if group.switch_to is None:
            return
        busy = [t for t in self.tasks.values() if self._needs(t, group.group_id)]
        if busy and now < group.switch_deadline:
            return
        for task in busy:
            request = self.requests.get(task.request_id)
            if request is not None and request.task_id == task.task_id:
                self._retry(request, f"group {group.group_id} switched role", "role_switch", now)
        group.role = group.switch_to
        group.switch_to = None
        if group.role == "decode":
            self.private.setdefault(group.group_id, {})
        else:
            self.private.pop(group.group_id, None)
        self._on_group_work(group.group_id)

    def _group(self, group_id: str) -> records.GroupRecord:
        group = self.groups.get(group_id)
        if group is None:
            raise records.UnknownGroupError(group_id)
        return group

    def _timeout_message(self, request: records.RequestRecord) -> str:
        roles = {g.role for g in self.groups.values()}
        missing = [r for r in ("prefill", "decode") if r not in roles]
        why = f"; no {' or '.join(missing)} engine group is registered" if missing else ""
        return f"request not finished within {self.cfg.request_timeout_s:g} s{why}"
