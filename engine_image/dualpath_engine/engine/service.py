"""One engine group process: wiring of NICs, storage, read queue, KV transport, the prefill or decode
loop, the group leader and the HTTP endpoints (torch-free; the runner is injected).

Called by ``dualpath_engine.__main__`` (``python -m dualpath_engine engine --config F``), which builds
the torch runner. HTTP (aiohttp): ``GET /healthz`` (200 once the scheduler has answered a fetch, 503
before) and ``GET /metrics`` (Prometheus text: NIC bytes, storage, read queue, transport and engine
counters, all from this process's own registry). With ``network.emulate`` on, ``GET
/emulation/v1/nics`` lists the NICs (kind, line rate, budget, byte counters) and ``PUT
/emulation/v1/nics/{device}`` with ``{"budget_bytes_per_s": float|null}`` changes a NIC's budget at run
time (a degraded link for demos and e2e tests); with it off both answer 404. The KV transport listens on
``transport.port``. When ``network.sysfs_root`` is set the NIC counters are also written as a fake sysfs
tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable, Iterator, Mapping

import aiohttp
import prometheus_client
import pydantic
from aiohttp import web
from prometheus_client import core

from dualpath_engine import config
from dualpath_engine.engine import decode, leader, links, messages, prefill, profiling
from dualpath_engine.engine import runner as runner_api
from dualpath_engine.kv import layout, readqueue, storage
from dualpath_engine.scheduler import protocol
from dualpath_engine.transfer import base, factory, sysfs

log = logging.getLogger(__name__)


class _Roles:
    """Both engines of a group process and which role is active (in-place role switch, paper-style
    P/D rebalancing: the scheduler drains the group first, then tells the leader its new role)."""

    def __init__(self, pe: prefill.PrefillEngine, de: decode.DecodeEngine, role: protocol.Role) -> None:
        self.pe = pe
        self.de = de
        self.role: protocol.Role = role

    @property
    def active(self) -> prefill.PrefillEngine | decode.DecodeEngine:
        """The engine of the current role."""
        return self.pe if self.role == "prefill" else self.de

    def switch(self, role: protocol.Role) -> list[leader.Engine]:
        """Become ``role``; returns the engines the leader now reports."""
        log.warning("switching role %s -> %s", self.role, role)
        self.role = role
        return [self.active]

    async def dispatch(self, message: messages.Message) -> None:
        """Route a transport message: DE->PE kinds to the PE, PE->DE kinds to the DE."""
        if isinstance(message, messages.HitReport | messages.DeLayer):
            await self.pe.handle(message)
        elif isinstance(message, messages.PeLayer | messages.PrefillDone):
            await self.de.handle(message)
        else:
            owner = next((e for e in (self.pe, self.de) if e.knows(message.task_id)), self.active)
            await owner.handle(message)

    def collect(self) -> Iterator[core.Metric]:
        """Engine loop counters of both roles, read at scrape time."""
        running = core.GaugeMetricFamily(
            "dualpath_engine_running_requests", "Requests assigned and not finished.", labels=["role"]
        )
        tokens = core.GaugeMetricFamily(
            "dualpath_engine_running_tokens", "Tokens of the running requests.", labels=["role"]
        )
        steps = core.CounterMetricFamily(
            "dualpath_engine_steps", "Forward batches (prefill) or decode steps run.", labels=["role"]
        )
        read = core.CounterMetricFamily(
            "dualpath_engine_kv_read_bytes", "KV bytes read from storage, by read path.", labels=["path"]
        )
        for role, engine, count in (
            ("prefill", self.pe, self.pe.batches_run),
            ("decode", self.de, self.de.steps_run),
        ):
            seq, tok = engine.load()
            running.add_metric([role], seq)
            tokens.add_metric([role], tok)
            steps.add_metric([role], count)
        read.add_metric(["pe"], self.pe.read_bytes_total)
        read.add_metric(["de"], self.de.read_bytes_total)
        ratio = core.GaugeMetricFamily(
            "dualpath_engine_kv_cache_used_ratio",
            "KV bytes of the running requests over the KV capacity (kv.host_buffer_bytes), 0 to 1; "
            "the decode role's unused part is the free_hbm_bytes the leader reports.",
            labels=["role"],
        )
        ratio.add_metric(["prefill"], self.pe.kv_used_ratio())
        ratio.add_metric(["decode"], self.de.kv_used_ratio())
        yield from (running, tokens, steps, read, ratio)
        wait = core.CounterMetricFamily(
            "dualpath_engine_prefill_layer_wait_seconds",
            "Time prefill stalled waiting for DE-read KV layers.",
        )
        wait.add_metric([], self.pe.layer_wait_seconds)
        yield wait
        persisted = core.CounterMetricFamily(
            "dualpath_engine_kv_persisted_blocks", "Full Blocks written to storage by this engine."
        )
        persisted.add_metric([], self.de.persisted_blocks)
        yield persisted
        yield _by_label(
            "dualpath_engine_decode_step_seconds",
            "Decode-step time by part: the model's decode (compute), waiting on the device thread behind "
            "KV loads and read-backs (queue), the event loop between steps (host).",
            "part",
            self.de.step_seconds,
        )
        yield _by_label(
            "dualpath_engine_decode_batch_steps",
            "Decode steps by batch size (1, 2, then power-of-two ranges 3-4, 5-8, ...).",
            "batch",
            self.de.batch_steps,
        )
        yield _by_label(
            "dualpath_engine_decode_batch_tokens",
            "Tokens decoded by batch size (a step of n sequences decodes n).",
            "batch",
            self.de.batch_tokens,
        )
        yield _by_label(
            "dualpath_engine_decode_batch_step_seconds",
            "Decode-step time (compute + queue + host) by batch size; over decode_batch_steps_total, the "
            "mean step time at that batch size (comparable across read modes, unlike TPOT).",
            "batch",
            self.de.batch_seconds,
        )
        tasks_done = core.CounterMetricFamily(
            "dualpath_engine_prefill_tasks", "Prefill tasks completed (their KV reached the decode engine)."
        )
        tasks_done.add_metric([], self.pe.tasks_done)
        yield tasks_done
        yield _by_label(
            "dualpath_engine_prefill_task_seconds",
            "Completed prefill tasks' time from assignment to PrefillDone delivered, by part: read (both "
            "read paths reported the hit blocks), queue (until the first forward batch), compute (forward "
            "batches, DE-layer waits included), send (KV flushed to the decode engine).",
            "part",
            self.pe.task_seconds,
        )


def _by_label(name: str, doc: str, label: str, values: Mapping[str, float]) -> core.CounterMetricFamily:
    """A counter family with one series per ``values`` key (the key is the ``label`` value)."""
    family = core.CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


TransportFactory = Callable[[base.Nic, base.TransportMetrics], base.Transport]
"""Builds the KV transport from the engine's compute NIC and the transport metrics."""


