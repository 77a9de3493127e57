"""The only package that talks to the Kubernetes API: gather, server-side apply, events."""
