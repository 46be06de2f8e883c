"""Benchmarks must time the native kernels: refuse to run on a pyaccel without
them (e.g. the source tree shadowing the installed wheel under `python -m`)."""
import pytest

import pyaccel
from pyaccel import _native


def pytest_configure(config):
    if not _native.available():
        raise pytest.UsageError(
            f"pyaccel at {pyaccel.__file__} has no native library ({_native.load_error()}); "
            "install the wheel and run `pytest bench/` (not `python -m pytest`) from the repo root")
