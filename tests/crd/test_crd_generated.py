"""The CRD is generated from the typed models (crdgen.py): the committed files are current, and every
field of the models and of the CRD agree — checked against pydantic's own JSON schema, a code path
independent of the generator's walker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_operator import crdgen
from autoglm_operator.models import (
    DURATION,
    AutoGLMDeploymentSpec,
    AutoGLMDeploymentStatus,
    parse_duration,
    parse_model_uri,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / crdgen.OUTPUTS[0]).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("out", crdgen.OUTPUTS, ids=str)
def test_committed_crd_is_current(out: Path) -> None:
    assert (REPO / out).read_text() == crdgen.render(), f"{out} is not what the models say: run `make crd`"


def test_check_mode_fails_on_a_stale_copy(tmp_path: Path) -> None:
    for out in crdgen.OUTPUTS:
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out).write_text(crdgen.render())
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 0
    stale = tmp_path / crdgen.OUTPUTS[1]
    stale.write_text(stale.read_text().replace("default: 32", "default: 64"))
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1


# ------------------------------------------------------------------ field by field


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref and drop the `anyOf: [X, null]` pydantic writes for optional fields."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        kinds = [n for n in node["anyOf"] if n.get("type") != "null"]
        if len(kinds) == 1:
            node = {**_resolve(kinds[0], defs), **{k: v for k, v in node.items() if k != "anyOf"}}
    return node


_KIND = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean",
         "object": "object", "array": "array"}


def _facts(node: dict[str, Any]) -> dict[str, Any]:
    """What must agree, in one vocabulary (JSON Schema 2020 vs OpenAPI v3)."""
    out = {k: node[k] for k in ("type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
                                "minItems", "maxItems", "minProperties", "maxProperties", "description")
           if k in node}
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node["exclusiveMinimum"], bool):
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True  # JSON Schema 2020 form
    elif node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = True
    if "const" in node:
        out["enum"] = [node["const"]]
    if out.get("enum") and "type" not in out:
        out["type"] = "string"
    return out


def compare(py: dict[str, Any], crd: dict[str, Any], defs: dict[str, Any], path: str, errors: list[str]) -> None:
    py = _resolve(py, defs)
    if "anyOf" in py:  # int-or-string
        assert crd.get("x-kubernetes-int-or-string"), path
        return
    want, got = _facts(py), _facts(crd)
    for key in sorted(set(want) | set(got)):
        if key == "description" and key not in want:
            continue  # a model's docstring is the schema's description only for list items
        if want.get(key) != got.get(key):
            errors.append(f"{path}.{key}: models say {want.get(key)!r}, CRD says {got.get(key)!r}")
    if "default" in crd and "default" in py and crd["default"] != py["default"]:
        errors.append(f"{path}.default: models say {py['default']!r}, CRD says {crd['default']!r}")
    if py.get("type") == "object" and "properties" in py:
        props, crd_props = py["properties"], crd.get("properties", {})
        for name in sorted(set(props) | set(crd_props)):
            if name not in crd_props:
                errors.append(f"{path}.{name}: in the models, not in the CRD")
            elif name not in props:
                errors.append(f"{path}.{name}: in the CRD, not in the models")
            else:
                compare(props[name], crd_props[name], defs, f"{path}.{name}", errors)
        if sorted(py.get("required", [])) != sorted(crd.get("required", [])):
            errors.append(f"{path}.required: models say {py.get('required')}, CRD says {crd.get('required')}")
    if py.get("type") == "array":
        compare(py["items"], crd["items"], defs, f"{path}[]", errors)
    if isinstance(py.get("additionalProperties"), dict):
        compare(py["additionalProperties"], crd["additionalProperties"], defs, f"{path}{{}}", errors)


@pytest.mark.parametrize("model,key", [(AutoGLMDeploymentSpec, "spec"), (AutoGLMDeploymentStatus, "status")])
def test_every_field_of_the_models_and_the_crd_agree(schema, model, key) -> None:
    py = model.model_json_schema(by_alias=True)
    errors: list[str] = []
    compare(py, schema["properties"][key], py.get("$defs", {}), f".{key}", errors)
    assert not errors, "\n".join(errors)


def test_the_field_walk_catches_a_drift(schema) -> None:
    drifted = yaml.safe_load(yaml.safe_dump(schema["properties"]["spec"]))
    drifted["properties"]["runtime"]["properties"]["maxQueue"]["maximum"] = 10
    drifted["properties"]["rollout"]["properties"]["extra"] = {"type": "string"}
    py = AutoGLMDeploymentSpec.model_json_schema(by_alias=True)
    errors: list[str] = []
    compare(py, drifted, py["$defs"], ".spec", errors)
    assert errors == [
        ".spec.rollout.extra: in the CRD, not in the models",
        ".spec.runtime.maxQueue.maximum: models say 1000000, CRD says 10",
    ]


# ------------------------------------------------------------------ grammars: the CEL/pattern and Python agree

URIS = [
    "pvc://model-store/glm", "pvc://model-store/a/b", "pvc://model-store", "pvc://model-store/", "pvc://Model/x",
    "file:///models/tiny", "file:///", "file://models", "hf://THUDM/glm-4-9b-chat", "hf://a/b@v1.0",
    "hf://a/b@", "hf://THUDM", "hf://a/b/c", "hf://a b/c", "hf://a@x/b", "s3://bucket/glm", "",
]


def _cel_regex(schema: dict[str, Any]) -> str:
    rule = schema["properties"]["spec"]["properties"]["model"]["properties"]["uri"]["x-kubernetes-validations"][0]
    m = re.fullmatch(r"self\.matches\(r'(.*)'\)", rule["rule"])
    assert m, rule
    return m[1]


@pytest.mark.parametrize("uri", URIS)
def test_model_uri_grammar_is_the_same_in_the_crd_and_the_operator(schema, uri: str) -> None:
    admitted = re.fullmatch(_cel_regex(schema), uri, re.ASCII) is not None  # RE2 and re agree on this grammar
    try:
        parse_model_uri(uri)
        parsed = True
    except ValueError:
        parsed = False
    assert admitted == parsed, uri


@pytest.mark.parametrize("text", ["30s", "1m30s", "500ms", "1.5h", "1h30m", "", "30", "s", "1d", "٣s", "1 s", "1.s"])
def test_duration_grammar_is_the_same_in_the_crd_and_the_operator(schema, text: str) -> None:
    pattern = schema["properties"]["spec"]["properties"]["rollout"]["properties"]["steps"]["items"]["properties"][
        "pause"]["pattern"]
    assert pattern == DURATION
    admitted = re.fullmatch(pattern, text, re.ASCII) is not None
    try:
        parse_duration(text)
        parsed = True
    except ValueError:
        parsed = False
    assert admitted == parsed, text