def group_id(engine_config: config.EngineConfig) -> str:
    """The protocol's group id: unique across roles."""
    return f"{engine_config.role}-{engine_config.group_id}"


async def serve(
    engine_config: config.EngineConfig,
    runner: runner_api.ModelRunner,
    *,
    ready: Callable[[dict[str, object]], None] | None = None,
    stop: asyncio.Event | None = None,
    make_transport: TransportFactory | None = None,
) -> None:
    """Run the engine group until ``stop`` is set or SIGTERM/SIGINT arrives.

    ``make_transport`` builds the KV transport (device backends such as ``transfer.cuda`` are built by
    the entry point, since this module stays torch-free); None = ``transfer.factory`` from the
    configuration (``tcp``, or the ``rdma`` plugin named by ``transport.rdma_backend``).
    """
    stop = stop or asyncio.Event()
    registry = prometheus_client.CollectorRegistry()
    nics = base.build_engine_nics(engine_config, base.NicMetrics(registry))
    geometry = layout.BlockGeometry.from_config(engine_config.model, engine_config.kv)
    store = storage.open_store(engine_config.kv, geometry, storage.StoreMetrics(registry))
    reads = readqueue.ReadQueue(
        store, workers=engine_config.kv.read_workers, nic=nics.storage, registry=registry
    )
    kind = engine_config.transport.kind
    transport_metrics = base.TransportMetrics(kind, registry)
    if make_transport is not None:
        transport = make_transport(nics.compute, transport_metrics)
    else:
        try:
            transport = factory.build_transport(engine_config, nics.compute, transport_metrics)
        except factory.TransportConfigError as exc:
            raise config.ConfigError(str(exc)) from exc
    peer_links = links.TransportLinks(transport)
    address = await transport.start(peer_links)
    endpoint = protocol.TransportEndpoint(kind=kind, host=address.host, port=address.port)

    group: leader.GroupLeader

    def post(event: protocol.TaskEvent) -> None:
        group.post(event)

    # Both roles are built up front (the model is shared), so a role switch needs no restart.
    name = engine_config.name
    time_model = await asyncio.to_thread(
        profiling.profile, runner, max_context=engine_config.model.max_context_tokens
    )
    log.info("attention time model: %s", time_model)
    roles = _Roles(
        prefill.PrefillEngine(
            engine_config=engine_config.model_copy(update={"role": "prefill", "engine_id": name}),
            runner=runner,
            reads=reads,
            links=peer_links,
            events=post,
            time_model=time_model,
        ),
        decode.DecodeEngine(
            engine_config=engine_config.model_copy(update={"role": "decode", "engine_id": name}),
            runner=runner,
            reads=reads,
            links=peer_links,
            events=post,
            storage_nic=nics.storage,
        ),
        engine_config.role,
    )
    peer_links.handler = roles.dispatch
    registry.register(roles)

    def free_hbm(member: leader.Engine) -> int:
        return roles.de.free_kv_bytes() if roles.role == "decode" else 0

    group = leader.GroupLeader(
        scheduler_url=engine_config.scheduler_url,
        group_id=group_id(engine_config),
        role=engine_config.role,
        node=engine_config.node_name,
        engines=[roles.active],
        endpoints=lambda: [endpoint],
        read_queue=lambda: (reads.depth_tokens, reads.depth_bytes),
        free_hbm=free_hbm,
        on_role=roles.switch,
    )

    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        status = 200 if group.connected.is_set() else 503
        body = {"engine": name, "role": roles.role, "scheduler": group.connected.is_set()}
        return web.json_response(body, status=status)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_emulation_routes(app, nics, emulate=engine_config.network.emulate)
    http = web.AppRunner(app, access_log=None)
    await http.setup()
    site = web.TCPSite(http, engine_config.host, engine_config.port)
    await site.start()
    http_port = _bound_port(site)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    background: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession()
    try:
        background.append(asyncio.create_task(roles.pe.run()))
        background.append(asyncio.create_task(roles.de.run()))
        background.append(asyncio.create_task(group.run_fetch(session)))
        background.append(asyncio.create_task(group.run_results(session)))
        if engine_config.network.sysfs_root:
            writer = sysfs.SysfsWriter(
                engine_config.network.sysfs_root, nics.all(), sysfs.writer_id(engine_config.name)
            )
            background.append(asyncio.create_task(writer.run(engine_config.network.sysfs_flush_interval_s)))
        if ready is not None:
            ready(
                {
                    "engine": name,
                    "role": roles.role,
                    "http": f"http://{engine_config.host}:{http_port}",
                    "transport": {"host": address.host, "port": address.port},
                }
            )
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *background], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()
        await transport.close()
        await store.close()
        await http.cleanup()


