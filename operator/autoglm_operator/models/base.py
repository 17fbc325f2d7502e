"""What every part of the API shares: its identity, the grammars of its strings, the models' base class."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "autoglm.io"
VERSION = "v1alpha1"
PLURAL = "autoglmdeployments"
KIND = "AutoGLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
# metadata.name: it names the Service, and `{name}-{10-char hash}` the revision Deployments (≤ 63).
MAX_NAME_LENGTH = 52

# Grammars (Go's RE2 in the apiserver and Python's re agree on these; Python matches with re.ASCII).
LABEL_VALUE = "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
IMAGE_REPOSITORY = (
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]+)?/)?"
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$"
)
# pvc://CLAIM/PATH | file:///PATH | hf://ORG/NAME[@REVISION]; parse_model_uri reads the parts.
MODEL_URI = (
    r"^(pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/(?P<path>.+)"
    r"|file:///(?P<file>.*)"
    r"|hf://(?P<repo>[^/@\s]+/[^/@\s]+)(@(?P<rev>\S+))?)$"
)
URI_FORMS = "pvc://CLAIM/PATH, file:///PATH or hf://ORG/NAME[@REVISION]"
QUANTITY_RULE = "type(self) == int ? self > 0 : (isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))"

LabelValue = Annotated[str, StringConstraints(max_length=63)]


class SpecModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)
    # Class-level schema additions (CEL rules) for crdgen.py; never validated here.
    crd_extra: ClassVar[dict[str, Any]] = {}
