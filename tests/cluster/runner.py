"""The local pod runner: real processes for the operator's pods on the local (kwok) cluster.

Test and demo infrastructure, not product. kwok plays kubelet for fake nodes but runs nothing; the
:class:`PodRunner` does the rest for every scheduled pod labelled
``app.kubernetes.io/managed-by=dualpath-operator`` (engine pods and the scheduler Deployment's pods):

- starts each container's ``command + args`` as a local process (``python`` -> this interpreter) in its
  own session, with the pod's environment (plain values, downward API, Secret/ConfigMap keys; never
  the runner's own environment beyond ``PATH``/``PYTHONPATH``), bound to the pod IP (127.x, from the
  node's loopback podCIDR) through ``DUALPATH_HOST=status.podIP``;
- materialises volumes under ``<work>/pods/<ns>/<pod>-<uid>/volumes``: ConfigMap and Secret keys as
  files, emptyDir as a directory; hostPath, PVC and other sources map to directories under
  ``<work>/shared`` common to all pods, like a shared filesystem (3FS/NFS) mounted on every node;
- rewrites container mount paths (longest match) to those directories in args, env values and the
  string values of every YAML/JSON file of a ConfigMap volume, and Service DNS URLs
  (``http://<svc>.<ns>.svc:<port>``) to ``http://<ready backing pod IP>:<target port>`` (locally there
  is no DNS, no kube-proxy and Services have no endpoints); a pod waits until every Service named
  by its command line, env or the config file its command line points at has a ready backend (a
  backend the runner runs counts as ready once its probe passed), and is restarted when that
  backend's address changes (in a real cluster the Service address stays put);
- for engine pods, turns on NIC emulation with a fake sysfs tree per node (``<work>/nodes/<node>/sys``,
  shared by the engines on that node; :meth:`PodRunner.sysfs_roots` for node_exporter);
- reflects process state into the pod status (kwok would keep every pod Ready): Ready=False while a
  pod waits or starts, Ready=True once the container's readinessProbe passes, Ready=False with a
  terminated container status when the process exits (it is not restarted: the operator sees it);
- stops the processes (process group, SIGTERM then SIGKILL, by PID) when the pod is deleted,
  terminating or replaced (new UID); :meth:`PodRunner.stop_all` stops everything it started.

Logs: ``<pod dir>/<container>.log`` per process and ``<work>/runner.log`` for the runner's decisions.
Not supported (reported in :meth:`PodRunner.waiting`, never half-run): init containers, containers
without ``command``, exec probes, projected/downwardAPI volumes.
Used by ``tests/cluster/test_runner.py``, the e2e suite and the demo.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service

from tests.cluster import processes as child_processes
from tests.cluster import resolve

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "dualpath-operator"
COMPONENT = "dualpath.io/component"
ENGINE = "engine"
PYTHON_NAMES = frozenset({"python", "python3"})
CONFIG_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
#: Data volumes the runner cannot materialise (anything else that is not a ConfigMap, Secret or
#: emptyDir is treated as shared storage).
UNSUPPORTED_VOLUMES = frozenset({"projected", "downwardAPI", "ephemeral", "image"})


@dataclass(frozen=True)
class PodProcess:
    """A snapshot of one container process the runner started."""

    namespace: str
    pod: str
    uid: str
    container: str
    component: str
    node: str
    ip: str
    pid: int
    log: Path
    pod_dir: Path
    alive: bool
    ready: bool
    exit_code: int | None


@dataclass
class _Launch:
    """Everything prepared for one pod before its processes start."""

    argv: dict[str, list[str]]
    env: dict[str, dict[str, str]]
    probes: dict[str, resolve.Probe | None]
    services: dict[resolve.ServiceRef, str]


@dataclass
class _Running:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    component: str
    pod_dir: Path
    grace_s: float
    procs: dict[str, child_processes.Managed] = field(default_factory=dict)
    probes: dict[str, resolve.Probe | None] = field(default_factory=dict)
    services: dict[resolve.ServiceRef, str] = field(default_factory=dict)
    started_at: str = ""
    ready: bool = False
    exited: bool = False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRunner:
    """Watches the operator's pods (a polling thread) and runs their real processes locally."""

    def __init__(
        self,
        kubeconfig: Path,
        work_dir: Path,
        *,
        namespace: str | None = None,
        interval_s: float = 0.5,
        python: str = sys.executable,
        selector: Mapping[str, str] | None = None,
        reflect_status: bool = True,
        emulate_nics: bool = True,
        stop_grace_s: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.client = Client(KubeConfig.from_file(str(kubeconfig)), field_manager="dualpath-pod-runner")
        self.work_dir = work_dir
        self.namespace = namespace
        self.interval_s = interval_s
        self.python = python
        self.selector: dict[str, Any] = dict(selector or {MANAGED_BY: OPERATOR_NAME})
        self.reflect_status = reflect_status
        self.emulate_nics = emulate_nics
        self.stop_grace_s = stop_grace_s
        self.extra_env = dict(extra_env or {})
        self._lock = threading.RLock()
        self._running: dict[str, _Running] = {}
        self._stopping: dict[str, tuple[str, threading.Thread]] = {}
        self._waiting: dict[str, str] = {}
        self._sysfs: dict[str, Path] = {}
        self._addresses: dict[resolve.ServiceRef, str | None] = {}
        self._finished: list[child_processes.Managed] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop_errors: list[str] = []
        work_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = work_dir / "runner.log"

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> PodRunner:
        """Start the watch thread (one :meth:`sync_once` every ``interval_s``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        """Stop the watch thread and every process the runner started; returns when all are gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            for uid in list(self._running):
                self._retire(uid, "runner stopped")
            stopping = [t for _, t in self._stopping.values()]
        for t in stopping:
            t.join()
        with self._lock:
            self._stopping.clear()
            leftovers = [p for p in self._finished if p.alive()]
        for proc in leftovers:
            proc.stop(grace_s=0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # the API server may hiccup; keep watching
                self._note(f"sync failed: {exc!r}")
                self.loop_errors = [*self.loop_errors[-19:], repr(exc)]
            self._stop.wait(self.interval_s)

    # ---- queries -----------------------------------------------------------------------------------

    def processes(self) -> list[PodProcess]:
        """Every process of a pod the runner currently runs (dead ones too, until the pod goes)."""
        with self._lock:
            return [
                PodProcess(
                    run.namespace,
                    run.name,
                    run.uid,
                    container,
                    run.component,
                    run.node,
                    run.ip,
                    proc.pid,
                    proc.log,
                    run.pod_dir,
                    proc.alive(),
                    run.ready,
                    proc.popen.poll() if proc.popen is not None else None,
                )
                for run in self._running.values()
                for container, proc in run.procs.items()
            ]

    def started_pids(self) -> list[int]:
        """PIDs of every process the runner ever started (for no-process-left-behind checks)."""
        with self._lock:
            return [p.pid for p in self._finished] + [
                p.pid for run in self._running.values() for p in run.procs.values()
            ]

    def sysfs_roots(self) -> dict[str, Path]:
        """Node name -> fake sysfs root (``--path.sysfs`` of that node's node_exporter)."""
        with self._lock:
            return dict(self._sysfs)

    def waiting(self) -> dict[str, str]:
        """``ns/pod`` -> why the pod has not been started (missing dependency or unsupported field)."""
        with self._lock:
            return {k.split("|", 1)[0]: v for k, v in self._waiting.items()}

    def log_tail(self, namespace: str, pod: str, lines: int = 40) -> str:
        """The log tails of the pod's processes, for failure messages."""
        with self._lock:
            runs = [r for r in self._running.values() if (r.namespace, r.name) == (namespace, pod)]
            return "\n".join(f"--- {c}\n{p.log_tail(lines)}" for r in runs for c, p in r.procs.items())

    # ---- one pass ----------------------------------------------------------------------------------

    def sync_once(self) -> None:
        """Bring local processes in line with the pods: stop the gone, start the new, reflect status."""
        namespace = self.namespace if self.namespace is not None else "*"
        pods = [p.to_dict() for p in self.client.list(Pod, namespace=namespace, labels=dict(self.selector))]
        desired: dict[str, dict[str, Any]] = {}
        for pod in pods:
            meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
            if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
                continue
            if spec.get("nodeName") and status.get("podIP"):
                desired[meta["uid"]] = pod
        with self._lock:
            self._addresses.clear()
            self._reap_stopping()
            for uid in list(self._running):
                if uid not in desired:
                    self._retire(uid, "pod deleted, terminating or replaced")
            self._waiting = {k: v for k, v in self._waiting.items() if k.split("|", 1)[1] in desired}
            for uid, pod in desired.items():
                if uid in self._running:
                    self._check(self._running[uid], pod)
                else:
                    self._launch(pod)

    def _reap_stopping(self) -> None:
        for uid, (_, thread) in list(self._stopping.items()):
            if not thread.is_alive():
                del self._stopping[uid]

    # ---- start ---------------------------------------------------------------------------------------

    def _launch(self, pod: dict[str, Any]) -> None:
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        key = f"{meta['namespace']}/{meta['name']}|{meta['uid']}"
        ip = status["podIP"]
        if any(stop_ip == ip for stop_ip, _ in self._stopping.values()):
            return  # the previous process on this IP is still shutting down
        pod_dir = self.work_dir / "pods" / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        try:
            launch = self._prepare(pod, pod_dir)
        except (resolve.NotYetError, resolve.PodError) as exc:
            if self._waiting.get(key) != str(exc):
                self._note(f"{key}: not started: {exc}")
                self._waiting[key] = str(exc)
                self._patch_status(meta, spec, ready=False, reason="LocalRunnerWaiting", message=str(exc))
            return
        self._waiting.pop(key, None)
        run = _Running(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            node=spec["nodeName"],
            ip=ip,
            component=(meta.get("labels") or {}).get(COMPONENT, ""),
            pod_dir=pod_dir,
            grace_s=min(self.stop_grace_s, float(spec.get("terminationGracePeriodSeconds", 30))),
            probes=launch.probes,
            services=launch.services,
            started_at=_now(),
        )
        for name, argv in launch.argv.items():
            run.procs[name] = self._spawn(name, argv, launch.env[name], pod_dir)
            self._note(f"{key}: started {name} pid {run.procs[name].pid}: {' '.join(argv)}")
        self._running[run.uid] = run
        if any(p is not None for p in run.probes.values()):
            self._patch_status(meta, spec, ready=False, reason="ProcessStarting", message="probing", run=run)
        else:
            self._check(run, pod)

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], pod_dir: Path
    ) -> child_processes.Managed:
        log = pod_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=pod_dir,
                start_new_session=True,
            )
        return child_processes.Managed(name=name, pid=popen.pid, log=log, popen=popen)

    def _prepare(self, pod: dict[str, Any], pod_dir: Path) -> _Launch:
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("initContainers"):
            raise resolve.PodError("init containers are not supported by the local runner")
        containers = spec.get("containers") or []
        for c in containers:
            if not c.get("command"):
                raise resolve.PodError(
                    f"container {c['name']}: no command (image entrypoints are unknown locally)"
                )
        (pod_dir / "home").mkdir(parents=True, exist_ok=True)
        volumes = self._volumes(pod, pod_dir)
        mount_map = resolve.MountMap.of_containers(containers, volumes)
        envs = {c["name"]: resolve.container_env(pod, c, self._configmap, self._secret) for c in containers}
        raw_argv = {
            c["name"]: [resolve.expand(a, envs[c["name"]]) for a in [*c["command"], *(c.get("args") or [])]]
            for c in containers
        }
        documents = self._config_documents(pod, volumes)
        plain = [
            *(a for argv in raw_argv.values() for a in argv),
            *(v for e in envs.values() for v in e.values()),
        ]
        services, watched = self._resolve_services(plain, documents, mount_map)

        def rewrite(text: str) -> str:
            return resolve.rewrite_services(mount_map.rewrite(text), services)

        for path, doc in documents.items():
            new = resolve.map_strings(doc, rewrite)
            text = (
                json.dumps(new, indent=2) if path.suffix == ".json" else yaml.safe_dump(new, sort_keys=False)
            )
            path.write_text(text)
        argv = {name: [rewrite(a) for a in args] for name, args in raw_argv.items()}
        for args in argv.values():
            if args[0] in PYTHON_NAMES:
                args[0] = self.python
        base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in os.environ}
        base.update({"HOME": str(pod_dir / "home"), "PYTHONUNBUFFERED": "1", **self.extra_env})
        env = {name: {**base, **{k: rewrite(v) for k, v in e.items()}} for name, e in envs.items()}
        if self.emulate_nics and (meta.get("labels") or {}).get(COMPONENT) == ENGINE:
            for args in argv.values():
                self._emulate_nics(args, spec["nodeName"], pod_dir)
        probes = {c["name"]: resolve.probe_target(c, pod["status"]["podIP"]) for c in containers}
        return _Launch(argv=argv, env=env, probes=probes, services=watched)

    def _resolve_services(
        self, plain: list[str], documents: dict[Path, Any], mount_map: resolve.MountMap
    ) -> tuple[dict[resolve.ServiceRef, str], dict[resolve.ServiceRef, str]]:
        """(every Service address to rewrite, the required ones a restart watches).

        Services named by the command line, the env or a config file they point at must have a ready
        backend before the pod starts; other files of the volume (e.g. the engine's config in the
        scheduler pod) are rewritten where a backend is known and left alone otherwise.
        """
        named = {mount_map.rewrite(text) for text in plain}
        required: set[resolve.ServiceRef] = set()
        optional: set[resolve.ServiceRef] = set()
        for text in plain:
            required |= resolve.service_refs(text)
        for path, doc in documents.items():
            (required if str(path) in named else optional).update(resolve.service_refs(json.dumps(doc)))
        watched = {ref: self._service_address(ref, required=True) or "" for ref in sorted(required, key=str)}
        services = dict(watched)
        for ref in sorted(optional - required, key=str):
            address = self._service_address(ref, required=False)
            if address is not None:
                services[ref] = address
        return services, watched

    def _volumes(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        ns = pod["metadata"]["namespace"]
        out: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            kind, source = resolve.volume_source(vol)
            local = pod_dir / "volumes" / name
            if kind == "configMap":
                self._write_keys(local, ns, source, source.get("name", ""), self._configmap_bytes)
            elif kind == "secret":
                self._write_keys(local, ns, source, source.get("secretName", ""), self._secret_bytes)
            elif kind == "emptyDir":
                local.mkdir(parents=True, exist_ok=True)
            elif kind in UNSUPPORTED_VOLUMES:
                raise resolve.PodError(f"volume {name}: {kind} volumes are not supported by the local runner")
            else:
                local = self.work_dir / "shared" / resolve.shared_volume_path(kind, source, ns)
                local.mkdir(parents=True, exist_ok=True)
            out[name] = local
        return out

    def _write_keys(
        self,
        target: Path,
        ns: str,
        source: Mapping[str, Any],
        name: str,
        lookup: Callable[[str, str], dict[str, bytes] | None],
    ) -> None:
        data = lookup(ns, name)
        if data is None:
            if source.get("optional", False):
                target.mkdir(parents=True, exist_ok=True)
                return
            raise resolve.NotYetError(f"volume source {ns}/{name} does not exist yet")
        items = source.get("items")
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        target.mkdir(parents=True, exist_ok=True)
        for key, rel in pairs:
            if key not in data:
                raise resolve.NotYetError(f"{ns}/{name} has no key {key!r} yet")
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])

    def _config_documents(self, pod: dict[str, Any], volumes: dict[str, Path]) -> dict[Path, Any]:
        """Parsed YAML/JSON files of the pod's ConfigMap volumes (where paths and URLs get rewritten)."""
        docs: dict[Path, Any] = {}
        for vol in pod["spec"].get("volumes") or []:
            if vol.get("configMap") is None or not volumes[vol["name"]].is_dir():
                continue
            for path in sorted(volumes[vol["name"]].rglob("*")):
                if path.is_file() and path.suffix in CONFIG_SUFFIXES:
                    text = path.read_text()
                    try:
                        docs[path] = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
                    except (json.JSONDecodeError, yaml.YAMLError):
                        continue  # not a config document: leave the file as it is
        return docs

    def _emulate_nics(self, argv: list[str], node: str, pod_dir: Path) -> None:
        """Point the engine config (``--config``) at this node's fake sysfs tree, emulation on."""
        config = resolve.config_arg(argv)
        if config is None:
            return
        path = Path(config)
        if not path.resolve().is_relative_to(pod_dir.resolve()):
            raise resolve.PodError(
                f"engine config {config} is not a per-pod file; will not edit shared files"
            )
        root = self.work_dir / "nodes" / node / "sys"
        root.mkdir(parents=True, exist_ok=True)
        self._sysfs[node] = root
        doc = resolve.with_nic_emulation(yaml.safe_load(path.read_text()), root)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    # ---- API lookups ---------------------------------------------------------------------------------

    def _get(self, res: Any, ns: str, name: str) -> Any | None:
        try:
            return self.client.get(res, name=name, namespace=ns)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def _data(self, kind: type[ConfigMap] | type[Secret], ns: str, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's data + binaryData or a Secret's decoded data; ``None`` when it does not exist."""
        obj = self._get(kind, ns, name)
        if obj is None:
            return None
        if isinstance(obj, ConfigMap):
            out = {k: v.encode() for k, v in (obj.data or {}).items()}
            return out | {k: base64.b64decode(v) for k, v in (obj.binaryData or {}).items()}
        return {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}

    def _configmap_bytes(self, ns: str, name: str) -> dict[str, bytes] | None:
        return self._data(ConfigMap, ns, name)

    def _secret_bytes(self, ns: str, name: str) -> dict[str, bytes] | None:
        return self._data(Secret, ns, name)

    def _configmap(self, ns: str, name: str) -> dict[str, str] | None:
        data = self._data(ConfigMap, ns, name)
        return None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}

    def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        data = self._data(Secret, ns, name)
        return None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}

    def _service_address(self, ref: resolve.ServiceRef, *, required: bool) -> str | None:
        """``ip:port`` behind a Service port, looked up once per pass (``None`` = no ready backend)."""
        if ref in self._addresses:
            address = self._addresses[ref]
        else:
            address = None
            svc = self._get(Service, ref.namespace, ref.name)
            selector = ((svc.spec.selector if svc.spec else None) or {}) if svc is not None else {}
            if svc is not None and selector:
                listed = self.client.list(Pod, namespace=ref.namespace, labels=dict(selector))
                backends = [self._as_known(p.to_dict()) for p in listed]
                address = resolve.backend_address(svc.to_dict(), ref.port, backends)
            self._addresses[ref] = address
        if address is None and required:
            raise resolve.NotYetError(
                f"Service {ref.namespace}/{ref.name}:{ref.port} has no ready backend yet"
            )
        return address

    def _as_known(self, pod: dict[str, Any]) -> dict[str, Any]:
        """``pod`` with Ready as the runner knows it when the runner runs it (kwok marks pods Ready at
        once; a backend is only ready once its process passed its probe)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        ours = all(labels.get(k) == v for k, v in self.selector.items()) and (
            self.namespace is None or meta.get("namespace") == self.namespace
        )
        if not ours:
            return pod
        run = self._running.get(str(meta.get("uid")))
        ready = run is not None and run.ready and not run.exited
        status = dict(pod.get("status") or {})
        others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
        status["conditions"] = [*others, {"type": "Ready", "status": "True" if ready else "False"}]
        return {**pod, "status": status}

    # ---- running pods --------------------------------------------------------------------------------

    def _check(self, run: _Running, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        dead = {c: p for c, p in run.procs.items() if not p.alive()}
        if dead:
            if not run.exited:
                run.exited = True
                run.ready = False
                codes = {c: p.popen.poll() if p.popen is not None else None for c, p in dead.items()}
                self._note(f"{run.namespace}/{run.name}: process exited {codes}")
                message = f"local process exited: {codes}"
                self._patch_status(meta, spec, ready=False, reason="ProcessExited", message=message, run=run)
            return
        for ref, address in run.services.items():
            now = self._service_address(ref, required=False)
            if now is not None and now != address:
                self._note(f"{run.namespace}/{run.name}: {ref.name} moved {address} -> {now}; restarting")
                self._retire(run.uid, "service backend moved")
                return
        if not run.ready and all(self._probe_ok(p) for p in run.probes.values()):
            run.ready = True
            self._note(f"{run.namespace}/{run.name}: ready")
            self._patch_status(meta, spec, ready=True, reason="ProcessReady", message="probe passed", run=run)

    @staticmethod
    def _probe_ok(probe: resolve.Probe | None) -> bool:
        if probe is None:
            return True
        kind, host, port, path = probe
        if kind == "tcp":
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=1.0) as resp:
                return 200 <= int(resp.status) < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _retire(self, uid: str, why: str) -> None:
        run = self._running.pop(uid)
        self._note(f"{run.namespace}/{run.name} ({uid[:8]}): stopping ({why})")
        procs = list(run.procs.values())
        self._finished.extend(procs)

        def stop() -> None:
            threads = [threading.Thread(target=p.stop, args=(run.grace_s,)) for p in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        thread = threading.Thread(target=stop, name=f"stop-{run.name}", daemon=True)
        thread.start()
        self._stopping[uid] = (run.ip, thread)

    def _patch_status(
        self,
        meta: dict[str, Any],
        spec: dict[str, Any],
        *,
        ready: bool,
        reason: str,
        message: str,
        run: _Running | None = None,
    ) -> None:
        """Set Ready/ContainersReady (and container states) on the pod's status subresource."""
        if not self.reflect_status:
            return
        states = {}
        for name, proc in run.procs.items() if run is not None else ():
            code = proc.popen.poll() if proc.popen is not None else None
            states[name] = resolve.ContainerState(run.started_at if run else None, code, proc.alive())
        containers = spec.get("containers") or []
        body = resolve.status_patch(
            containers, states, ready=ready, reason=reason, message=message, now=_now()
        )
        try:
            self.client.patch(Pod.Status, meta["name"], body, namespace=meta["namespace"])
        except ApiError as exc:
            if exc.status.code != 404:
                self._note(f"{meta['namespace']}/{meta['name']}: status patch failed: {exc}")

    def _note(self, line: str) -> None:
        with contextlib.suppress(OSError), open(self._log_file, "a") as f:
            f.write(f"{_now()} {line}\n")
