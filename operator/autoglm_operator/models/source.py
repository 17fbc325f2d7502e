"""spec.model: which weights, and where they come from (the model URI grammar and its parts)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from autoglm_runtime import defaults as runtime_defaults

from ..crdrules import Cel, cel
from .base import LABEL_VALUE, MODEL_URI, URI_FORMS, SpecModel


class ModelSpec(SpecModel):
    """The model to serve."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE,
        description=(
            "Model id served on the OpenAI-compatible API (the `model` field of requests and /v1/models). "
            "Default: metadata.name. Letters, digits, '-', '_' and '.', at most 63 characters (it is also "
            "used as a label value)."
        ),
    )
    uri: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Where the weights are: pvc://CLAIM/PATH (a PersistentVolumeClaim in this namespace, mounted "
            "read-only), file:///PATH (a directory on the node, mounted as a hostPath) or "
            "hf://ORG/NAME[@REVISION] (downloaded from the Hugging Face Hub by an init container into a "
            "cache volume)."
        ),
        json_schema_extra=cel(
            Cel(
                rule=f"self.matches(r'{re.sub(r'[(][?]P<[a-z]+>', '(', MODEL_URI)}')",  # groups are Python's
                message_expression=f"'uri must be {URI_FORMS}, got \"' + self + '\"'",
                reason="FieldValueInvalid",
            )
        ),
    )
    dtype: runtime_defaults.Dtype = Field(
        default="auto",
        description=(
            "Weight and activation dtype. auto takes the model's own (torch_dtype in its config), falling "
            "back to float32 on CPU."
        ),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        le=10485760,
        description=(
            "Longest sequence (prompt plus completion, in tokens) a request may use. Default: the model's own maximum."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parse_model_uri(v)  # raises ValueError with the CEL rule's message
        return v


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``scheme`` is pvc, file or hf."""

    scheme: Literal["pvc", "file", "hf"]
    claim: str = ""  # pvc: the PersistentVolumeClaim
    path: str = ""  # pvc: sub-path inside the claim; file: host path
    repo: str = ""  # hf: ORG/NAME
    revision: str = ""  # hf: optional @revision


def parse_model_uri(uri: str) -> ModelSource:
    """The parts of a model URI (the grammar ``MODEL_URI``, which the CRD's CEL rule also applies)."""
    m = re.fullmatch(MODEL_URI, uri, re.ASCII)
    if m is None:
        raise ValueError(f'uri must be {URI_FORMS}, got "{uri}"')
    if m["claim"]:
        return ModelSource("pvc", claim=m["claim"], path=m["path"].strip("/"))
    if m["repo"]:
        return ModelSource("hf", repo=m["repo"], revision=m["rev"] or "")
    return ModelSource("file", path="/" + m["file"].strip("/"))
