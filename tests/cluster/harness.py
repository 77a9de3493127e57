"""Start, probe and stop a real local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, each on a free loopback port, with a throwaway PKI and a kubeconfig.

``Cluster.start()`` brings the components up in order and waits for each to be ready (every wait has
a timeout and reports the component's log tail on failure); ``Cluster.stop()`` stops exactly the
processes it started, by PID, in reverse order. The state (ports, PIDs, paths) is written to
``<run_dir>/state.json`` so that another process (``make cluster-down``) can stop a cluster that
``make cluster-up`` started.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.cluster import pki as pki_mod
from tests.cluster import processes

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN_DIR = REPO_ROOT / ".dev" / "bin"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
#: Annotation that tells our kwok to play kubelet for a node (kwok --manage-nodes-with-annotation-selector).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


class ClusterError(RuntimeError):
    """A component failed to start or become ready; the message carries its log tail."""


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> None:
    """Poll ``predicate`` until it is true; raise ``TimeoutError`` naming ``what`` after ``timeout_s``.

    Any exception from ``predicate`` means "not yet", except :class:`ClusterError` (a component died),
    which is raised at once.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except ClusterError:
            raise
        except Exception as e:
            last_error = e
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what} (last error: {last_error!r})")


@dataclass
class Ports:
    etcd: int = 0
    etcd_peer: int = 0
    apiserver: int = 0
    controller_manager: int = 0
    scheduler: int = 0
    kwok: int = 0

    @classmethod
    def pick(cls) -> Ports:
        return cls(*(processes.free_port() for _ in range(6)))


