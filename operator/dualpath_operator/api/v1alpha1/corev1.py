"""Typed subsets of Kubernetes core/v1 types that a DualPathCluster embeds.

Field names equal the core API's, so ``model_dump(by_alias=True, exclude_none=True, mode="json")`` of
these models is a valid core/v1 fragment the renderer can place into a pod unchanged. They are typed
(not open objects) so that the CRD stays structural and ``kubectl explain`` describes them. Used by
``spec.py`` of this package.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from dualpath_operator.api.v1alpha1 import common


def _key_field() -> Any:
    return Field(
        min_length=1, max_length=317, description="The label or field key the requirement applies to."
    )


class ResourceRequirements(common.ApiModel):
    """CPU, memory and other resources for a container, as in core/v1 ResourceRequirements."""

    requests: dict[str, common.Quantity] | None = Field(
        None,
        max_length=16,
        description="Minimum resources the container needs, by resource name (e.g. cpu: 500m, memory: 4Gi).",
    )
    limits: dict[str, common.Quantity] | None = Field(
        None,
        max_length=16,
        description="Maximum resources the container may use, by resource name.",
    )


class TolerationOperator(StrEnum):
    """How a toleration matches a taint's value."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    """The taint effect a toleration matches."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(common.ApiModel):
    """Lets the engine pods schedule onto nodes with a matching taint (core/v1 Toleration)."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "!has(self.operator) || self.operator != 'Exists'"
                    " || !has(self.value) || self.value == ''",
                    "tolerations[].value must be empty when tolerations[].operator is Exists",
                    field_path=".value",
                )
            ]
        )
    )

    key: str | None = Field(None, max_length=317, description="Taint key to match; empty matches all keys.")
    operator: TolerationOperator | None = Field(
        None, description="Exists (any value) or Equal (value must match); Equal when unset."
    )
    value: str | None = Field(None, max_length=63, description="Taint value to match with operator Equal.")
    effect: TaintEffect | None = Field(None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        description="With effect NoExecute: seconds the pod stays bound after the taint appears.",
    )

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise ValueError("value must be empty when operator is Exists")
        return self


class NodeSelectorOperator(StrEnum):
    """Operators of a node selector requirement."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


class NodeSelectorRequirement(common.ApiModel):
    """One expression over a node label or field."""

    key: str = _key_field()
    operator: NodeSelectorOperator = Field(description="How the key relates to the values.")
    values: list[str] | None = Field(
        None, max_length=64, description="Values for In/NotIn (any number) and Gt/Lt (exactly one integer)."
    )


class NodeSelectorTerm(common.ApiModel):
    """Requirements that must all hold for a node to match (the terms of a selector are ORed)."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        None, max_length=32, description="Requirements on node labels."
    )
    match_fields: list[NodeSelectorRequirement] | None = Field(
        None, max_length=32, description="Requirements on node fields (e.g. metadata.name)."
    )


class NodeSelector(common.ApiModel):
    """A required node selector: a node matches if any of its terms matches."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=32, description="Terms, ORed together."
    )


class PreferredSchedulingTerm(common.ApiModel):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100, description="Weight added to a matching node's score, 1-100.")
    preference: NodeSelectorTerm = Field(description="The node selector term to prefer.")


class NodeAffinity(common.ApiModel):
    """Node affinity of the engine pods (core/v1 NodeAffinity)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="Nodes the pods must land on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        None, max_length=32, description="Nodes the pods should preferably land on."
    )


class LabelSelectorOperator(StrEnum):
    """Operators of a label selector requirement."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(common.ApiModel):
    """One expression over a label."""

    key: str = _key_field()
    operator: LabelSelectorOperator = Field(description="How the key relates to the values.")
    values: list[str] | None = Field(None, max_length=64, description="Values for In and NotIn.")


class LabelSelector(common.ApiModel):
    """A label query (core/v1 LabelSelector); an empty selector matches everything."""

    match_labels: dict[str, str] | None = Field(
        None, max_length=32, description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=32, description="Requirements that must all hold."
    )


