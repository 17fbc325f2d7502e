"""autoglm runtime: continuous-batching OpenAI-compatible inference server."""
