"""The AVX-VNNI level (vpdpbusd on ymm): the int8, 2:4 int8 and block-sparse int8 GEMMs.

Each kernel is one source built twice in one file (qs8_gemm_6x16c4_avxvnni.cpp,
qs8_s24_gemm_4x16_avx2.cpp, qs8_bsr_gemm_avx2.cpp; the peak probe in peak_avx2.cpp):
"{vex} vpdpbusd" (AVX-VNNI) in one function and the EVEX "vpdpbusd" in its twin.
The `isa` fixture includes avx_vnni, so the whole int8 and 2:4 / block-sparse
int8 suites run the level on every machine that has it: the VEX build on CPUs
with AVX-VNNI (Alder Lake and later client cores, Sapphire Rapids and later
Xeons), the EVEX twin on AVX-512 VNNI CPUs without it (Zen 4, Ice Lake),
capped at avx_vnni. This file checks
the other half: the shipped library's two functions of each kernel are the same instructions
apart from that one encoding, and the VEX one uses nothing beyond AVX2 +
AVX-VNNI (no EVEX prefix, no zmm, no mask or upper registers).
"""
import re
import shutil
import subprocess

import pytest
import torch

from _helpers import num_threads
import pyaccel
from pyaccel import _native, ops, reference

_NOPS = re.compile(r"^(?:(?:cs |ds |data16 )*nop[wlq]?\b|xchg\s+%ax,%ax$)")


def _library_path():
    import importlib.util
    return importlib.util.find_spec("pyaccel._C").origin


def _objdump_knows_avx_vnni() -> bool:
    """GNU objdump decodes {vex} vpdpbusd from binutils 2.36 on."""
    out = subprocess.run(["objdump", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out.splitlines()[0] if out else "")
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2, 36)


