"""CEL validation rules (x-kubernetes-validations) as values the models declare and crdgen.py writes."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Cel:
    """One x-kubernetes-validations rule (message or messageExpression, fieldPath, reason)."""

    rule: str
    message: str | None = None
    message_expression: str | None = None
    field_path: str | None = None
    reason: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out = {
            "rule": self.rule,
            "message": self.message,
            "messageExpression": self.message_expression,
            "fieldPath": self.field_path,
            "reason": self.reason,
        }
        return {k: v for k, v in out.items() if v is not None}


def cel(*rules: Cel) -> dict[str, Any]:
    """``json_schema_extra`` (or ``crd_extra``) carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}
