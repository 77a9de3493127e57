"""values.yaml documents every key, values.schema.json covers exactly those keys, chart CRDs equal crds/."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed (types-jsonschema)
import pytest
import yaml

from tests.unit.chart.conftest import CHART, ROOT

pytestmark = pytest.mark.timeout(30)

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES: dict[str, Any] = yaml.safe_load(VALUES_TEXT)
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def undocumented_keys(text: str) -> list[str]:
    """Keys of a values file with neither a comment line right above (same indent) nor a trailing comment."""
    missing: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if match is None:
            continue
        if "#" in match["rest"]:
            continue
        previous = lines[number - 1] if number > 0 else ""
        if previous.strip().startswith("#") and previous.startswith(match["indent"] + "#"):
            continue
        missing.append(f"line {number + 1}: {match['key']}")
    return missing


def test_every_values_key_has_a_comment() -> None:
    assert undocumented_keys(VALUES_TEXT) == []


def test_the_comment_check_catches_an_undocumented_key() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- nested documented\n  c: 2\n  d: 3\n"
    assert undocumented_keys(text) == ["line 3: b", "line 6: d"]


def test_default_values_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        if sub.get("additionalProperties") is False:
            paths |= _schema_paths(sub, path + ".")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.add(path)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            paths |= _value_paths(value, sub, path + ".")
    return paths


def test_schema_describes_exactly_the_documented_values() -> None:
    schema_paths = _schema_paths(SCHEMA) - {"global", "resources.claims"}
    assert _value_paths(VALUES, SCHEMA) == schema_paths


def test_schema_is_strict_and_every_property_is_described() -> None:
    def walk(schema: dict[str, Any], path: str) -> None:
        properties = schema.get("properties")
        if properties is not None:
            assert schema.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
            for key, sub in properties.items():
                assert sub.get("description"), f"{path}{key} has no description"
                walk(sub, f"{path}{key}.")

    walk(SCHEMA, "")


def test_schema_rejects_unknown_and_mistyped_values() -> None:
    for bad in ({"replicaCount": 2}, {"image": {**VALUES["image"], "pullPolicy": "Sometimes"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**VALUES, **bad}, SCHEMA)


def test_chart_crds_are_an_exact_copy_of_the_generated_crds() -> None:
    generated = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    copied = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert generated, "crds/ holds no generated CRD (run `make crds`)"
    assert copied == generated, "charts/dualpath-operator/crds differs from crds/ (run `make crds`)"
