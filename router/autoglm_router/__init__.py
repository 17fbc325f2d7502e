"""autoglm's router: the OpenAI-aware gateway in front of a deployment's model pods (no torch)."""
