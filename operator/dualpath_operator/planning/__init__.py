"""PURE planning: desired state, path weights, P/D ratio decisions and status, from spec + observation + now.

Imports no Kubernetes client, no Kopf, no aiohttp and no torch (import-linter enforces it).
"""
