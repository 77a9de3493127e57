"""Pure helpers of the local pod runner (``tests/cluster/runner.py``): what a kubelet, cluster DNS and
kube-proxy would do for a pod, done on plain pod/Service dicts without any I/O.

- :func:`container_env`: a container's environment (plain values with ``$(VAR)`` expansion, downward-API
  ``fieldRef``, ``secretKeyRef`` / ``configMapKeyRef``, ``envFrom``), given lookups for ConfigMap and
  Secret data;
- :class:`MountMap`: container mount paths -> local directories, and the rewrite of path strings that
  start with a mount path (longest mount wins, so ``/etc/dualpath/admin`` beats ``/etc/dualpath``);
- :func:`service_refs` / :func:`rewrite_services`: Service DNS URLs (``http://<svc>.<ns>.svc:<port>``)
  found in strings and rewritten to ``http://<pod IP>:<target port>``;
- :func:`backend_address`: the address of a ready pod behind a Service port (selector match);
- :func:`map_strings`: apply a string rewrite to every string in a parsed YAML/JSON document;
- pod spec pieces: readiness probe targets, volume sources and their shared paths, the ``--config``
  argument, NIC emulation in an engine config, and the pod status patch that reflects a process.

Only the runner and its tests call this module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``fieldRef.fieldPath`` of a label or annotation: ``metadata.labels['k']``.
_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
#: ``$(VAR)`` references in env values, command and args (``$$`` escapes a ``$``).
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
#: A Service DNS name in a URL: scheme, service, namespace, optional cluster domain, optional port.
SERVICE_URL = re.compile(
    r"(?P<scheme>https?)://(?P<svc>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"\.svc(\.cluster\.local)?(:(?P<port>\d+))?(?![\w.-])"
)


class PodError(Exception):
    """The pod asks for something the local runner cannot do (it is reported, never half-run)."""


class NotYetError(Exception):
    """A dependency (ConfigMap, Secret, Service backend) is not there yet; try again on the next pass."""


Lookup = Callable[[str, str], Mapping[str, str] | None]
"""``(namespace, name) -> data`` of a ConfigMap or a decoded Secret, ``None`` when it does not exist."""


@dataclass(frozen=True)
class ServiceRef:
    """One Service port named in a URL: ``<scheme>://<name>.<namespace>.svc:<port>``."""

    namespace: str
    name: str
    port: int
    scheme: str


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath`` on ``pod`` (empty string when unset)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(ip.get("ip", "") for ip in status.get("podIPs") or []),
        "status.hostIPs": ",".join(ip.get("ip", "") for ip in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise PodError(f"fieldRef {path!r} is not supported by the local runner")
    value = simple[path]
    return "" if value is None else str(value)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables replaced, unknown ones kept, ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def _key_ref(kind: str, ref: Mapping[str, Any], namespace: str, lookup: Lookup) -> str | None:
    data = lookup(namespace, str(ref.get("name", "")))
    optional = bool(ref.get("optional", False))
    if data is None:
        if optional:
            return None
        raise NotYetError(f"{kind} {namespace}/{ref.get('name')} does not exist yet")
    key = str(ref.get("key", ""))
    if key not in data:
        if optional:
            return None
        raise NotYetError(f"{kind} {namespace}/{ref.get('name')} has no key {key!r} yet")
    return data[key]


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], configmaps: Lookup, secrets: Lookup
) -> dict[str, str]:
    """The container's environment as the kubelet would set it (``envFrom`` first, then ``env`` in order)."""
    namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix", ""))
        for kind, field, lookup in (
            ("ConfigMap", "configMapRef", configmaps),
            ("Secret", "secretRef", secrets),
        ):
            ref = source.get(field)
            if ref is None:
                continue
            data = lookup(namespace, str(ref.get("name", "")))
            if data is None:
                if ref.get("optional", False):
                    continue
                raise NotYetError(f"{kind} {namespace}/{ref.get('name')} (envFrom) does not exist yet")
            env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name = str(item["name"])
        if "valueFrom" not in item or item["valueFrom"] is None:
            env[name] = expand(str(item.get("value") or ""), env)
            continue
        src = item["valueFrom"]
        value: str | None
        if src.get("fieldRef") is not None:
            value = field_value(pod, str(src["fieldRef"]["fieldPath"]))
        elif src.get("secretKeyRef") is not None:
            value = _key_ref("Secret", src["secretKeyRef"], namespace, secrets)
        elif src.get("configMapKeyRef") is not None:
            value = _key_ref("ConfigMap", src["configMapKeyRef"], namespace, configmaps)
        else:
            raise PodError(f"env {name}: valueFrom {sorted(src)} is not supported by the local runner")
        if value is not None:
            env[name] = value
    return env


