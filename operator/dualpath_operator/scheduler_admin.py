"""Client of the central scheduler's admin API (bearer token), used by the reconcile pass to push path
weights, drain engine groups, switch their role and learn which drained groups are idle.

The scheduler is reached at its pod IP (the operator runs in-cluster next to it; locally, pod IPs are
loopback addresses). Every call has a timeout; a failure raises :class:`AdminError`, which the caller
treats as "scheduler unknown" (drains then wait for their timeout; weights are pushed next pass).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp


class AdminError(RuntimeError):
    """The scheduler's admin API could not be reached or refused the call."""


@dataclass(frozen=True)
class GroupState:
    """One engine group as the scheduler sees it."""

    group_id: str
    role: str
    node: str | None
    drained: bool
    in_flight: int
    switching_to: str | None = None


@dataclass
class SchedulerAdmin:
    """``base_url`` like ``http://127.10.0.5:8000``; ``token`` from the cluster's admin Secret."""

    base_url: str
    token: str
    timeout_s: float = 5.0

    async def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, f"{self.base_url}{path}", json=body, headers=headers) as resp,
            ):
                payload = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise AdminError(f"{method} {path}: HTTP {resp.status}: {payload}")
                return payload
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise AdminError(f"{method} {path}: {e!r}") from e

    async def groups(self) -> list[GroupState]:
        data = await self._call("GET", "/admin/v1/status")
        return [
            GroupState(
                group_id=str(g["group_id"]),
                role=str(g.get("role", "")),
                node=g.get("node"),
                drained=bool(g.get("drained")),
                in_flight=int(g.get("in_flight") or 0),
                switching_to=g.get("switching_to"),
            )
            for g in data.get("groups", [])
        ]

    async def put_weights(self, capacities: Mapping[str, float]) -> None:
        """Per-node usable storage-NIC capacity for KV reads, bytes/s."""
        body = {
            "weights": [
                {"node": n, "capacity_bytes_per_second": float(c)} for n, c in sorted(capacities.items())
            ]
        }
        await self._call("PUT", "/admin/v1/weights", body)

    async def drain(self, group_id: str, drained: bool = True) -> None:
        await self._call("POST", "/admin/v1/drain", {"group_id": group_id, "drained": drained})

    async def set_role(self, group_id: str, role: str) -> None:
        await self._call("POST", "/admin/v1/role", {"group_id": group_id, "role": role})


def idle_groups(groups: Sequence[GroupState]) -> frozenset[str]:
    """Drained groups with nothing in flight: safe to delete or switch."""
    return frozenset(g.group_id for g in groups if g.drained and g.in_flight == 0)
