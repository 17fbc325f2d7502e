"""The AutoGLMDeployment API as typed models: the one source of its facts.

Every field's type, description, default, bounds, pattern and CEL rule is declared here once;
``crdgen.py`` generates the CRD's schema from these classes (``make crd``), and the operator parses
each object with them, so what the apiserver admits and what the operator acts on cannot drift.
Rules the operator also needs at run time are a ``Cel`` (for the apiserver) beside a Python check that
raises the same message.

One module per part of the spec (``source``, ``pod``, ``autoscaling``, ``access``, ``rollout``), the whole
spec in ``spec``, the status in ``status``; what the rest of the operator uses is re-exported here.
"""

from .access import AuthSpec, NetworkPolicySpec, OAuth2Spec, SecretKeyRef, SecretRef, TLSSpec
from .autoscaling import AutoscalingSpec, PrometheusRef
from .base import API_VERSION, DURATION, GROUP, KIND, MAX_NAME_LENGTH, MODEL_URI, PLURAL, VERSION, SpecModel
from .pod import EnvVar, ResourcesSpec, RuntimeSpec, Toleration
from .rollout import DEFAULT_STEPS, AnalysisSpec, GatewayRef, RolloutSpec, RolloutStep, parse_duration
from .router import RouterSpec
from .source import ModelSource, ModelSpec, parse_model_uri
from .spec import AutoGLMDeploymentSpec, InvalidSpec, ResolvedSpec, resolve_spec
from .status import AutoGLMDeploymentStatus

__all__ = [
    "API_VERSION",
    "DEFAULT_STEPS",
    "DURATION",
    "GROUP",
    "KIND",
    "MAX_NAME_LENGTH",
    "MODEL_URI",
    "PLURAL",
    "VERSION",
    "AnalysisSpec",
    "AuthSpec",
    "AutoGLMDeploymentSpec",
    "AutoGLMDeploymentStatus",
    "AutoscalingSpec",
    "EnvVar",
    "GatewayRef",
    "InvalidSpec",
    "ModelSource",
    "ModelSpec",
    "NetworkPolicySpec",
    "OAuth2Spec",
    "PrometheusRef",
    "ResolvedSpec",
    "ResourcesSpec",
    "RolloutSpec",
    "RolloutStep",
    "RouterSpec",
    "RuntimeSpec",
    "SecretKeyRef",
    "SecretRef",
    "SpecModel",
    "TLSSpec",
    "Toleration",
    "parse_duration",
    "parse_model_uri",
    "resolve_spec",
]
