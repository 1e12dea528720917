"""The scripts of ``benchmarks/`` and ``benchmarks/diagnostics/`` (not packages) imported as
modules, for their tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` (or ``benchmarks/diagnostics/<name>.py``) loaded as module
    ``name``."""
    path = BENCHMARKS / f"{name}.py"
    if not path.exists():
        path = BENCHMARKS / "diagnostics" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