@dataclass
class Cluster:
    """One local control plane. ``run_dir`` holds PKI, data, logs, kubeconfig and state.json."""

    run_dir: Path
    bin_dir: Path = DEFAULT_BIN_DIR
    ports: Ports = field(default_factory=Ports.pick)
    procs: list[processes.Managed] = field(default_factory=list)
    api_qps: int = 200

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def pki(self) -> pki_mod.Pki:
        return pki_mod.Pki(self.run_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise ClusterError(f"{path} is missing or not executable: run `make setup` first")
        return str(path)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout_s: float = 240.0) -> Cluster:
        """Start every component in order and wait until the cluster accepts pods."""
        for name in COMPONENTS:
            self.binary(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            pki_mod.make_pki(self.pki.dir)
            self._start_etcd(timeout_s)
            self._start_apiserver(timeout_s)
            self.write_kubeconfig(self.kubeconfig, *self.pki.client_pair("admin"), user="dualpath-admin")
            self._start_controller_manager(timeout_s)
            self._start_scheduler(timeout_s)
            self._start_kwok(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self.save_state()
        return self

    def stop(self) -> None:
        """Stop the processes this cluster started, newest first, by PID; verify they are gone."""
        for proc in reversed(self.procs):
            proc.stop()
        still = [p.name for p in self.procs if p.alive()]
        if still:
            raise ClusterError(f"processes still alive after stop: {still}")

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.procs}

    def save_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports.__dict__,
            "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log)} for p in self.procs],
            "bin_dir": str(self.bin_dir),
        }
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, run_dir: Path) -> Cluster:
        """Re-attach to a cluster started by another process (``make cluster-up``)."""
        state = json.loads((run_dir / "state.json").read_text())
        c = cls(run_dir=run_dir, bin_dir=Path(state["bin_dir"]), ports=Ports(**state["ports"]))
        for p in state["processes"]:
            if _is_our_process(p["pid"], Path(state["bin_dir"])):
                c.procs.append(processes.Managed(name=p["name"], pid=p["pid"], log=Path(p["log"])))
        return c

    # ---- components --------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> processes.Managed:
        proc = processes.start(name, argv, self.logs)
        self.procs.append(proc)
        return proc

    def _wait(
        self, proc: processes.Managed, what: str, predicate: Callable[[], bool], timeout_s: float
    ) -> None:
        def alive_and_ready() -> bool:
            if not proc.alive():
                raise ClusterError(f"{proc.name} exited during start-up; log tail:\n{proc.log_tail()}")
            return predicate()

        try:
            wait_for(what, alive_and_ready, timeout_s)
        except ClusterError:
            raise
        except TimeoutError as e:
            raise ClusterError(f"{e}\n--- {proc.name} log tail ---\n{proc.log_tail()}") from e

    def _start_etcd(self, timeout_s: float) -> None:
        p = self.ports
        proc = self._spawn(
            "etcd",
            [
                self.binary("etcd"),
                "--name=dp0",
                f"--data-dir={self.run_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p.etcd}",
                f"--advertise-client-urls=http://127.0.0.1:{p.etcd}",
                f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-cluster=dp0=http://127.0.0.1:{p.etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(
            proc,
            "etcd /health",
            lambda: b'"health":"true"' in http_get(f"http://127.0.0.1:{p.etcd}/health"),
            timeout_s,
        )

    def _start_apiserver(self, timeout_s: float) -> None:
        k = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports.apiserver}",
                f"--tls-cert-file={k.apiserver_crt}",
                f"--tls-private-key-file={k.apiserver_key}",
                f"--client-ca-file={k.ca_crt}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={k.sa_key}",
                f"--service-account-signing-key-file={k.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # Endpoints validation rejects the loopback address the reconciler would write.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                # A local, single-tenant control plane: flow control only costs CPU here.
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=1000",
                "--max-mutating-requests-inflight=500",
            ],
        )
        ctx = self.ssl_context()
        self._wait(
            proc,
            "kube-apiserver /readyz",
            lambda: http_get(f"{self.server}/readyz", ctx) == b"ok",
            timeout_s,
        )

    def _component_kubeconfig(self) -> str:
        return str(self.kubeconfig)

    def _start_controller_manager(self, timeout_s: float) -> None:
        port = self.ports.controller_manager
        proc = self._spawn(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={self._component_kubeconfig()}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                f"--root-ca-file={self.pki.ca_crt}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                "--use-service-account-credentials=false",
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                "--node-monitor-period=5s",
                "--node-monitor-grace-period=40s",
                f"--kube-api-qps={self.api_qps}",
                f"--kube-api-burst={self.api_qps * 2}",
            ],
        )
        insecure = _insecure_context()
        self._wait(
            proc,
            "kube-controller-manager /healthz",
            lambda: http_get(f"https://127.0.0.1:{port}/healthz", insecure) == b"ok",
            timeout_s,
        )
        self._wait(
            proc,
            "ServiceAccount default/default",
            lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout_s,
        )

    def _start_scheduler(self, timeout_s: float) -> None:
        port = self.ports.scheduler
        proc = self._spawn(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--kubeconfig={self._component_kubeconfig()}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                f"--kube-api-qps={self.api_qps}",
                f"--kube-api-burst={self.api_qps * 2}",
            ],
        )
        insecure = _insecure_context()
        self._wait(
            proc,
            "kube-scheduler /readyz",
            lambda: http_get(f"https://127.0.0.1:{port}/readyz", insecure) == b"ok",
            timeout_s,
        )

    def _start_kwok(self, timeout_s: float) -> None:
        port = self.ports.kwok
        proc = self._spawn(
            "kwok",
            [
                self.binary("kwok"),
                f"--kubeconfig={self._component_kubeconfig()}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                # Fallback only: every fake node brings its own loopback spec.podCIDR.
                "--cidr=127.254.0.0/16",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{port}",
                f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            ],
        )
        self._wait(
            proc, "kwok /healthz", lambda: http_get(f"http://127.0.0.1:{port}/healthz") == b"ok", timeout_s
        )

    # ---- clients -----------------------------------------------------------------------------------
    def ssl_context(self, client: str = "admin") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        crt, key = self.pki.client_pair(client)
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    def _exists(self, path: str) -> bool:
        try:
            http_get(f"{self.server}{path}", self.ssl_context())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise
        return True

    def write_kubeconfig(self, path: Path, crt: Path, key: Path, *, user: str) -> Path:
        """Write a kubeconfig for the client certificate (crt, key) with embedded data."""

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dualpath-local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.pki.ca_crt)},
                }
            ],
            "users": [
                {"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}
            ],
            "contexts": [{"name": "dualpath-local", "context": {"cluster": "dualpath-local", "user": user}}],
            "current-context": "dualpath-local",
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path

    def token_kubeconfig(self, path: Path, token: str, *, user: str) -> Path:
        """Write a kubeconfig authenticating with a bearer token (e.g. a ServiceAccount's)."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dualpath-local",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(self.pki.ca_crt.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "dualpath-local", "context": {"cluster": "dualpath-local", "user": user}}],
            "current-context": "dualpath-local",
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path


def http_get(url: str, ctx: ssl.SSLContext | None = None, timeout_s: float = 5.0) -> bytes:
    """GET ``url`` (a loopback URL the harness built) and return the stripped body."""
    with urllib.request.urlopen(url, context=ctx, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body.strip()


def _insecure_context() -> ssl.SSLContext:
    # Only for probing the health endpoints of our own loopback components, which serve self-signed
    # in-memory certificates.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _is_our_process(pid: int, bin_dir: Path) -> bool:
    """True if ``pid`` is alive and runs one of our binaries (guards against PID reuse)."""
    if not processes.pid_alive(pid):
        return False
    try:
        exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return Path(exe).parent == bin_dir
