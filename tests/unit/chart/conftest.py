"""Fixtures for the Helm chart tests: the helm binary and a renderer returning parsed manifests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "dualpath-operator"
KUBE_VERSION = "1.36.3"
"""The Kubernetes version of the local cluster (hack/versions.env); passed explicitly because a helm
built without ldflags assumes 1.20 (local-kubernetes.md section 5)."""
RELEASE = "dp"
NAMESPACE = "dualpath-system"


def _find_helm() -> str | None:
    candidates = [os.environ.get("HELM"), str(ROOT / ".dev" / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary; a missing helm fails the test (run `make tools`), never skips it."""
    found = _find_helm()
    if found is None:
        pytest.fail("helm not found: run `make tools` (links .dev/bin/helm) or set HELM=/path/to/helm")
    return found


HelmResult = subprocess.CompletedProcess[str]
Render = Callable[..., list[dict[str, Any]]]
RenderRaw = Callable[..., HelmResult]


@pytest.fixture
def render_raw(helm: str, tmp_path: Path) -> RenderRaw:
    """Run `helm template` with the given values; return the completed process (no check)."""

    def run(values: dict[str, Any] | None = None, *extra: str) -> HelmResult:
        args = [
            helm,
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ]
        if values is not None:
            values_file = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
            values_file.write_text(yaml.safe_dump(values))
            args += ["--values", str(values_file)]
        args += list(extra)
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)

    return run


@pytest.fixture
def render(render_raw: RenderRaw) -> Render:
    """Render the chart and return its documents (empty documents dropped); rendering must succeed."""

    def run(values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
        result = render_raw(values, *extra)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run