EMULATION_PATH = "/emulation/v1/nics"
"""Root of the NIC emulation control API (only served when ``network.emulate`` is true)."""


class BudgetChange(pydantic.BaseModel):
    """Body of ``PUT /emulation/v1/nics/{device}``."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    budget_bytes_per_s: float | None = pydantic.Field(
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="New per-direction budget of the NIC's token buckets in bytes/s; null = line rate.",
    )


def nic_view(nic: base.Nic) -> dict[str, object]:
    """What the emulation API reports for one NIC."""
    return {
        "device": nic.device,
        "kind": nic.kind.value,
        "line_rate_bytes_per_s": nic.line_rate_bytes_per_s,
        "budget_bytes_per_s": nic.budget_bytes_per_s,
        "emulated": nic.emulated,
        "tx_bytes": nic.counters.tx_bytes,
        "rx_bytes": nic.counters.rx_bytes,
        "tx_packets": nic.counters.tx_packets,
        "rx_packets": nic.counters.rx_packets,
    }


def add_emulation_routes(app: web.Application, nics: base.EngineNics, *, emulate: bool) -> None:
    """``GET /emulation/v1/nics`` (devices, kind, line rate, budget, byte counters) and
    ``PUT /emulation/v1/nics/{device}`` with ``{"budget_bytes_per_s": float|null}`` (``Nic.set_budget``).

    With emulation off both answer 404 with a JSON error saying so; bad bodies get 400 naming the field,
    unknown devices 404 naming the known ones.
    """
    by_device = {nic.device: nic for nic in nics.all()}
    off = {"error": "NIC emulation is off (network.emulate is false): there are no budgets to list or change"}

    async def list_nics(request: web.Request) -> web.Response:
        if not emulate:
            return web.json_response(off, status=404)
        return web.json_response({"nics": [nic_view(nic) for nic in nics.all()]})

    async def set_budget(request: web.Request) -> web.Response:
        if not emulate:
            return web.json_response(off, status=404)
        device = request.match_info["device"]
        nic = by_device.get(device)
        if nic is None:
            known = ", ".join(sorted(by_device))
            return web.json_response(
                {"error": f"no NIC {device!r} in this engine (known: {known})"}, status=404
            )
        try:
            change = BudgetChange.model_validate_json(await request.read())
        except pydantic.ValidationError as exc:
            problems = [
                f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
                for error in exc.errors()
            ]
            fields = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
            return web.json_response({"error": "; ".join(problems), "fields": fields}, status=400)
        nic.set_budget(change.budget_bytes_per_s)
        log.warning("NIC %s budget set to %s bytes/s", device, nic.budget_bytes_per_s)
        return web.json_response(nic_view(nic))

    app.router.add_get(EMULATION_PATH, list_nics)
    app.router.add_put(EMULATION_PATH + "/{device}", set_budget)


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; port 0 needs the bound port
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def ready_line(info: dict[str, object]) -> str:
    """The line ``__main__`` prints once serving: ``ready {json}``."""
    return "ready " + json.dumps(info, sort_keys=True)
