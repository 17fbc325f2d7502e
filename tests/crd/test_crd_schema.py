"""Fast checks of the AutoGLMDeployment CRD file, without a cluster.

The apiserver enforces the schema (tests/crd/test_crd_validation.py); these catch what it does not:
a field without a description (useless `kubectl explain`), a list CEL cannot bound, an example using
a field the schema would prune, a printer column pointing nowhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "autoglm.io_autoglmdeployments.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd) -> dict[str, Any]:
    (v,) = crd["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def schema(version) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, schema) for every schema node below ``node``, itself included."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_names(crd):
    assert crd["metadata"]["name"] == "autoglmdeployments.autoglm.io"
    names = crd["spec"]["names"]
    assert names["kind"] == "AutoGLMDeployment"
    assert names["plural"] == "autoglmdeployments"
    assert names["singular"] == "autoglmdeployment"
    assert names["shortNames"] == ["agd"]
    assert names["categories"] == ["autoglm"]
    assert crd["spec"]["scope"] == "Namespaced"


def test_one_served_storage_version(version):
    assert version["name"] == "v1alpha1"
    assert version["served"] and version["storage"]


def test_every_property_has_a_description(schema):
    missing = [
        path
        for path, node in walk(schema)
        # The apiserver allows nothing but name/generateName under metadata (not even a description).
        if path not in ("", ".metadata") and not path.endswith("{}") and not str(node.get("description", "")).strip()
    ]
    assert not missing, f"properties without a description: {missing}"


def test_every_spec_list_is_bounded(schema):
    # CEL cost estimates need maxItems; an unbounded user-controlled list also invites abuse.
    unbounded = [p for p, n in walk(schema["properties"]["spec"], ".spec") if n.get("type") == "array" and "maxItems" not in n]
    assert not unbounded, f"arrays without maxItems: {unbounded}"


def test_every_cel_rule_has_a_message(schema):
    for path, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message") or rule.get("messageExpression"), f"{path}: {rule['rule']}"


def _has_path(schema: dict[str, Any], json_path: str) -> bool:
    node = schema
    for part in json_path.lstrip(".").split("."):
        props = node.get("properties")
        if part == "metadata" and node is schema:
            return True  # standard ObjectMeta
        if not props or part not in props:
            return False
        node = props[part]
    return True


def test_printer_columns(version, schema):
    columns = {c["name"].upper(): c for c in version["additionalPrinterColumns"]}
    for name in ("READY", "PHASE", "VERSION", "CANARY", "WEIGHT", "AGE"):
        assert name in columns, name
    for c in columns.values():
        assert _has_path(schema, c["jsonPath"]), c
    default_columns = [c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == ["READY", "PHASE", "VERSION", "CANARY", "WEIGHT", "AGE"]


def test_scale_subresource_paths_exist(version, schema):
    scale = version["subresources"]["scale"]
    assert "status" in version["subresources"]
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert _has_path(schema, scale[key]), scale[key]
    assert schema["properties"]["status"]["properties"]["selector"]["type"] == "string"


def unknown_fields(value: Any, node: dict[str, Any], path: str) -> Iterator[str]:
    """Paths in ``value`` that the schema ``node`` does not declare (the apiserver would prune them)."""
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string"):
        return
    if isinstance(value, dict):
        props = node.get("properties")
        extra = node.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                yield from unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                yield from unknown_fields(v, extra, f"{path}.{k}")
            else:
                yield f"{path}.{k}"
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from unknown_fields(item, node.get("items", {}), f"{path}[{i}]")


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu.yaml", "glm4-9b-gpu.yaml", "autoglm-phone-9b.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_uses_only_schema_fields(example, schema):
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "autoglm.io/v1alpha1"
        assert doc["kind"] == "AutoGLMDeployment"
        assert len(doc["metadata"]["name"]) <= 52
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        assert not list(unknown_fields(body, schema, "")), example.name


def test_walker_finds_unknown_fields(schema):
    bad = {"spec": {"model": {"uri": "file:///m", "nmae": "x"}, "runtime": {"env": [{"name": "A", "vale": "1"}]}}}
    assert list(unknown_fields(bad, schema, "")) == [".spec.model.nmae", ".spec.runtime.env[0].vale"]
