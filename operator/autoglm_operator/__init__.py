"""autoglm operator: reconciles AutoGLMDeployment resources.

handlers (kopf wiring) → reconcile (level-based; Reconciler schedules it) → builders (pure) and
kube (the one module that talks to the API). models: typed spec; settings: AUTOGLM_OPERATOR_*;
conditions: metav1.Condition helpers. Run it with the `autoglm-operator` console script (main).
"""
