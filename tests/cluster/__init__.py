"""The local Kubernetes control plane used by tests and the demo (see harness.py)."""
