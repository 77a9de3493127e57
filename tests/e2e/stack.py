"""The whole system on one machine: :class:`LocalStack` (test and demo infrastructure, not product).

``LocalStack(run_dir, nodes=4).start()`` (or ``with LocalStack(...) as stack:``) brings up, in order:

1. the local control plane (``tests/cluster/harness.py``) and ``nodes`` fake 8-GPU RDMA nodes
   (``gpu-node-0`` ...);
2. the CRDs (``crds/``) and the Helm chart (``charts/dualpath-operator``, ``--skip-crds``) in
   ``dualpath-system``; the chart's in-cluster Deployment is scaled to 0 (kwok would only pretend to
   run it) and the operator runs as a local process with the chart ServiceAccount's token instead, so
   every API call goes through the chart's RBAC;
3. the :class:`~tests.cluster.runner.PodRunner`: real engine and scheduler processes on the pods'
   127.x IPs, fake sysfs NIC trees per node;
4. one Debian ``prometheus-node-exporter`` per node on the runner's sysfs root of that node, and one
   Prometheus that scrapes them (label ``node``), the operator, and through file-based service
   discovery (rewritten every second as pods come and go) every engine and scheduler pod
   (labels ``pod``, ``node``, ``component``, ``role``).

Helpers for the e2e suite and the demo: apply a DualPathCluster, wait on its status and conditions,
the scheduler and engine URLs, the cluster's events, a node's storage-NIC budget (the engines' NIC
emulation API) or background traffic on it, Prometheus stop/start, and :meth:`LocalStack.stop`, which
stops everything it started by PID and verifies that nothing is left. Every process binds loopback on
ports picked at run time. Used by ``tests/e2e/demo.py`` and the ``e2e`` tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import yaml
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Event, Namespace, Pod, ServiceAccount

from dualpath_engine.transfer import base as nic
from dualpath_engine.transfer import sysfs
from tests import telemetry_stack
from tests.cluster import harness, nodes, processes, runner

REPO = harness.REPO_ROOT
DPC = create_namespaced_resource("dualpath.io", "v1alpha1", "DualPathCluster", "dualpathclusters")
CLUSTER_LABEL = "dualpath.io/cluster"
ROLE_LABEL = "dualpath.io/role"
CHART = REPO / "charts" / "dualpath-operator"
STORAGE_DEVICE = "mlx5_storage0"
"""The storage NIC's device name in engine configs the operator renders (engine_config._network)."""
COMPUTE_DEVICE = "mlx5_0"
"""The engines' default compute NIC (dualpath_engine.config)."""


class StackError(RuntimeError):
    """Something the stack started failed or did not become ready; the message says what and why."""


@dataclass(frozen=True)
class EnginePod:
    """One running engine (or scheduler) process as the stack sees it."""

    pod: str
    node: str
    ip: str
    port: int
    component: str
    role: str
    pid: int
    ready: bool

    @property
    def url(self) -> str:
        """``http://<pod IP>:<http port>``."""
        return f"http://{self.ip}:{self.port}"


