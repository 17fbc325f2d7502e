"""autoglm operator: reconciles AutoGLMDeployment resources."""