def _function(so: str, qualified: str):
    """[(raw bytes, normalized instruction)] of the function `qualified` (a
    demangled name such as pyaccel::peak::int8_avxvnni_vex) with any parts GCC
    split off (.cold, .part): branch targets inside it become ADDR, calls out
    keep the callee's name."""
    syms = subprocess.run(["nm", so], capture_output=True, text=True, check=True).stdout.split()
    demangled = subprocess.run(["c++filt"], input="\n".join(syms), capture_output=True, text=True,
                               check=True).stdout.split("\n")
    mains = [m for m, d in zip(syms, demangled) if d.startswith(qualified + "(") and "." not in m]
    assert len(mains) == 1, f"{qualified}: symbols {mains} (is the library stripped?)"
    main = mains[0]
    own = sorted(m for m in syms if m == main or m.startswith(main + "."))
    insns = []
    for sym in own:
        out = subprocess.run(["objdump", "-d", "--no-addresses", "--insn-width=16", f"--disassemble={sym}", so],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split("\t")[1:]  # "\t<bytes>\t<instruction>"
            if len(parts) < 2 or not re.fullmatch(r"\s*([0-9a-f]{2} ?)+\s*", parts[0]):
                continue
            text = " ".join(" ".join(parts[1:]).split())
            text = re.sub(r"#.*", "", text).strip()
            # a target inside the function (or its split parts) -> ADDR; a callee keeps its name
            text = re.sub(r"(?:[0-9a-f]+ )?<([^>+]*)(?:\+0x[0-9a-f]+)?>",
                          lambda mt: "ADDR" if mt.group(1) in own else f"<{mt.group(1)}>", text)
            text = re.sub(r"-?0x[0-9a-f]+\(%rip\)", "RIP", text)  # constant-pool offsets
            if text:
                insns.append((parts[0].split(), text))
    assert insns, f"no instructions disassembled for {main}"
    return insns


# every function of the level, each built as a VEX function and its EVEX twin
KERNELS = ["int8_gemm::qs8_gemm_6x16c4_avxvnni", "sparse24_int8::qs8_s24_gemm_4x16_avxvnni",
           "block_sparse::qs8_bsr_gemm_avxvnni", "block_sparse::qs8_bsr_slabs_avxvnni",
           "block_sparse::qs8_bsr_rows_avxvnni", "peak::int8_avxvnni"]


@pytest.fixture(scope="module", params=KERNELS)
def builds(request):
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.lib().cpu_info()["avx_vnni_vex_built"]:
        pytest.skip("built without the VEX form (the assembler predates AVX-VNNI: GNU as < 2.36)")
    if not (shutil.which("objdump") and shutil.which("nm") and shutil.which("c++filt")):
        pytest.skip("binutils (objdump, nm, c++filt) not installed")
    if not _objdump_knows_avx_vnni():
        pytest.skip("objdump older than binutils 2.36 cannot decode AVX-VNNI")
    so = _library_path()
    name = "pyaccel::" + request.param
    return _function(so, name + "_vex"), _function(so, name + "_evex")


def test_vex_build_is_the_tested_evex_twin_but_for_the_encoding(builds):
    vex, evex = builds

    def body(fn):
        return [t.replace("{vex} ", "") for _, t in fn if not _NOPS.match(t)]  # alignment padding differs

    assert body(vex) == body(evex)
    dp_vex = [b for b, t in vex if "vpdpbusd" in t]
    dp_evex = [b for b, t in evex if "vpdpbusd" in t]
    assert len(dp_vex) == len(dp_evex) >= 2
    assert all(b[0] == "c4" for b in dp_vex), "VEX vpdpbusd starts with the 3-byte VEX prefix c4"
    assert all(b[0] == "62" for b in dp_evex), "EVEX vpdpbusd starts with 62"


def test_vex_build_needs_only_avx2_and_avx_vnni(builds):
    vex, _ = builds
    for raw, text in vex:
        assert raw[0] != "62", f"EVEX-encoded instruction in the AVX-VNNI build: {text}"
        assert not re.search(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b", text), text


def test_level_is_chosen_only_where_it_runs():
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    info = _native.lib().cpu_info()
    usable = "avx_vnni" in info["usable_isas"]
    assert usable == ((info["avx_vnni"] and info["avx_vnni_vex_built"]) or (info["avx512_vnni"] and info["avx512vl"]))
    with _native.isa_cap("avx_vnni") as used:
        if usable:
            assert used == "avx_vnni" and pyaccel.backend_info().int8_kernel == "qs8_gemm_6x16c4_avxvnni"
        else:  # Zen 3, Skylake-X: the AVX2 kernels
            assert used in ("avx2", "portable")
    if usable:  # backend_info says which encoding runs
        with _native.isa_cap("avx_vnni"):
            text = str(pyaccel.backend_info())
        vex = info["avx_vnni"] and info["avx_vnni_vex_built"]
        line = next(ln for ln in text.splitlines() if ln.startswith("AVX-VNNI encoding"))
        assert line.split(": ", 1)[1].startswith("VEX" if vex else "EVEX twin"), text
    # avx512 stands for AVX-512 without VNNI (Skylake-X): no VNNI kernel of any
    # op may run there, even on a CPU that has VNNI (a Zen 4 capped at avx512)
    if _native.isa_supported("avx512"):
        with _native.isa_cap("avx512"):
            kernels = pyaccel.backend_info().kernels
        assert not any("vnni" in name for name in kernels.values()), kernels


def test_same_bits_as_the_other_levels(gen):
    """One checkpoint, one answer: the ymm VNNI kernel gives the bits of the
    zmm VNNI, AVX2 and portable kernels, with 8- and 7-bit activations, on
    row-path and tile row counts."""
    from pyaccel import ops
    from pyaccel.formats.int8 import quantize_weight_per_channel

    if not _native.isa_supported("avx_vnni"):
        pytest.skip("this CPU cannot run the avx_vnni level (no AVX-VNNI, no AVX-512 VNNI)")
    w = quantize_weight_per_channel(torch.randn(130, 1030, generator=gen))
    b = torch.randn(130, generator=gen)
    for m in (1, 2, 3, 4, 5, 7, 37):
        x = torch.randn(m, 1030, generator=gen) * 3
        for bits in (8, 7):
            outs = {}
            for isa in ("avx_vnni", "avx512_vnni", "avx2", "portable"):
                if _native.isa_supported(isa):
                    with _native.isa_cap(isa):
                        outs[isa] = ops.int8_linear_cpu(x, w.values, w.scale, b, None, act_bits=bits)
            for isa, y in outs.items():
                assert torch.equal(y, outs["avx_vnni"]), (m, bits, isa)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [8, 7])
def test_row_path_rows_on_huge_layers(gen, bits, threads):
    """On layers of >= row_path_huge_weights weights the k-blocked row path
    serves up to row_path_rows_huge rows (4 elsewhere), the 6-row tile more:
    exact on both sides of each switch, with a partial last panel and k-block
    and the extreme activations (q + 128 = 255 and 1), on one and two threads
    (16 panels: each call gets all the rows)."""
    if not _native.isa_supported("avx_vnni"):
        pytest.skip("this CPU cannot run the avx_vnni level (no AVX-VNNI, no AVX-512 VNNI)")
    n, k = 1000, 4196  # >= 4 Mi weights
    qmax = 127 if bits == 8 else 63
    w = (torch.randn(n, k, generator=gen) * 40).round().clamp(-127, 127).to(torch.int8)
    w[:, :4] = torch.tensor([127, -127, 127, -127], dtype=torch.int8)
    with _native.isa_cap("avx_vnni"), num_threads(threads):
        p = _native.lib().kernel_params()["int8" if bits == 8 else "int8_a7"]
        assert p["row_path_rows"] == 4 and p["row_path_rows_huge"] == 8 and p["row_path_huge_weights"] <= n * k
        for m in (1, 4, 5, 8, 9):
            x = torch.randint(-qmax, qmax + 1, (m, k), generator=gen).float()
            x[:, 0], x[:, 1] = qmax, -qmax
            y = ops.int8_linear_cpu(x, w, torch.ones(n), None, None, act_bits=bits)
            ref = reference.int8_matmul_exact(x.to(torch.int8), w).float()
            assert torch.equal(y, ref), (m, (y - ref).nonzero()[:1].tolist())


def test_sparse24_int8_switch_follows_the_cap(gen):
    """Sparse24Int8Linear switches to the dense int8 kernel at the row counts
    the 2:4 kernel selected at call time names (2 - 7 at avx_vnni on a small
    layer), whatever level
    was selected when the module was built; backend() says so."""
    from pyaccel.formats import sparse24 as s24
    from pyaccel.nn import Sparse24Int8Linear

    if not _native.isa_supported("avx_vnni"):
        pytest.skip("this CPU cannot run the avx_vnni level (no AVX-VNNI, no AVX-512 VNNI)")
    lin = torch.nn.Linear(72, 40)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    with _native.isa_cap("avx2"):  # built where no switch applies
        mod = Sparse24Int8Linear.from_float(lin)
        assert "dense" not in mod.backend()
    x = torch.randn(3, 72, generator=gen)
    with _native.isa_cap("avx_vnni"):
        y = mod(x)
        assert mod._dense is not None and "dense qs8_gemm_6x16c4_avxvnni at 2 - 7 rows" in mod.backend(), mod.backend()
        y1 = mod(x[:1])  # one row: the 2:4 kernel
    with _native.isa_cap("avx2"):
        assert "dense" not in mod.backend()
        assert torch.equal(mod(x), y) and torch.equal(mod(x[:1]), y1)
