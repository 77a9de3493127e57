"""The generated CRD is structural, documented, checked in and agrees with the models' defaults."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import Field

from dualpath_operator import crdgen
from dualpath_operator.api.v1alpha1 import cluster, common
from tests.unit.api import specs

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, sub-node) of a nested structure, dicts and lists alike."""
    yield path, node
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _nodes(value, f"{path}[{i}]")


def _properties(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from _properties(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _properties(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _properties(schema["additionalProperties"], f"{path}.*")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crdgen.openapi_schema()


@pytest.mark.parametrize(
    "path",
    [ROOT / "crds" / crdgen.CRD_FILE, ROOT / "charts" / "dualpath-operator" / "crds" / crdgen.CRD_FILE],
    ids=["crds", "chart"],
)
def test_checked_in_crd_is_what_the_models_generate(path: Path) -> None:
    assert path.read_text(encoding="utf-8") == crdgen.render_crd_yaml(), "run `make crds`"


def test_checked_in_api_reference_is_what_the_models_generate() -> None:
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == crdgen.render_docs(), "run `make crds`"


def test_output_is_deterministic() -> None:
    assert crdgen.render_crd_yaml() == crdgen.render_crd_yaml()
    assert crdgen.render_docs() == crdgen.render_docs()


def test_cli_writes_all_three_files(tmp_path: Path) -> None:
    rc = crdgen.main(
        [
            "--out",
            str(tmp_path / "crds"),
            "--chart",
            str(tmp_path / "chart"),
            "--docs",
            str(tmp_path / "d/api.md"),
        ]
    )
    assert rc == 0
    crd = (tmp_path / "crds" / crdgen.CRD_FILE).read_text()
    assert crd == (tmp_path / "chart" / crdgen.CRD_FILE).read_text() == crdgen.render_crd_yaml()
    assert (tmp_path / "d" / "api.md").read_text() == crdgen.render_docs()


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        if isinstance(node, Mapping):
            for banned in ("$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "const"):
                assert banned not in node, f"{banned} at {path}"
            assert node.get("additionalProperties") is not False, path
            assert not ("properties" in node and "additionalProperties" in node), path


def test_every_property_has_a_description_and_a_type(schema: dict[str, Any]) -> None:
    spec_and_status = {"spec": schema["properties"]["spec"], "status": schema["properties"]["status"]}
    for name, section in spec_and_status.items():
        for path, node in _properties(section, name):
            assert node.get("description"), f"{path} has no description"
            assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_only_the_storage_volume_keeps_unknown_fields(schema: dict[str, Any]) -> None:
    open_paths = [
        path for path, node in _properties(schema) if node.get("x-kubernetes-preserve-unknown-fields") is True
    ]
    assert open_paths == [".spec.storage.volume"]
    assert "x-kubernetes-preserve-unknown-fields" not in schema["properties"]["spec"]


def test_conditions_are_a_list_map_keyed_by_type(schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_resource_identity_subresource_and_columns() -> None:
    crd = yaml.safe_load(crdgen.render_crd_yaml())
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "dualpathclusters.dualpath.io"
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "DualPathCluster",
        "dualpathclusters",
        ["dpc"],
    )
    assert "dualpath" in names["categories"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Prefill", "Decode", "Ratio", "Ready", "Age"):
        assert wanted in columns


def test_crd_stays_small() -> None:
    # client-side apply stores the whole object in an annotation (256 KiB limit); Helm keeps CRDs in
    # the release Secret: leave plenty of room.
    assert len(crdgen.render_crd_yaml().encode()) < 128 * 1024


def test_cross_field_rules_are_in_the_schema_with_field_paths(schema: dict[str, Any]) -> None:
    rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    assert {r["message"] for r in rules} == {m for _, m, _ in cluster.SPEC_RULES}
    for r in rules:
        assert r["message"].startswith("spec.") and r["fieldPath"].startswith(".")


def test_immutable_fields_have_transition_rules(schema: dict[str, Any]) -> None:
    model = schema["properties"]["spec"]["properties"]["model"]["properties"]
    for name in ("kvBlockTokens", "dtype"):
        assert any(r["rule"] == "self == oldSelf" for r in model[name]["x-kubernetes-validations"]), name


def test_schema_defaults_equal_the_models_defaults(schema: dict[str, Any]) -> None:
    """What the API server stores for a minimal object is what the operator parses it to."""
    body = specs.valid_cluster()
    server_defaulted = crdgen.apply_defaults(schema, body)
    parsed = cluster.DualPathCluster.model_validate(body)
    assert (
        server_defaulted["spec"] == parsed.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"]
    )


def test_api_reference_lists_every_field(schema: dict[str, Any]) -> None:
    docs = crdgen.render_docs()
    for section in ("spec", "status"):
        for path, _node, _required in crdgen.walk(schema["properties"][section], section):
            assert f"| `{path}` |" in docs, path
    assert "Defaults." in docs


# ------------------------------------------------------------------- the generic rewrite on toy models


class _Toy(common.ApiModel):
    """A toy."""

    maybe: int | None = Field(None, description="An optional int.")
    positive: float = Field(1.0, gt=0, lt=10, description="A bounded float.")
    fixed: Literal["x"] = Field("x", description="A constant.")
    free: dict[str, Any] = Field(default_factory=dict, description="An open object.")


class _Union(common.ApiModel):
    """A union that has no structural form."""

    either: int | str = Field(description="An int or a str.")


def _toy_schema(model: type[common.ApiModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    return crdgen._rewrite(raw, defs, "")


def test_rewrite_turns_optional_into_nullable_and_bounds_into_openapi_form() -> None:
    props = _toy_schema(_Toy)["properties"]
    assert props["maybe"] == {"description": "An optional int.", "type": "integer", "nullable": True}
    assert props["positive"]["minimum"] == 0 and props["positive"]["exclusiveMinimum"] is True
    assert props["positive"]["maximum"] == 10 and props["positive"]["exclusiveMaximum"] is True
    assert props["fixed"]["enum"] == ["x"]
    assert props["free"]["x-kubernetes-preserve-unknown-fields"] is True


def test_rewrite_refuses_unions_without_structural_form() -> None:
    with pytest.raises(crdgen.SchemaError, match="either"):
        _toy_schema(_Union)
