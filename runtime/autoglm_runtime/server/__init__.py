"""The OpenAI-compatible HTTP server: protocol models, serving logic, a thin router, error mapping."""

from autoglm_runtime.server.api import create_app
from autoglm_runtime.server.serving import OpenAIServing, ServerState

__all__ = ["OpenAIServing", "ServerState", "create_app"]