def _http(url: str, *, method: str = "GET", body: Any = None, timeout_s: float = 5.0) -> tuple[int, str]:
    """Status and text of one HTTP request (status 0 when nothing answers)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


class BackgroundTraffic:
    """Non-KV traffic on a node's storage NIC: a thread that adds its own shard to the fake sysfs
    counters (``<root>/.dualpath/nic-shards/<device>/background.json``, the format
    ``dualpath_engine.transfer.sysfs`` aggregates), growing ``rx`` by ``bytes_per_s``. The engines fold it
    into the exported counters on their next flush, so node_exporter sees a NIC partly used by other
    traffic: the operator's usable capacity (line rate minus non-KV traffic) falls."""

    def __init__(self, sysfs_root: Path, bytes_per_s: float, device: str = STORAGE_DEVICE) -> None:
        self.shard = sysfs_root / ".dualpath" / "nic-shards" / device / "background.json"
        self.bytes_per_s = bytes_per_s
        self._rx = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"background-{device}", daemon=True)

    def start(self) -> BackgroundTraffic:
        self.shard.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            self._rx = float(json.loads(self.shard.read_text())["rx_bytes"])  # continue, never go back
        self._write()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop growing (the shard stays: counters must never go backwards)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.5):
            now = time.monotonic()
            self._rx += self.bytes_per_s * (now - last)
            last = now
            self._write()

    def _write(self) -> None:
        rx = int(self._rx)
        doc = {"tx_bytes": 0, "rx_bytes": rx, "tx_packets": 0, "rx_packets": rx // 4096}
        fd, tmp = tempfile.mkstemp(dir=self.shard.parent, prefix=".bg-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))
        os.replace(tmp, self.shard)


class LocalStack:
    """Control plane, chart, operator, pod runner, node_exporters and Prometheus; see the module doc."""

    def __init__(
        self,
        run_dir: Path,
        *,
        nodes: int = 4,
        namespace: str = "dualpath-demo",
        node_prefix: str = "gpu-node",
        chart_namespace: str = "dualpath-system",
        release: str = "dp",
        operator_env: Mapping[str, str] | None = None,
        say: Callable[[str], None] | None = None,
        cidr_base: int | None = None,
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.node_count = nodes
        self.cidr_base = cidr_base if cidr_base is not None else free_cidr_base()
        self.namespace = namespace
        self.node_prefix = node_prefix
        self.chart_namespace = chart_namespace
        self.release = release
        self.operator_env = {"DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "3", **(operator_env or {})}
        self._say = say or (lambda line: None)
        self.cluster = harness.Cluster(run_dir=self.run_dir / "cluster")
        self.kube: Client | None = None
        self.node_names: list[str] = []
        self.operator_kubeconfig = self.run_dir / "operator.kubeconfig"
        self.operator: processes.Managed | None = None
        self.operator_metrics_port = 0
        self.runner: runner.PodRunner | None = None
        self.exporters: dict[str, telemetry_stack.NodeExporter] = {}
        self.prometheus: telemetry_stack.Prometheus | None = None
        self.prometheus_port = 0
        self.telemetry_dir = self.run_dir / "telemetry"
        self.sd_file = self.telemetry_dir / "pods.json"
        self.background: dict[str, BackgroundTraffic] = {}
        self._sd_stop = threading.Event()
        self._sd_thread: threading.Thread | None = None
        self._pids: list[int] = []

    # ---- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (``KUBECONFIG=<this> kubectl get dpc -w``)."""
        return self.cluster.kubeconfig

    @property
    def client(self) -> Client:
        if self.kube is None:
            raise StackError("the stack is not started")
        return self.kube

    @property
    def prometheus_url(self) -> str:
        """Base URL of the Prometheus HTTP API (for ``spec.telemetry.prometheusUrl``)."""
        return f"http://127.0.0.1:{self.prometheus_port}"

    def start(self) -> LocalStack:
        """Start every component in order; on any failure stop what was started and raise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._say(
                f"control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) in {self.run_dir}"
            )
            self.cluster.start()
            self._pids += [p.pid for p in self.cluster.procs]
            self.kube = Client(KubeConfig.from_file(str(self.kubeconfig)), field_manager="dualpath-stack")
            self._say(f"{self.node_count} fake 8-GPU RDMA nodes (H200, SR-IOV VFs, storage NIC)")
            factory = nodes.NodeFactory(self.kube, cidr_base=self.cidr_base)
            specs = factory.create_many(self.node_prefix, self.node_count, "h200")
            self.node_names = [s.name for s in specs]
            self._say("CRDs and the Helm chart (RBAC, ServiceAccount)")
            self._apply_crds()
            self._install_chart()
            self._say("operator as a local process with the chart's ServiceAccount token")
            self._start_operator()
            self._create_namespace()
            self._say("pod runner: real engine/scheduler processes for scheduled pods")
            self.runner = runner.PodRunner(self.kubeconfig, self.run_dir / "runner", namespace=self.namespace)
            self.runner.start()
            self._say("node_exporter per node and Prometheus (file-based discovery of engine pods)")
            self._start_exporters()
            self._write_sd([])
            self.prometheus_port = processes.free_port()
            self.start_prometheus()
            self._sd_stop.clear()
            self._sd_thread = threading.Thread(target=self._sd_loop, name="stack-sd", daemon=True)
            self._sd_thread.start()
        except BaseException:
            self.stop()
            raise
        self._say(f"KUBECONFIG={self.kubeconfig}  (kubectl get dpc -n {self.namespace} -w)")
        return self

    def stop(self) -> None:
        """Stop everything this stack started, by PID, newest first; raise if any process is left."""
        self._sd_stop.set()
        if self._sd_thread is not None:
            self._sd_thread.join(timeout=10)
        for traffic in self.background.values():
            traffic.stop()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.runner.stop_all()
            self._pids += self.runner.started_pids()
        self.stop_prometheus()
        for exporter in self.exporters.values():
            exporter.stop()
        if self.operator is not None:
            self.operator.stop(grace_s=10)
        self.cluster.stop()
        left = self.leftover_pids()
        if left:
            raise StackError(f"processes still alive after stop: {left}")

    def leftover_pids(self) -> list[int]:
        """PIDs this stack started that are still alive (empty after a clean :meth:`stop`)."""
        pids = [*self._pids, *(p.pid for p in self.cluster.procs)]
        if self.runner is not None:
            pids += self.runner.started_pids()
        return sorted({pid for pid in pids if processes.pid_alive(pid)})

    # ---- start-up steps ----------------------------------------------------------------------------

    def _apply_crds(self) -> None:
        names = []
        for path in sorted((REPO / "crds").glob("*.yaml")):
            body = yaml.safe_load(path.read_text())
            crd = cast(CustomResourceDefinition, CustomResourceDefinition.from_dict(body))
            self.client.apply(crd, force=True)
            names.append(body["metadata"]["name"])

        def established() -> bool:
            for name in names:
                status = self.client.get(CustomResourceDefinition, name=name).status
                conds = (status.conditions if status else None) or []
                if not any(c.type == "Established" and c.status == "True" for c in conds):
                    return False
            return True

        harness.wait_for("CRDs Established", established, 60)

    def _tool(self, *argv: str, timeout_s: float = 120) -> str:
        """Run ``.dev/bin/<argv[0]>`` (helm, kubectl) against the cluster; its stdout."""
        helm = str(self.run_dir / "helm")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": helm}
        env.update(HELM_CONFIG_HOME=helm, HELM_DATA_HOME=helm)
        argv = (str(self.cluster.bin_dir / argv[0]), *argv[1:])
        proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise StackError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def _install_chart(self) -> None:
        ns = self.chart_namespace
        self._tool("helm", "install", self.release, str(CHART), "-n", ns, "--create-namespace", "--skip-crds")
        # The chart's Deployment stays at 0 replicas: kwok would only pretend to run it.
        self._tool(
            "kubectl", "-n", ns, "scale", "deployment", f"{self.release}-dualpath-operator", "--replicas=0"
        )

    def _start_operator(self) -> None:
        ns, sa = self.chart_namespace, f"{self.release}-dualpath-operator"
        token = self._tool("kubectl", "-n", ns, "create", "token", sa, "--duration=24h").strip()
        self.cluster.token_kubeconfig(
            self.operator_kubeconfig, token, user=f"system:serviceaccount:{ns}:{sa}"
        )
        health = processes.free_port()
        self.operator_metrics_port = processes.free_port()
        self.operator = processes.start(
            "operator",
            [sys.executable, "-m", "dualpath_operator", f"--liveness=http://127.0.0.1:{health}/healthz"],
            self.run_dir / "operator",
            env={
                "KUBECONFIG": str(self.operator_kubeconfig),
                "DUALPATH_OPERATOR_METRICS_HOST": "127.0.0.1",
                "DUALPATH_OPERATOR_METRICS_PORT": str(self.operator_metrics_port),
                **self.operator_env,
            },
            cwd=REPO,
        )
        self._pids.append(self.operator.pid)
        proc = self.operator

        def live() -> bool:
            if not proc.alive():
                raise harness.ClusterError(f"operator exited:\n{proc.log_tail(60)}")
            return _http(f"http://127.0.0.1:{health}/healthz")[0] == 200

        harness.wait_for("operator liveness", live, 90)

    def _create_namespace(self) -> None:
        with contextlib.suppress(ApiError):
            self.client.create(Namespace(metadata=ObjectMeta(name=self.namespace)))

        def default_sa() -> bool:
            self.client.get(ServiceAccount, name="default", namespace=self.namespace)
            return True

        harness.wait_for(f"ServiceAccount {self.namespace}/default", default_sa, 60)

    def sysfs_root(self, node: str) -> Path:
        """The fake sysfs root the runner gives the engines of ``node`` (node_exporter's --path.sysfs)."""
        if self.runner is None:
            raise StackError("the stack is not started")
        return self.runner.work_dir / "nodes" / node / "sys"

    def _start_exporters(self) -> None:
        for node in self.node_names:
            root = self.sysfs_root(node)
            root.mkdir(parents=True, exist_ok=True)
            seed_sysfs(root)
            exporter = telemetry_stack.start_node_exporter(root, processes.free_port(), self.telemetry_dir)
            self.exporters[node] = exporter
            self._pids.append(exporter.process.pid)

    # ---- Prometheus --------------------------------------------------------------------------------

    def _prometheus_config(self) -> dict[str, Any]:
        exporters = [
            {"targets": [e.url.split("/")[2]], "labels": {"node": n}} for n, e in self.exporters.items()
        ]
        pods = [{"files": [str(self.sd_file)], "refresh_interval": "1s"}]
        operator = [{"targets": [f"127.0.0.1:{self.operator_metrics_port}"]}]
        jobs = [
            {"job_name": "node-exporter", "static_configs": exporters},
            {"job_name": "dualpath-pods", "file_sd_configs": pods},
            {"job_name": "dualpath-operator", "static_configs": operator},
        ]
        every = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        return {"global": every, "scrape_configs": jobs}

    def start_prometheus(self) -> telemetry_stack.Prometheus:
        """Start Prometheus (again) on the stack's port, with the same data directory."""
        if self.prometheus is not None and self.prometheus.process.alive():
            return self.prometheus
        run_dir = self.telemetry_dir / "prometheus"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "prometheus.yml"
        config.write_text(json.dumps(self._prometheus_config(), indent=2))
        argv = [str(telemetry_stack.PROMETHEUS), f"--config.file={config}", "--log.level=warn"]
        argv += [
            f"--storage.tsdb.path={run_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
        ]
        process = processes.start("prometheus", argv, run_dir)
        self._pids.append(process.pid)
        prom = telemetry_stack.Prometheus(url=self.prometheus_url, config=config, process=process)
        self.prometheus = prom

        def ready() -> bool:
            if not process.alive():
                raise harness.ClusterError(f"prometheus exited:\n{process.log_tail()}")
            return telemetry_stack.http_get(f"{prom.url}/-/ready")[0] == 200

        harness.wait_for("Prometheus ready", ready, 60)
        return prom

    def stop_prometheus(self) -> None:
        """Stop Prometheus by PID (the operator loses telemetry); :meth:`start_prometheus` restarts it."""
        if self.prometheus is not None:
            self.prometheus.stop()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """A Prometheus instant query's ``data.result``; empty when Prometheus is down or answers an error."""
        if self.prometheus is None:
            return []
        try:
            return self.prometheus.query(promql)
        except (RuntimeError, ValueError):
            return []

    def _sd_loop(self) -> None:
        last: list[dict[str, Any]] | None = None
        while not self._sd_stop.wait(1.0):
            try:
                ready = [p for p in self.pods() if p.ready]
            except Exception:  # the API server may hiccup; keep the previous targets
                continue
            labels = [{"pod": p.pod, "node": p.node, "component": p.component, "role": p.role} for p in ready]
            groups = [
                {"targets": [f"{p.ip}:{p.port}"], "labels": ls} for p, ls in zip(ready, labels, strict=True)
            ]
            if groups != last:
                self._write_sd(groups)
                last = groups

    def _write_sd(self, groups: list[dict[str, Any]]) -> None:
        self.sd_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        os.replace(tmp, self.sd_file)

    # ---- DualPathClusters --------------------------------------------------------------------------

    def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply a DualPathCluster (``body`` as in examples/) in the stack's namespace."""
        meta = {**body["metadata"], "namespace": self.namespace}
        obj = DPC.from_dict({**body, "metadata": meta})
        out: dict[str, Any] = self.client.apply(obj, field_manager="dualpath-user", force=True).to_dict()
        return out

    def get(self, name: str) -> dict[str, Any]:
        """The DualPathCluster ``name`` as a dict."""
        obj: dict[str, Any] = self.client.get(DPC, name=name, namespace=self.namespace).to_dict()  # type: ignore[no-untyped-call]
        return obj

    def delete(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.client.delete(DPC, name=name, namespace=self.namespace)

    def wait_status(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 300
    ) -> dict[str, Any]:
        """Wait until ``predicate(status)`` holds; returns that status (TimeoutError names ``what``)."""
        seen: dict[str, Any] = {}

        def check() -> bool:
            seen.clear()
            seen.update(self.get(name).get("status") or {})
            self._raise_on_dead()
            return predicate(seen)

        try:
            harness.wait_for(what, check, timeout_s, interval_s=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last status: {json.dumps(seen)[:2000]}") from exc
        return dict(seen)

    def wait_condition(
        self, name: str, kind: str, status: str = "True", timeout_s: float = 300, reason: str | None = None
    ) -> dict[str, Any]:
        """Wait until condition ``kind`` has ``status`` (and ``reason`` if given); returns the condition."""

        def holds(st: dict[str, Any]) -> bool:
            cond = condition(st, kind)
            return cond is not None and cond.get("status") == status and reason in (None, cond.get("reason"))

        return cast(
            dict[str, Any],
            condition(self.wait_status(name, holds, f"{name} {kind}={status}", timeout_s), kind),
        )

    def wait_serving(self, name: str, timeout_s: float = 300) -> str:
        """Wait until ``name`` is Ready and every engine group the status counts runs as a ready process
        here (kwok marks pods Ready before their processes are up); returns the scheduler URL."""
        url: list[str] = []

        def serving(st: dict[str, Any]) -> bool:
            cond = condition(st, "Ready")
            groups = sum(int((st.get(role) or {}).get("replicas", 0)) for role in ("prefill", "decode"))
            if cond is None or cond.get("status") != "True" or groups == 0:
                return False
            sched = self.scheduler_url(name)
            if sched is None or len(self.engine_urls(name)) != groups:
                return False
            url[:] = [sched]
            return True

        self.wait_status(name, serving, f"{name} Ready with every engine process serving", timeout_s)
        return url[0]

    def _raise_on_dead(self) -> None:
        if self.operator is not None and not self.operator.alive():
            raise harness.ClusterError(f"operator exited:\n{self.operator.log_tail(60)}")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Events about DualPathCluster ``name``, in the order they were last written (newest last)."""
        out = []
        for ev in self.client.list(Event, namespace=self.namespace):
            obj = ev.involvedObject
            if obj.kind == "DualPathCluster" and obj.name == name:
                out.append(ev.to_dict())
        return sorted(out, key=lambda e: int((e.get("metadata") or {}).get("resourceVersion") or 0))

    # ---- pods and URLs -----------------------------------------------------------------------------

    def pods(self, cluster: str | None = None) -> list[EnginePod]:
        """Engine and scheduler processes the runner runs (optionally of one DualPathCluster)."""
        if self.runner is None:
            return []
        labels: dict[str, Any] = {CLUSTER_LABEL: cluster} if cluster else {}
        by_name = {
            p.metadata.name: p
            for p in self.client.list(Pod, namespace=self.namespace, labels=labels)
            if p.metadata
        }
        out = []
        for proc in self.runner.processes():
            pod = by_name.get(proc.pod)
            if pod is None or pod.spec is None or not proc.alive:
                continue
            ports = [p.containerPort for c in pod.spec.containers for p in c.ports or [] if p.name == "http"]
            role = ((pod.metadata.labels if pod.metadata else None) or {}).get(ROLE_LABEL, "")
            if ports:
                out.append(
                    EnginePod(
                        proc.pod, proc.node, proc.ip, ports[0], proc.component, role, proc.pid, proc.ready
                    )
                )
        return sorted(out, key=lambda p: (p.component, p.node, p.pod))

    def scheduler_url(self, cluster: str) -> str | None:
        """``http://<scheduler pod IP>:<port>`` of a ready scheduler process, else None."""
        ready = [p for p in self.pods(cluster) if p.component == "scheduler" and p.ready]
        return ready[0].url if ready else None

    def engine_urls(self, cluster: str) -> dict[str, str]:
        """Pod name -> engine URL for every ready engine of ``cluster``."""
        return {p.pod: p.url for p in self.pods(cluster) if p.component == "engine" and p.ready}

    # ---- conditions on the nodes -------------------------------------------------------------------

    def set_storage_budget(self, node: str, bytes_per_s: float, device: str = STORAGE_DEVICE) -> list[str]:
        """Set the emulated storage-NIC budget of every engine on ``node`` (the engines' NIC emulation API,
        ``PUT /emulation/v1/nics/{device}``); returns the pods changed. Raises :class:`StackError` when an
        engine refuses (e.g. an engine without that API)."""
        changed = []
        for p in self.pods():
            if p.component != "engine" or p.node != node:
                continue
            status, text = _http(
                f"{p.url}/emulation/v1/nics/{device}", method="PUT", body={"budget_bytes_per_s": bytes_per_s}
            )
            if status != 200:
                raise StackError(f"{p.pod}: PUT /emulation/v1/nics/{device} answered {status}: {text[:300]}")
            changed.append(p.pod)
        return changed

    def add_background_traffic(self, node: str, bytes_per_s: float) -> BackgroundTraffic:
        """Non-KV traffic of ``bytes_per_s`` on ``node``'s storage NIC (see :class:`BackgroundTraffic`)."""
        if node in self.background:
            self.background[node].stop()
        traffic = BackgroundTraffic(self.sysfs_root(node), bytes_per_s).start()
        self.background[node] = traffic
        return traffic


def seed_sysfs(root: Path, storage_gbps: float = 400.0, compute_gbps: float = 400.0) -> None:
    """Write a node's fake sysfs NIC tree before any engine runs there (a real node has its NICs
    whether or not an engine is scheduled on it): one storage and one compute NIC, counters at 0, as a
    shard of their own that engines on the node later add theirs to. Without it node_exporter's
    infiniband collector fails on an idle node and the operator holds for incomplete telemetry."""
    metrics = nic.NicMetrics()
    nics = [
        nic.Nic(STORAGE_DEVICE, nic.NicKind.STORAGE, storage_gbps * 1e9 / 8, metrics=metrics),
        nic.Nic(COMPUTE_DEVICE, nic.NicKind.COMPUTE, compute_gbps * 1e9 / 8, metrics=metrics),
    ]
    sysfs.SysfsWriter(root, nics, writer="node-seed").flush()


def listening_loopback_bases() -> set[int]:
    """Second octets of the 127.x addresses something listens on (TCP, from /proc/net/tcp)."""
    bases = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # LISTEN
                octets = bytes.fromhex(fields[1].split(":")[0])[::-1]
                if octets[0] == 127:
                    bases.add(octets[1])
    return bases


def free_cidr_base(low: int = 100, high: int = 250) -> int:
    """A second octet for the nodes' loopback pod CIDRs (127.<base>.<node>.0/24) that nothing listens on
    yet, picked at random, so stacks (and other clusters' pods) on one machine never share pod IPs."""
    used = listening_loopback_bases()
    free = [b for b in range(low, high) if b not in used]
    if not free:
        raise StackError(f"no free loopback range 127.{low}-{high - 1}.x.x")
    return random.SystemRandom().choice(free)


def condition(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The condition of type ``kind`` in a DualPathCluster status, or None."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None
