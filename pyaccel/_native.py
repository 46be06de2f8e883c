"""Loading the native CPU library (``pyaccel._C``) without ever failing import.

The extension is plain C++ (no libtorch): it takes data pointers, sizes and
strides. If it cannot be loaded, pyaccel still imports and every op falls back
to its pure-PyTorch reference; :func:`pyaccel.backend_info` says why.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import torch  # noqa: F401  (load torch's libgomp first: the extension then shares it)

ISA_LADDER = ("avx512_amx", "avx512_icl", "avx512_vnni", "avx512", "avx_vnni", "avx2", "portable")
"""CPU ISAs from best to worst. ``PYACCEL_CPU_ISA`` may only lower the choice.

``avx512_amx`` is ``avx512_icl`` plus AMX-INT8 (Sapphire Rapids and later Xeons,
where the OS grants the tile state): only the int8 GEMM has an AMX kernel, every
other op runs its ``avx512_icl`` kernel there.

``avx_vnni`` (vpdpbusd on ymm) runs on CPUs with AVX-VNNI (VEX encoding:
Alder Lake and later Intel client cores, Sierra Forest, Sapphire Rapids) and on
AVX-512 VNNI CPUs without it (the same kernels EVEX-encoded: Ice Lake, Zen 4);
an AVX-512 CPU without VNNI (Skylake-X) cannot run it, and a cap of
``avx_vnni`` there selects ``avx2``."""

_C = None
_load_error: Optional[str] = None

_env_backend = os.environ.get("PYACCEL_BACKEND", "")
if _env_backend.lower() == "reference":
    _load_error = "disabled by PYACCEL_BACKEND=reference"
else:
    if _env_backend:
        warnings.warn(f"PYACCEL_BACKEND={_env_backend!r} is not 'reference' (the one value it takes); ignored",
                      RuntimeWarning, stacklevel=2)
    try:
        from pyaccel import _C  # type: ignore[attr-defined,no-redef]
    except Exception as exc:  # ImportError, OSError (missing libgomp), ...
        _C = None
        _load_error = f"{type(exc).__name__}: {exc}"

TUNINGS = ("intel", "amd")
"""Core families some ops have kernel variants for (one ISA level, different
port layouts): ``intel`` (Golden Cove and the like: shuffles and scalar ALU ops
share the FMA ports) and ``amd`` (Zen 3 / Zen 4). The CPU's vendor picks one
(``amd`` for any non-Intel CPU); ``PYACCEL_CPU_TUNING`` or :func:`cpu_tuning`
override it."""

for _var, _allowed in (("PYACCEL_CPU_ISA", ISA_LADDER), ("PYACCEL_CPU_TUNING", TUNINGS)):
    _value = os.environ.get(_var, "")
    if _value and _value.strip().lower() not in _allowed:  # the native library ignores it too
        warnings.warn(f"{_var}={_value!r} is not one of {_allowed}; ignored", RuntimeWarning, stacklevel=2)

def lib():
    """The native module, or None when it is unavailable (see :func:`load_error`)."""
    return _C


def available() -> bool:
    return _C is not None


def load_error() -> Optional[str]:
    return _load_error


def selected_isa() -> str:
    """The CPU ISA the native kernels use now ('none' without the native library)."""
    return _C.selected_isa() if _C is not None else "none"


def set_isa_cap(name: str) -> None:
    """Cap the ISA the native kernels may use (one of ISA_LADDER, any case;
    '' removes the cap).

    A cap only lowers the choice: the level used is the best one at or below
    the cap that the CPU can run (a cap above the CPU's ISA leaves its best one
    in use; ``avx_vnni`` on a CPU without VNNI gives ``avx2``). Mainly for
    tests and benchmarks.
    """
    if not isinstance(name, str):
        raise TypeError(f"isa: expected a str (one of {ISA_LADDER} or ''), got {type(name).__name__}")
    if name and name.lower() not in ISA_LADDER:
        raise ValueError(f"isa: expected one of {ISA_LADDER} or '', got {name!r}")
    name = name.lower()
    if _C is None:
        raise RuntimeError(f"pyaccel native library not loaded ({_load_error})")
    _C.set_isa_cap(name)


def isa_supported(name: str) -> bool:
    """True when this CPU can run kernels of ISA `name` (one of ISA_LADDER, any
    case, as set_isa_cap takes it); TypeError / ValueError naming isa otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"isa: expected a str (one of {ISA_LADDER}), got {type(name).__name__}")
    if name.lower() not in ISA_LADDER:
        raise ValueError(f"isa: expected one of {ISA_LADDER}, got {name!r}")
    if _C is None:
        return False
    return name.lower() in _C.cpu_info()["usable_isas"]


@contextlib.contextmanager
def isa_cap(name: str) -> Iterator[str]:
    """Run a block with the native kernels capped at ISA `name`; yields the ISA in use."""
    prev = _C.cpu_info()["isa_cap"] if _C is not None else ""
    set_isa_cap(name)
    try:
        yield selected_isa()
    finally:
        _C.set_isa_cap(prev)


def set_cpu_tuning(name: str) -> None:
    """Take the kernel variants tuned for core family `name` ('intel' or 'amd';
    '' goes back to the CPU vendor's). Process-wide (not per thread). Mainly for
    tests and benchmarks: both variants are correct on any CPU of their ISA level."""
    if not isinstance(name, str):
        raise TypeError(f"tuning: expected a str (one of {TUNINGS} or ''), got {type(name).__name__}")
    if name and name.lower() not in TUNINGS:
        raise ValueError(f"tuning: expected one of {TUNINGS} or '', got {name!r}")
    if _C is None:
        raise RuntimeError(f"pyaccel native library not loaded ({_load_error})")
    _C.set_cpu_tuning(name.lower())


@contextlib.contextmanager
def cpu_tuning(name: str) -> Iterator[str]:
    """Run a block with the kernel variants of core family `name`; yields it.
    Process-wide, like :func:`isa_cap`: other threads see the setting too.
    Afterwards the previous setting (an explicit one, or the vendor's) applies."""
    prev = _C.cpu_info()["tuning_override"] if _C is not None else ""
    set_cpu_tuning(name)
    try:
        yield _C.cpu_info()["tuning"]
    finally:
        _C.set_cpu_tuning(prev)
