"""``pyaccel.backend_info()``: what runs here, and why."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from typing import Optional

import torch

from pyaccel import _native


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What pyaccel will run on this machine.

    Attributes:
        native_loaded: the C++ SIMD library (pyaccel._C) is loaded.
        native_error: why it is not loaded (None when it is).
        cpu_isa: ISA the CPU kernels use: avx512_amx | avx512_icl | avx512_vnni | avx512 | avx_vnni | avx2 | portable | none.
        cpu_isa_detected: best ISA the CPU supports.
        isa_override: value of PYACCEL_CPU_ISA (it can only lower the choice), or None.
            The native library reads it once, at its first use; the text form
            says when the value is not the cap in effect (set later, unknown,
            or changed by ``pyaccel._native.isa_cap``).
        isa_cap: the cap in effect in the native library (None: none, or no library).
        vex_vnni_built: the library holds the VEX (AVX-VNNI) builds of the avx_vnni
            level's kernels (the assembler knew AVX-VNNI); else only their EVEX twins.
        amx_permission: the OS's grant of the AMX tile state to this process:
            "granted", "refused" or "not asked" (asked when the avx512_amx level
            is first selected); None without the native library.
        cpu_tuning: the core family whose kernel variants run where an op has
            two of one ISA level ("intel" or "amd"; see ``pyaccel._native.TUNINGS``):
            the CPU's vendor's unless PYACCEL_CPU_TUNING or
            ``pyaccel._native.cpu_tuning`` says otherwise; None without the library.
        cpu_intel: the CPU's vendor is Intel (CPUID "GenuineIntel").
        backend_override: value of PYACCEL_BACKEND, or None.
        int8_kernel: the int8 GEMM micro-kernel in use.
        kernels: every op family's CPU micro-kernel in use now (int8, int8_a7,
            sparse24, sparse24_int8, block_sparse, block_sparse_int8, dws, binary
            -> name, as ``pyaccel._C.kernel_params()`` reports them); empty
            without the native library.
        cpu_features: CPUID flags that matter to pyaccel (amx_int8: AMX-INT8 with the
            OS's tile state enabled, in a library built with AMX).
        threads: threads the CPU kernels use (torch.get_num_threads()).
        triton_version: installed Triton, or None.
        cuda_device: name of CUDA device 0, or None.
    """

    native_loaded: bool
    native_error: Optional[str]
    cpu_isa: str
    cpu_isa_detected: str
    isa_override: Optional[str]
    backend_override: Optional[str]
    int8_kernel: Optional[str]
    cpu_features: dict
    threads: int
    triton_version: Optional[str]
    cuda_device: Optional[str]
    kernels: dict = dataclasses.field(default_factory=dict)
    isa_cap: Optional[str] = None
    vex_vnni_built: bool = False
    amx_permission: Optional[str] = None
    cpu_tuning: Optional[str] = None
    cpu_intel: bool = False

    def _override_text(self) -> str:
        env = self.isa_override
        if not env:
            if self.native_loaded and self.isa_cap and self.isa_cap != _native.ISA_LADDER[0]:
                return f"PYACCEL_CPU_ISA=unset; cap {self.isa_cap} set at run time (pyaccel._native.isa_cap)"
            return "PYACCEL_CPU_ISA=unset"
        if env.strip().lower() not in _native.ISA_LADDER:
            return f"PYACCEL_CPU_ISA={env}: ignored, not one of {', '.join(_native.ISA_LADDER)}"
        if self.native_loaded and (self.isa_cap or _native.ISA_LADDER[0]) != env.strip().lower():
            return (f"PYACCEL_CPU_ISA={env}: not in effect (read once, at the library's first use; "
                    f"cap now {self.isa_cap or 'none'})")
        return f"PYACCEL_CPU_ISA={env}"

    def _tuning_text(self) -> str:
        env = os.environ.get("PYACCEL_CPU_TUNING")
        if not env:
            return "PYACCEL_CPU_TUNING=unset"
        if env.strip().lower() not in _native.TUNINGS:
            return f"PYACCEL_CPU_TUNING={env}: ignored, not one of {', '.join(_native.TUNINGS)}"
        return f"PYACCEL_CPU_TUNING={env}"

    def __str__(self) -> str:
        native = "loaded" if self.native_loaded else f"NOT loaded ({self.native_error})"
        feats = ", ".join(k for k, v in self.cpu_features.items() if v is True) or "-"
        lines = [
            f"pyaccel native library   : {native}",
            f"CPU ISA in use           : {self.cpu_isa} (detected {self.cpu_isa_detected}; "
            f"{self._override_text()})",
            f"int8 GEMM kernel         : {self.int8_kernel or 'reference (PyTorch)'}",
            *([f"CPU tuning               : {self.cpu_tuning} (vendor {'Intel' if self.cpu_intel else 'not Intel'}; "
               f"{self._tuning_text()})"] if self.cpu_tuning else []),
            *(f"{(op + ' kernel'):<25}: {name}" for op, name in self.kernels.items() if op != "int8"),
            f"CPU features             : {feats}",
            f"threads                  : {self.threads}",
            f"Triton                   : {self.triton_version or 'not installed'}",
            f"CUDA device              : {self.cuda_device or 'none'}",
        ]
        if self.cpu_isa == "avx_vnni":  # which encoding of vpdpbusd this CPU runs (see csrc/int8_gemm/README.md)
            vex = self.cpu_features.get("avx_vnni") and self.vex_vnni_built
            lines.insert(2, f"{'AVX-VNNI encoding':<25}: " + ("VEX (this CPU has AVX-VNNI)" if vex else
                            "EVEX twin (AVX-512 VNNI; " + ("the CPU lacks AVX-VNNI)" if self.vex_vnni_built else
                                                           "this build has no VEX form: assembler < binutils 2.36)")))
        if self.amx_permission == "refused":
            lines.insert(2, f"{'AMX':<25}: the OS refused this process the tile state "
                            "(arch_prctl ARCH_REQ_XCOMP_PERM): the int8 GEMM runs its avx512_icl kernel")
        if self.backend_override:
            lines.append(f"PYACCEL_BACKEND          : {self.backend_override}")
        return "\n".join(lines)


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def backend_info() -> BackendInfo:
    """Report what pyaccel runs here (native library, ISA, Triton, CUDA) and why."""
    C = _native.lib()
    if C is not None:
        info = C.cpu_info()
        # CPU (and OS) flags only: *_built say how the library was built, not what the CPU has
        feats = {k: v for k, v in info.items()
                 if isinstance(v, bool) and not k.endswith("_built") and k != "intel"}
        isa, detected, kernel = info["selected_isa"], info["detected_isa"], C.int8_kernel_name()
        cap = info["isa_cap"]  # avx512_amx, the top level, when no cap is set
        kernels = {op: p["name"] for op, p in C.kernel_params().items()}
    else:
        feats, isa, detected, kernel, kernels, cap = {}, "none", "unknown", None, {}, None
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return BackendInfo(
        native_loaded=C is not None,
        native_error=_native.load_error(),
        cpu_isa=isa,
        cpu_isa_detected=detected,
        isa_override=os.environ.get("PYACCEL_CPU_ISA") or None,
        backend_override=os.environ.get("PYACCEL_BACKEND") or None,
        int8_kernel=kernel,
        cpu_features=feats,
        isa_cap=cap,
        vex_vnni_built=bool(C is not None and info.get("avx_vnni_vex_built")),
        amx_permission=info.get("amx_permission") if C is not None else None,
        cpu_tuning=info.get("tuning") if C is not None else None,
        cpu_intel=bool(C is not None and info.get("intel")),
        threads=torch.get_num_threads(),
        triton_version=_triton_version(),
        cuda_device=cuda,
        kernels=kernels,
    )


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Keep glibc from handing large blocks back to the kernel after each free.

    With glibc's defaults, a module that returns a fresh multi-MB output next
    to other code that allocates and frees large buffers (torch's own convs)
    gets new pages from the kernel at every call, and page-faults on all of
    them: measured on Zen 4 (2 threads), XnorConv2d at 64@56 N = 8 took 212
    minor faults per call (1515 µs vs 1076 µs without them) and torch's fp32
    conv 1540 – 2770 (10.2 – 14.4 ms vs 8.4 – 9.2). This sets
    ``mallopt(M_MMAP_THRESHOLD, mmap_threshold)`` and
    ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (bytes) for the whole
    process, as the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables would (jemalloc or tcmalloc through LD_PRELOAD, which
    PyTorch's CPU tuning guide suggests, avoid the same faults). The cost:
    freed memory below the thresholds stays in the process.

    Returns True when glibc took both settings, False elsewhere (no glibc).
    Opt-in: pyaccel never calls it by itself.
    """
    import ctypes
    import ctypes.util

    if mmap_threshold < 0 or trim_threshold < 0:
        raise ValueError(f"mmap_threshold / trim_threshold: expected bytes >= 0, got {mmap_threshold}, "
                         f"{trim_threshold}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_trim_threshold,
                                                                                 int(trim_threshold)))
