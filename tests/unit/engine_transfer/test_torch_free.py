"""The engine's config, KV and transfer core import without torch (the operator and simulator rely on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

TORCH_FREE = (
    "dualpath_engine.config",
    "dualpath_engine.kv.hashing",
    "dualpath_engine.kv.index",
    "dualpath_engine.kv.layout",
    "dualpath_engine.kv.storage",
    "dualpath_engine.kv.filestore",
    "dualpath_engine.kv.readqueue",
    "dualpath_engine.transfer.base",
    "dualpath_engine.transfer.host",
    "dualpath_engine.transfer.tcp",
    "dualpath_engine.transfer.sysfs",
    "dualpath_engine.transfer.manager",
    "dualpath_engine.transfer.factory",
)


def test_core_modules_never_load_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"torch loaded by: {result.stdout.strip()}"


def test_operator_side_config_import_is_light() -> None:
    code = (
        "import sys, dualpath_engine.config\n"
        "print(sorted(m for m in ('numpy', 'torch', 'aiohttp') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
