"""Building blocks shared by the v1alpha1 models: the base model, string formats and durations.

Every model of the DualPathCluster API derives from :class:`ApiModel` (frozen, camelCase aliases, no
unknown fields). The annotated types here carry both the pydantic check and the OpenAPI pattern that
``dualpath_operator.crdgen`` copies into the CRD, so the API server and the operator agree on what
is valid. Called by the spec, status and corev1 modules of this package and, for
:func:`parse_duration`, by the planner.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of every API model: immutable, camelCase field names, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
    )


DURATION_PATTERN = r"^([0-9]{1,6}(ms|s|m|h)){1,4}$"
"""A Go/CEL duration restricted to whole numbers of ms, s, m and h, e.g. ``30s``, ``1m30s``, ``500ms``."""

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Return the seconds a duration string such as ``1m30s`` stands for.

    Raises ``ValueError`` when ``text`` does not match :data:`DURATION_PATTERN`.
    """
    if re.fullmatch(DURATION_PATTERN, text) is None:
        raise ValueError(f"invalid duration {text!r}: expected e.g. '30s', '1m30s', '500ms'")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32), AfterValidator(_check_duration)]
"""A duration string (see :data:`DURATION_PATTERN`)."""

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""The Kubernetes resource quantity syntax (``500m``, ``4Gi``, ``2``), as the core API publishes it."""


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and re.fullmatch(QUANTITY_PATTERN, value) is None:
        raise ValueError(f"invalid quantity {value!r}: expected e.g. '500m', '4Gi', '2'")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
"""A Kubernetes resource quantity: an integer or a string such as ``500m`` or ``4Gi``."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DnsSubdomain = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]
"""An object name in DNS-1123 subdomain form (Secrets, ConfigMaps, PVCs)."""

EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
    r"/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
"""A domain-qualified extended resource name such as ``nvidia.com/gpu`` or ``rdma/hca_shared_devices_a``."""

ExtendedResourceName = Annotated[str, Field(pattern=EXTENDED_RESOURCE_PATTERN, min_length=3, max_length=253)]
"""A device-plugin resource name, always domain-qualified (``<domain>/<name>``)."""

NETWORK_REF_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A Multus NetworkAttachmentDefinition reference: ``name`` or ``namespace/name``."""

NetworkRef = Annotated[str, Field(pattern=NETWORK_REF_PATTERN, min_length=1, max_length=127)]
"""A Multus NetworkAttachmentDefinition reference (``name`` or ``namespace/name``)."""


def _unique(items: list[str]) -> list[str]:
    if len(items) != len(set(items)):
        raise ValueError("entries must be unique")
    return items


NetworkRefs = Annotated[list[NetworkRef], AfterValidator(_unique)]
"""A set of NetworkAttachmentDefinition references (no duplicates; ``x-kubernetes-list-type: set``)."""

REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
"""A machine-readable UpperCamelCase reason, as in ``metav1.Condition``."""


def schema_extra(**extra: Any) -> dict[str, Any]:
    """Return ``json_schema_extra`` for a field, spelling Kubernetes extension keys in one place.

    ``validations`` becomes ``x-kubernetes-validations``, ``list_type`` ``x-kubernetes-list-type``,
    ``list_map_keys`` ``x-kubernetes-list-map-keys`` and ``default`` is copied as the schema default.
    """
    keys = {
        "validations": "x-kubernetes-validations",
        "list_type": "x-kubernetes-list-type",
        "list_map_keys": "x-kubernetes-list-map-keys",
        "default": "default",
    }
    unknown = set(extra) - set(keys)
    if unknown:
        raise TypeError(f"unknown schema_extra keys: {sorted(unknown)}")
    return {keys[k]: v for k, v in extra.items()}


def rule(
    expression: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """Return one CEL ``x-kubernetes-validations`` entry whose message names the offending field."""
    entry = {"rule": expression, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry
