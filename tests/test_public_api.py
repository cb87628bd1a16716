"""Every name each package exports exists, and ``import monitor`` stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["monitor", "tuner"])
def test_every_exported_name_imports(package: str) -> None:
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert getattr(module, name) is not None, f"{package}.{name} is missing"


def test_import_monitor_does_not_load_heavy_libraries() -> None:
    code = (
        "import sys, monitor; heavy = {'torch', 'onnxruntime', 'evidently', 'sklearn'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