class MountMap:
    """Container mount paths mapped to local directories; rewrites path strings under a mount path."""

    def __init__(self, mounts: Mapping[str, Path]) -> None:
        self._mounts = sorted(
            ((m.rstrip("/") or "/", p) for m, p in mounts.items()), key=lambda mp: len(mp[0]), reverse=True
        )

    @classmethod
    def of_containers(cls, containers: Sequence[Mapping[str, Any]], volumes: Mapping[str, Path]) -> MountMap:
        """The mounts of every container (first wins on a path), ``subPath`` honoured."""
        mounts: dict[str, Path] = {}
        for c in containers:
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    raise PodError(f"container {c.get('name')}: mount of unknown volume {m['name']}")
                local = volumes[m["name"]] / m["subPath"] if m.get("subPath") else volumes[m["name"]]
                mounts.setdefault(str(m["mountPath"]), local)
        return cls(mounts)

    @property
    def mounts(self) -> dict[str, Path]:
        return dict(self._mounts)

    def local(self, path: str) -> Path | None:
        """The local path of container path ``path``, or ``None`` when no mount covers it."""
        for mount, local in self._mounts:
            if path == mount:
                return local
            if path.startswith(mount.rstrip("/") + "/"):
                return local / path[len(mount) :].lstrip("/")
        return None

    def rewrite(self, text: str) -> str:
        """``text`` with a leading mount path replaced by its local directory (other strings unchanged).

        Handles a bare path and ``--flag=/path`` forms.
        """
        if "=" in text and text.startswith("-"):
            flag, _, value = text.partition("=")
            return f"{flag}={self.rewrite(value)}"
        local = self.local(text)
        return str(local) if local is not None else text


def service_refs(text: str) -> set[ServiceRef]:
    """The Service ports named by DNS URLs in ``text`` (a URL without a port means the scheme's default)."""
    refs = set()
    for m in SERVICE_URL.finditer(text):
        port = int(m.group("port")) if m.group("port") else (443 if m.group("scheme") == "https" else 80)
        refs.add(ServiceRef(m.group("ns"), m.group("svc"), port, m.group("scheme")))
    return refs


def rewrite_services(text: str, addresses: Mapping[ServiceRef, str]) -> str:
    """Replace every Service DNS URL whose ref is in ``addresses`` with ``<scheme>://<ip:port>``."""

    def sub(m: re.Match[str]) -> str:
        for ref in service_refs(m.group(0)):
            if ref in addresses:
                return f"{ref.scheme}://{addresses[ref]}"
        return m.group(0)

    return SERVICE_URL.sub(sub, text)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service selector (equality only) matches ``labels``; an empty selector matches nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Scheduled, has an IP, not terminating and condition Ready=True."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _container_port(pod: Mapping[str, Any], name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    return None


def backend_address(service: Mapping[str, Any], port: int, pods: Sequence[Mapping[str, Any]]) -> str | None:
    """``ip:port`` of the first ready pod (by name) behind ``service``'s ``port``; ``None`` if none is."""
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    svc_port = next((p for p in spec.get("ports") or [] if int(p.get("port", 0)) == port), None)
    if svc_port is None:
        return None
    target = svc_port.get("targetPort", port)
    ready = sorted(
        (
            p
            for p in pods
            if pod_ready(p) and selector_matches(selector, (p.get("metadata") or {}).get("labels") or {})
        ),
        key=lambda p: str((p.get("metadata") or {}).get("name", "")),
    )
    for pod in ready:
        number = (
            _container_port(pod, target) if isinstance(target, str) and not target.isdigit() else int(target)
        )
        if number is not None:
            return f"{pod['status']['podIP']}:{number}"
    return None