class PodAffinityTerm(common.ApiModel):
    """Pods (by label) that must or must not share a topology domain with the engine pods."""

    label_selector: LabelSelector | None = Field(None, description="Which pods this term is about.")
    namespaces: list[str] | None = Field(
        None, max_length=32, description="Namespaces to look in; the pod's own namespace when empty."
    )
    topology_key: str = Field(
        min_length=1,
        max_length=317,
        description="Node label whose value defines the domain, e.g. kubernetes.io/hostname.",
    )


class WeightedPodAffinityTerm(common.ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100, description="Weight added to a matching node's score, 1-100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The pod affinity term to prefer.")


class PodAntiAffinity(common.ApiModel):
    """Pods the engine pods must or should not share a topology domain with (core/v1 PodAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        None, max_length=16, description="Terms that must hold for a node to be chosen."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        None, max_length=16, description="Terms that raise a node's score when they hold."
    )


class Affinity(common.ApiModel):
    """Scheduling constraints added to the engine pods (core/v1 Affinity).

    The operator always adds its own pod anti-affinity (one engine pod per node); terms given here are
    merged with it. Pod affinity is not offered: an engine pod owns its node's GPUs, so co-locating it
    with other pods is what node affinity and node selectors express.
    """

    node_affinity: NodeAffinity | None = Field(None, description="Node affinity of the engine pods.")
    pod_anti_affinity: PodAntiAffinity | None = Field(
        None, description="Pods to keep apart from, in addition to the operator's one-engine-per-node rule."
    )


class SecretKeySelector(common.ApiModel):
    """One key of a Secret in the DualPathCluster's namespace."""

    name: common.DnsSubdomain = Field(description="Name of the Secret.")
    key: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret."
    )


class ConfigMapKeySelector(common.ApiModel):
    """One key of a ConfigMap in the DualPathCluster's namespace."""

    name: common.DnsSubdomain = Field(description="Name of the ConfigMap.")
    key: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the ConfigMap."
    )


class ObjectFieldSelector(common.ApiModel):
    """A field of the pod itself (downward API), e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, max_length=256, description="Path of the field, e.g. status.podIP.")


class EnvVarSource(common.ApiModel):
    """Where an environment variable's value comes from; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0)"
                    " + (has(self.fieldRef) ? 1 : 0) == 1",
                    "env[].valueFrom must set exactly one of secretKeyRef, configMapKeyRef, fieldRef",
                )
            ]
        )
    )

    secret_key_ref: SecretKeySelector | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: ConfigMapKeySelector | None = Field(None, description="A key of a ConfigMap.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A field of the pod.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if sum(x is not None for x in (self.secret_key_ref, self.config_map_key_ref, self.field_ref)) != 1:
            raise ValueError("set exactly one of secretKeyRef, configMapKeyRef, fieldRef")
        return self


ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RESERVED_ENV_PREFIX = "DUALPATH_"
"""Environment variables the operator sets on engine pods (role, group, node, host, port, scheduler URL)."""


class EnvVar(common.ApiModel):
    """An environment variable for the engine containers."""

    model_config = ConfigDict(
        json_schema_extra=common.schema_extra(
            validations=[
                common.rule(
                    "!(has(self.value) && has(self.valueFrom))",
                    "env[].value and env[].valueFrom are mutually exclusive",
                ),
                common.rule(
                    f"!self.name.startsWith('{RESERVED_ENV_PREFIX}')",
                    "env[].name must not start with DUALPATH_: the operator sets those variables",
                    field_path=".name",
                ),
            ]
        )
    )

    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str | None = Field(None, max_length=4096, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        None, description="Value taken from a Secret, ConfigMap or pod field."
    )

    @model_validator(mode="after")
    def _consistent(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("value and valueFrom are mutually exclusive")
        if self.name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"names starting with {RESERVED_ENV_PREFIX} are set by the operator")
        return self
