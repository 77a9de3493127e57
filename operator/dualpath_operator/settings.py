"""Operator process configuration and the Kopf settings derived from it.

Holds :class:`OperatorConfig` (frozen pydantic, read once from ``DUALPATH_OPERATOR_*`` environment
variables by :meth:`OperatorConfig.from_env`) and :func:`configure`, which writes it into a
``kopf.OperatorSettings``. Called by the ``@kopf.on.startup`` handler in
:mod:`dualpath_operator.handlers`; the Helm chart sets the environment variables. The decisions behind
the values (no finalizer in practice, one standalone replica) are in ``docs/design/0001`` and ``0002``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Literal, Self

import kopf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "DUALPATH_OPERATOR_"
"""Prefix of the environment variables read by :meth:`OperatorConfig.from_env`."""

ANNOTATION_PREFIX = "dualpath.io"
"""Prefix of every annotation Kopf writes on our objects (progress, diff base)."""

FINALIZER = "dualpath.io/finalizer"
"""The finalizer Kopf would add; with the handlers of design note 0001 it is never added."""

DIFFBASE_KEY = "last-handled-configuration"
"""Annotation key (under :data:`ANNOTATION_PREFIX`) of Kopf's diff base."""

PostingLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class OperatorConfig(BaseModel):
    """Process-level configuration of the operator (not per DualPathCluster)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field_manager: str = Field(
        default="dualpath-operator",
        min_length=1,
        max_length=128,
        description="Field manager of every server-side apply; Argo CD's ignoreDifferences names it.",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the Prometheus /metrics endpoint binds to; the chart sets 0.0.0.0 in the pod.",
    )
    metrics_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        description="Port of the /metrics endpoint; 0 picks a free port (tests).",
    )
    resync_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Every known DualPathCluster is re-reconciled at least this often, events or not.",
    )
    posting_level: PostingLevel = Field(
        default="WARNING",
        description="Lowest level of Kopf's own log records that are also posted as Kubernetes Events.",
    )
    watch_server_timeout_seconds: int = Field(
        default=120,
        ge=1,
        description=(
            "Asks the API server to end each watch after this long, so watches are renewed; whole seconds"
            " (sent as the watch's timeoutSeconds, which the API server parses as an integer)."
        ),
    )
    watch_client_timeout_seconds: float = Field(
        default=150.0,
        gt=0,
        description="Client-side limit of one watch request; must exceed the server timeout.",
    )
    watch_connect_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Limit for opening the connection of a watch request.",
    )
    watch_inactivity_timeout_seconds: float = Field(
        default=70.0,
        gt=0,
        description="A watch stream silent this long (no event, no bookmark) is considered dead.",
    )
    request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Limit for one non-watch API request (patches, lists, gets) made by Kopf.",
    )
    request_connect_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Limit for opening the connection of one non-watch API request made by Kopf.",
    )

    @model_validator(mode="after")
    def _client_outlives_server(self) -> Self:
        if self.watch_client_timeout_seconds <= self.watch_server_timeout_seconds:
            raise ValueError(
                "watch_client_timeout_seconds must be greater than watch_server_timeout_seconds "
                f"({self.watch_client_timeout_seconds} <= {self.watch_server_timeout_seconds}): "
                "otherwise the client cuts every watch before the server ends it normally"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        """Build the configuration from ``DUALPATH_OPERATOR_<FIELD>`` variables (others are ignored).

        An unknown ``DUALPATH_OPERATOR_*`` name is an error, so a typo does not silently keep a
        default. Raises ``ValueError`` naming the variable on any problem.
        """
        env = os.environ if environ is None else environ
        fields = set(cls.model_fields)
        values: dict[str, str] = {}
        unknown: list[str] = []
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            field = name[len(ENV_PREFIX) :].lower()
            if field in fields:
                values[field] = value
            else:
                unknown.append(name)
        if unknown:
            known = ", ".join(ENV_PREFIX + f.upper() for f in sorted(fields))
            raise ValueError(f"unknown environment variable(s) {', '.join(sorted(unknown))}; known: {known}")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in err['loc']).upper() or '<model>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"invalid operator configuration: {problems}") from exc


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Write ``config`` into Kopf's ``settings``; call it from the ``@kopf.on.startup`` handler.

    Startup handlers run before Kopf starts its watchers, so every value here is in force for the whole
    run.
    """
    # Our marks, not Kopf's: anything Kopf stores on an object lives under dualpath.io, so users and
    # Argo CD see one owner of the operator's bookkeeping (local-kubernetes.md 14.5 item 4).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key=DIFFBASE_KEY
    )

    # Kopf posts its log records as Events from INFO up by default: one per handler run, which floods
    # `kubectl describe dpc`. Our own transition events come from dualpath_operator.k8s instead.
    settings.posting.level = logging.getLevelNamesMapping()[config.posting_level]

    # Watch stalls (nolar/kopf#996: the operator stops reacting after connection resets; #957: handlers
    # stop responding) come from streams that are half-open and never end. Asking the server to end
    # every watch after a bounded time renews them regularly. Kopf sends str(value) as timeoutSeconds:
    # it must be an int ("120.0" is rejected with 400 Bad Request and every watcher fails)...
    settings.watching.server_timeout = int(config.watch_server_timeout_seconds)
    # ...and a client-side total limit slightly above it catches a server (or a proxy) that never does.
    settings.watching.client_timeout = config.watch_client_timeout_seconds
    # An unreachable API server must fail fast and be retried, not hang a watcher for minutes.
    settings.watching.connect_timeout = config.watch_connect_timeout_seconds
    # The API server sends bookmarks about every 60 s; silence longer than that means a dead stream,
    # reconnect while the server still has the missed events in its watch cache (~75 s).
    settings.watching.inactivity_timeout = config.watch_inactivity_timeout_seconds
    # Kopf's default for ordinary requests is 5 minutes (aiohttp's default): one hung PATCH would stall
    # the object's worker that long. Ours are small; fail, back off and retry instead.
    settings.networking.request_timeout = config.request_timeout_seconds
    settings.networking.connect_timeout = config.request_connect_timeout_seconds

    # One replica with `strategy: Recreate`, no peering (docs/design/0002-ha.md). The chart also passes
    # --standalone; setting it here makes a plain `kopf run -m dualpath_operator.handlers` the same.
    settings.peering.standalone = True
    settings.peering.mandatory = False