def map_strings(doc: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a parsed YAML/JSON document with ``fn`` applied to every string value (keys unchanged)."""
    if isinstance(doc, str):
        return fn(doc)
    if isinstance(doc, list):
        return [map_strings(v, fn) for v in doc]
    if isinstance(doc, dict):
        return {k: map_strings(v, fn) for k, v in doc.items()}
    return doc


# ---- pod spec pieces --------------------------------------------------------------------------------

Probe = tuple[str, str, int, str]
"""``(kind, host, port, path)`` of a readiness probe: kind ``http`` (GET path, 2xx/3xx) or ``tcp``."""


def probe_target(container: Mapping[str, Any], ip: str) -> Probe | None:
    """The container's readinessProbe resolved against the pod IP; ``None`` = ready while running."""
    probe = container.get("readinessProbe")
    if not probe:
        return None
    ports = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}

    def port_of(value: Any) -> int:
        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        if value not in ports:
            raise PodError(f"probe port {value!r} is not a named container port")
        return ports[value]

    if probe.get("httpGet") is not None:
        get = probe["httpGet"]
        return ("http", get.get("host") or ip, port_of(get["port"]), get.get("path", "/"))
    if probe.get("tcpSocket") is not None:
        return ("tcp", probe["tcpSocket"].get("host") or ip, port_of(probe["tcpSocket"]["port"]), "")
    raise PodError(f"container {container.get('name')}: only httpGet/tcpSocket probes are supported")


def volume_source(volume: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(kind, source)`` of a pod volume, e.g. ``("hostPath", {"path": ...})``; no source = emptyDir."""
    kinds = [k for k in volume if k != "name" and volume[k] is not None]
    kind = kinds[0] if kinds else "emptyDir"
    return kind, volume.get(kind) or {}


def shared_volume_path(kind: str, source: Mapping[str, Any], namespace: str) -> Path:
    """Where a storage volume lives under the runner's shared dir (the same for every pod and node,
    like a shared filesystem): hostPath by path, PVC by namespace/claim, others by a source digest."""
    if kind == "hostPath":
        return Path("hostPath") / str(source.get("path", "")).strip("/")
    if kind == "persistentVolumeClaim":
        return Path("pvc") / namespace / str(source.get("claimName", ""))
    digest = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(kind) / digest


def config_arg(argv: Sequence[str]) -> str | None:
    """The value of the last ``--config X`` / ``--config=X`` argument, if any."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def with_nic_emulation(doc: Mapping[str, Any] | None, sysfs_root: Path) -> dict[str, Any]:
    """An engine config document with NIC emulation on, counters written under ``sysfs_root``."""
    out = dict(doc or {})
    out["network"] = {**(out.get("network") or {}), "emulate": True, "sysfs_root": str(sysfs_root)}
    return out


@dataclass(frozen=True)
class ContainerState:
    """What the runner knows of one container's process: not started, running or exited (code)."""

    started_at: str | None
    exit_code: int | None = None
    running: bool = False


def status_patch(
    containers: Sequence[Mapping[str, Any]],
    states: Mapping[str, ContainerState],
    *,
    ready: bool,
    reason: str,
    message: str,
    now: str,
) -> dict[str, Any]:
    """Pod status patch: Ready/ContainersReady conditions and one status per container, as a kubelet
    would report them (a container without a state is waiting with ``reason``)."""
    flag = "True" if ready else "False"
    message = message[:1000]
    conditions = [
        {"type": t, "status": flag, "reason": reason, "message": message, "lastTransitionTime": now}
        for t in ("Ready", "ContainersReady")
    ]
    statuses = []
    for c in containers:
        st = states.get(str(c.get("name")))
        state: dict[str, Any]
        if st is None or st.started_at is None:
            state = {"waiting": {"reason": reason, "message": message}}
        elif st.running:
            state = {"running": {"startedAt": st.started_at}}
        else:
            code = st.exit_code if st.exit_code is not None else 137
            terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
            state = {"terminated": {**terminated, "startedAt": st.started_at, "finishedAt": now}}
        statuses.append(
            {
                "name": c.get("name"),
                "image": c.get("image", ""),
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": st is not None and st.running,
                "state": state,
            }
        )
    return {"status": {"conditions": conditions, "containerStatuses": statuses}}
