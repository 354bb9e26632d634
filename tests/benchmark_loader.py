"""benchmarks/ scripts imported as modules, for their tests. Imports nothing heavy, so that the GPU tests copied to a
device machine without tests/conftest.py (which needs fsspec and Prefect) can use it too."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (the folder is not a package): its functions, testable."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
