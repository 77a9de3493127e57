"""The local pod runner (tests/cluster/runner.py): pure resolution rules, then real processes for a
1P1D DualPathCluster that the real operator creates on the local control plane.

The cluster test (marker ``integration``) runs the operator as a subprocess, applies a small Fixed
cluster on two fake nodes of its own, and checks that the scheduler and both engines run as real
processes on their pod IPs, that the engines registered with the scheduler, that a completion through
the scheduler's OpenAI API at the scheduler pod's IP succeeds, that a dead process turns its pod
NotReady, and that deleting the DualPathCluster stops every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lightkube import Client
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Node, Pod

from tests.cluster import harness, nodes, processes, resolve, runner
from tests.integration import conftest as itc

# ---- pure rules -------------------------------------------------------------------------------------

POD: dict[str, Any] = {
    "metadata": {
        "name": "c-engine-3",
        "namespace": "ns1",
        "uid": "u-1",
        "labels": {"dualpath.io/role": "decode"},
    },
    "spec": {"nodeName": "gpu-7"},
    "status": {"podIP": "127.10.4.2", "hostIP": "127.0.0.1"},
}


def _lookup(store: dict[str, dict[str, str]]) -> resolve.Lookup:
    return lambda ns, name: store.get(f"{ns}/{name}")


@pytest.mark.timeout(10)
def test_container_env_resolves_downward_api_secrets_configmaps_and_expansion() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "base"}, "prefix": "CM_"}],
        "env": [
            {
                "name": "DUALPATH_ROLE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['dualpath.io/role']"}},
            },
            {"name": "DUALPATH_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "DUALPATH_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "base", "key": "level"}}},
            {"name": "URL", "value": "http://$(DUALPATH_HOST):8000/$$(x)/$(MISSING)"},
        ],
    }
    env = resolve.container_env(
        POD, container, _lookup({"ns1/base": {"level": "debug"}}), _lookup({"ns1/s": {"token": "t0k"}})
    )
    assert env == {
        "CM_level": "debug",
        "DUALPATH_ROLE": "decode",
        "DUALPATH_NODE_NAME": "gpu-7",
        "DUALPATH_HOST": "127.10.4.2",
        "POD": "c-engine-3",
        "KEY": "t0k",
        "LEVEL": "debug",
        "URL": "http://127.10.4.2:8000/$(x)/$(MISSING)",
    }
    missing = {"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]}
    with pytest.raises(resolve.NotYetError, match="later"):
        resolve.container_env(POD, missing, _lookup({}), _lookup({}))
    odd = {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.priority"}}}]}
    with pytest.raises(resolve.PodError, match=r"spec\.priority"):
        resolve.container_env(POD, odd, _lookup({}), _lookup({}))


@pytest.mark.timeout(10)
def test_mount_map_rewrites_longest_mount_and_flag_values(tmp_path: Path) -> None:
    mounts = resolve.MountMap({"/etc/dualpath": tmp_path / "cfg", "/etc/dualpath/admin": tmp_path / "tok"})
    assert mounts.rewrite("/etc/dualpath/engine.yaml") == str(tmp_path / "cfg" / "engine.yaml")
    assert mounts.rewrite("/etc/dualpath/admin/token") == str(tmp_path / "tok" / "token")
    assert mounts.rewrite("--config=/etc/dualpath/x.yaml") == f"--config={tmp_path / 'cfg' / 'x.yaml'}"
    assert mounts.rewrite("/etc/dualpathology") == "/etc/dualpathology"
    assert mounts.rewrite("relative/etc/dualpath") == "relative/etc/dualpath"
    doc = {"kv": {"storage_path": "/etc/dualpath/admin"}, "n": 3, "l": ["/etc/dualpath"]}
    assert resolve.map_strings(doc, mounts.rewrite) == {
        "kv": {"storage_path": str(tmp_path / "tok")},
        "n": 3,
        "l": [str(tmp_path / "cfg")],
    }


@pytest.mark.timeout(10)
def test_service_urls_map_to_a_ready_backend_pod() -> None:
    text = "scheduler_url: http://demo-scheduler.ns1.svc:8000 and https://x.y.svc.cluster.local/"
    refs = resolve.service_refs(text)
    sched = resolve.ServiceRef("ns1", "demo-scheduler", 8000, "http")
    assert refs == {sched, resolve.ServiceRef("y", "x", 443, "https")}
    service = {"spec": {"selector": {"app": "s"}, "ports": [{"port": 8000, "targetPort": "http"}]}}

    def pod(name: str, ip: str, ready: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "labels": labels or {"app": "s"}},
            "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 9001}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }

    backends = [
        pod("b", "127.0.0.9", "False"),
        pod("c", "127.0.0.7", "True"),
        pod("a", "127.0.0.8", "True", {"app": "other"}),
    ]
    assert resolve.backend_address(service, 8000, backends) == "127.0.0.7:9001"
    assert resolve.backend_address(service, 8001, backends) is None
    assert resolve.backend_address(service, 8000, backends[:1]) is None
    out = resolve.rewrite_services(text, {sched: "127.0.0.7:9001"})
    assert out == "scheduler_url: http://127.0.0.7:9001 and https://x.y.svc.cluster.local/"


@pytest.mark.timeout(10)
def test_pod_spec_pieces_probes_volumes_config_and_status() -> None:
    container = {
        "name": "engine",
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
    }
    assert resolve.probe_target(container, "127.10.0.4") == ("http", "127.10.0.4", 8000, "/healthz")
    assert resolve.probe_target({**container, "readinessProbe": {"tcpSocket": {"port": 81}}}, "h") == (
        "tcp", "h", 81, "",
    )  # fmt: skip
    with pytest.raises(resolve.PodError, match="only httpGet"):
        resolve.probe_target({**container, "readinessProbe": {"exec": {"command": ["true"]}}}, "h")
    with pytest.raises(resolve.PodError, match="named container port"):
        resolve.probe_target({**container, "readinessProbe": {"httpGet": {"port": "metrics"}}}, "h")

    host = resolve.volume_source({"name": "kv", "hostPath": {"path": "/var/lib/kv/", "type": "Directory"}})
    assert resolve.shared_volume_path(*host, "ns1") == Path("hostPath/var/lib/kv")
    pvc = resolve.volume_source({"name": "kv", "persistentVolumeClaim": {"claimName": "store"}})
    assert resolve.shared_volume_path(*pvc, "ns1") == Path("pvc/ns1/store")
    nfs = resolve.volume_source({"name": "kv", "nfs": {"server": "s", "path": "/x"}})
    assert resolve.shared_volume_path(*nfs, "a") == resolve.shared_volume_path(*nfs, "b")  # shared storage
    assert resolve.volume_source({"name": "tmp"}) == ("emptyDir", {})

    assert resolve.config_arg(["python", "-m", "x", "--config", "/a.yaml"]) == "/a.yaml"
    assert resolve.config_arg(["x", "--config=/b.yaml"]) == "/b.yaml"
    assert resolve.config_arg(["x", "--config"]) is None
    doc = resolve.with_nic_emulation(
        {"network": {"storage_nic": {"device": "s0"}}, "port": 1}, Path("/r/sys")
    )
    assert doc == {
        "network": {"storage_nic": {"device": "s0"}, "emulate": True, "sysfs_root": "/r/sys"},
        "port": 1,
    }

    containers = [{"name": "engine", "image": "img"}, {"name": "side", "image": "img2"}]
    states = {"engine": resolve.ContainerState("t0", exit_code=3, running=False)}
    body = resolve.status_patch(
        containers, states, ready=False, reason="ProcessExited", message="m", now="t1"
    )
    conds = {c["type"]: c["status"] for c in body["status"]["conditions"]}
    assert conds == {"Ready": "False", "ContainersReady": "False"}
    engine, side = body["status"]["containerStatuses"]
    assert engine["state"] == {
        "terminated": {"exitCode": 3, "reason": "Error", "startedAt": "t0", "finishedAt": "t1"}
    }
    assert side["state"] == {"waiting": {"reason": "ProcessExited", "message": "m"}}
    running = resolve.status_patch(
        containers[:1],
        {"engine": resolve.ContainerState("t0", running=True)},
        ready=True,
        reason="R",
        message="",
        now="t2",
    )
    assert running["status"]["containerStatuses"][0]["state"] == {"running": {"startedAt": "t0"}}
    assert running["status"]["containerStatuses"][0]["ready"] is True


# ---- real processes on the local cluster ----------------------------------------------------------


def _apply_crds(kube: Client) -> None:
    names = []
    for path in sorted((harness.REPO_ROOT / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        kube.apply(cast(CustomResourceDefinition, CustomResourceDefinition.from_dict(body)), force=True)
        names.append(body["metadata"]["name"])

    def established() -> bool:
        for n in names:
            conds = (kube.get(CustomResourceDefinition, name=n).status.conditions) or []  # type: ignore[union-attr]
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    harness.wait_for("CRDs Established", established, 60)


@pytest.fixture
def operator_process(cluster: harness.Cluster, kube: Client, tmp_path: Path) -> Iterator[itc.OperatorProcess]:
    _apply_crds(kube)
    op = itc.OperatorProcess(
        cluster, tmp_path / "operator", {"DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "3"}
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _small_cluster(name: str, pool: str) -> dict[str, Any]:
    body = itc.cluster_body(name, pool, prefill=1, decode=1)
    spec = body["spec"]
    spec["model"]["maxContextTokens"] = 1024
    spec["model"]["geometry"].update(
        {
            "numLayers": 2,
            "hiddenSize": 64,
            "numHeads": 4,
            "numKvHeads": 2,
            "headDim": 16,
            "intermediateSize": 128,
        }
    )
    for role in ("prefill", "decode"):
        spec[role]["gpusPerPod"] = 1
    spec["storage"]["volume"] = {
        "hostPath": {"path": f"/var/lib/dualpath/{name}", "type": "DirectoryOrCreate"}
    }
    return body


def _http_port(pod: Pod) -> int:
    assert pod.spec is not None
    return next(p.containerPort for p in pod.spec.containers[0].ports or [] if p.name == "http")


def _get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return cast(bytes, resp.read())


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_runner_runs_real_engines_and_scheduler_for_operator_pods(
    cluster: harness.Cluster,
    kube: Client,
    namespace: str,
    node_factory: nodes.NodeFactory,
    operator_process: itc.OperatorProcess,
    tmp_path: Path,
) -> None:
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    node_factory.create_many(pool, 2, "h200", labels={itc.POOL_LABEL: pool})
    name = "rt"
    pod_runner = runner.PodRunner(cluster.kubeconfig, tmp_path / "runner", namespace=namespace)
    try:
        pod_runner.start()
        itc.apply_dpc(kube, namespace, _small_cluster(name, pool))

        def all_ready() -> bool:
            procs = pod_runner.processes()
            if any(not p.alive for p in procs):
                dead = [p for p in procs if not p.alive]
                raise harness.ClusterError(
                    f"process died: {dead}\n{pod_runner.log_tail(namespace, dead[0].pod)}"
                )
            roles = sorted(p.component for p in procs if p.ready)
            return roles == ["engine", "engine", "scheduler"]

        try:
            harness.wait_for("scheduler + 2 engine processes ready", all_ready, 240, interval_s=0.5)
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\nwaiting: {pod_runner.waiting()}\n{_tails(pod_runner, namespace)}"
            ) from exc
        procs = {p.pod: p for p in pod_runner.processes()}
        pods = {p.metadata.name: p for p in kube.list(Pod, namespace=namespace)}  # type: ignore[union-attr]
        for pod_name, proc in procs.items():
            pod = pods[pod_name]
            assert pod.status is not None and proc.ip == pod.status.podIP and proc.ip.startswith("127.10.")
            assert pod.spec is not None and proc.node == pod.spec.nodeName
            assert processes.pid_alive(proc.pid)
            ready = [c.status for c in pod.status.conditions or [] if c.type == "Ready"]
            assert ready == ["True"], f"{pod_name} Ready={ready}"
        scheduler = next(p for p in procs.values() if p.component == "scheduler")
        engines = [p for p in procs.values() if p.component == "engine"]
        assert len({p.node for p in engines}) == 2
        sched_port = _http_port(pods[scheduler.pod])
        sched_url = f"http://{scheduler.ip}:{sched_port}"
        assert _get(f"{sched_url}/healthz")
        for engine in engines:  # each engine serves on its own pod IP
            assert _get(f"http://{engine.ip}:{_http_port(pods[engine.pod])}/healthz")
        for proc in procs.values():  # bound to the pod IP itself (not 0.0.0.0 or 127.0.0.1)
            assert (proc.ip, _http_port(pods[proc.pod])) in _listening(proc.pid), proc

        harness.wait_for("both engines registered", lambda: _registered(sched_url, engines), 60)
        _complete(sched_url)

        # The scheduler pod is replaced on another node (its node cordoned, so its IP changes): the
        # runner starts the new one, restarts the engines pointed at the new IP, and the cluster serves.
        kube.patch(Node, scheduler.node, {"spec": {"unschedulable": True}})
        kube.delete(Pod, name=scheduler.pod, namespace=namespace)

        def scheduler_url_of(engine: runner.PodProcess) -> str:
            cfg = yaml.safe_load((engine.pod_dir / "volumes" / "config" / "engine.yaml").read_text())
            return str(cfg["scheduler_url"])

        def replaced() -> bool:
            now = pod_runner.processes()
            news = [p for p in now if p.component == "scheduler" and p.uid != scheduler.uid and p.ready]
            ready = [p for p in now if p.component == "engine" and p.ready and p.alive]
            return (
                len(news) == 1
                and len(ready) == 2
                and all(scheduler_url_of(e) == f"http://{news[0].ip}:{sched_port}" for e in ready)
            )

        harness.wait_for("a new scheduler and 2 engines pointed at it", replaced, 120, interval_s=0.5)
        assert not processes.pid_alive(scheduler.pid)
        procs = {p.pod: p for p in pod_runner.processes()}
        new_sched = next(p for p in procs.values() if p.component == "scheduler")
        new_url = f"http://{new_sched.ip}:{sched_port}"
        assert new_sched.node != scheduler.node and new_sched.ip != scheduler.ip
        assert not {p.pid for p in procs.values()} & {e.pid for e in engines}  # engines restarted
        engines = [p for p in procs.values() if p.component == "engine"]
        harness.wait_for("both engines registered again", lambda: _registered(new_url, engines), 60)
        _complete(new_url)

        roots = pod_runner.sysfs_roots()
        assert set(roots) == {p.node for p in engines}
        for root in roots.values():
            harness.wait_for(
                f"fake sysfs counters under {root}",
                lambda root=root: any(root.glob("class/infiniband/*/ports/1/counters/port_rcv_data")),  # type: ignore[misc]
                30,
            )

        # A dead engine process turns its pod NotReady (kwok alone would keep it Ready).
        victim = engines[0]
        os.killpg(victim.pid, signal.SIGKILL)

        def victim_not_ready() -> bool:
            pod = kube.get(Pod, name=victim.pod, namespace=namespace)
            conds = (pod.status.conditions if pod.status else None) or []
            replaced = pod.metadata is not None and pod.metadata.uid != victim.uid  # the operator acted on it
            return replaced or any(c.type == "Ready" and c.status == "False" for c in conds)

        harness.wait_for(f"{victim.pod} NotReady after its process died", victim_not_ready, 30)

        started = pod_runner.started_pids()
        itc.delete_dpc(kube, namespace, name)

        def all_stopped() -> bool:
            return not pod_runner.processes() and not any(processes.pid_alive(pid) for pid in started)

        harness.wait_for("every process stopped after the DualPathCluster was deleted", all_stopped, 120)
    finally:
        pod_runner.stop_all()
        itc.delete_dpc(kube, namespace, name)
    assert not any(processes.pid_alive(pid) for pid in pod_runner.started_pids())


def _listening(pid: int) -> set[tuple[str, int]]:
    """(IPv4 address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
            hex_ip, hex_port = fields[1].split(":")
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(hex_ip)))
            out.add((ip, int(hex_port, 16)))
    return out


def _registered(sched_url: str, engines: list[runner.PodProcess]) -> bool:
    """Every engine (named ``pe-/de-<pod IP>-<port>``) reports its load to the scheduler."""
    text = _get(f"{sched_url}/metrics").decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("dualpath_scheduler_engine_unfinished_tokens{")]
    return all(any(f"-{e.ip}-" in ln for ln in lines) for e in engines)


def _complete(sched_url: str) -> None:
    """A real completion through the scheduler's OpenAI API succeeds."""
    # Greedy: with sampling, the random model may emit id 263, which the byte tokenizer (ids 0..262)
    # cannot decode (ModelConfig.vocab_size defaults to 264) and the scheduler answers 500.
    request = {"model": "dualpath-tiny", "prompt": "Hello, DualPath!", "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(
        f"{sched_url}/v1/completions",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"completion failed: {exc.code} {exc.read()!r}") from exc
    assert answer["usage"]["completion_tokens"] >= 1 and isinstance(answer["choices"][0]["text"], str)


def _tails(pod_runner: runner.PodRunner, namespace: str) -> str:
    return "\n".join(
        pod_runner.log_tail(namespace, p) for p in sorted({p.pod for p in pod_runner.processes()})
    )
