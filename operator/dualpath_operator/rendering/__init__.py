"""PURE rendering: Kubernetes manifests (plain dicts) of every child object, from spec + plan."""
