"""Shared fixtures. Tests run against the *installed* pyaccel (CI installs the
wheel; pytest runs with --import-mode=importlib so the source tree's pyaccel/
does not shadow it)."""
import os

import torch

# Triton kernels run in the interpreter when there is no GPU. Set before
# anything imports triton (pyaccel imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyaccel  # noqa: E402
from pyaccel import _native  # noqa: E402

ISAS = _native.ISA_LADDER

if os.environ.get("PYACCEL_REQUIRE_INSTALLED") == "1":
    # CI tests the installed wheel, never the source tree
    assert "site-packages" in pyaccel.__file__, f"testing {pyaccel.__file__}, not the installed wheel"
    assert _native.available(), f"native library missing from the wheel: {_native.load_error()}"


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per CPU ISA path; skips the ones this CPU lacks."""
    name = request.param
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.isa_supported(name):
        pytest.skip(f"this CPU lacks {name} (detected {pyaccel.backend_info().cpu_isa_detected})")
    with _native.isa_cap(name) as used:
        if name == "avx512_amx" and used != name:  # listed until asked; the OS may refuse the tile state
            pytest.skip(f"AMX tile state: {_native.lib().cpu_info()['amx_permission']} by the OS")
        assert used == name
        yield name


@pytest.fixture(params=_native.TUNINGS)
def tuning(request):
    """Runs the test once per core family's kernel variants (both run on any CPU)."""
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    with _native.cpu_tuning(request.param) as used:
        assert used == request.param
        yield used


@pytest.fixture
def gen():
    """A seeded generator, different per test (fresh random data, reproducible)."""
    import zlib

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)
