"""Triton binary kernels (interpreter on CPU, or a real GPU) against the
pure-PyTorch reference: packing, popcount implicit-GEMM conv (exact zero
padding, one padding, groups, stride, dilation, 130 channels), linear on both
paths (popcount and int8 tl.dot); PTX for sm_80 and sm_90."""
import textwrap

import pytest
import torch

from _helpers import run_compile_script, triton_device
from pyaccel import reference_binary as rb
from pyaccel.formats import binary as bf

DEVICE = triton_device()
tk = pytest.importorskip("pyaccel.kernels.binary")


def _x(gen, *shape):
    x = torch.randn(*shape, generator=gen)
    x[x.abs() < 0.2] = 0.0
    return x


@pytest.mark.parametrize("c,groups", [(1, 1), (64, 1), (130, 1), (130, 2), (96, 3)])
def test_pack_matches_format(gen, c, groups):
    x = _x(gen, 37, c)
    got = tk.pack(x.to(DEVICE), groups).cpu()
    cg = c // groups
    want = bf.pack_bits_last((x < 0).reshape(37, groups, cg)).reshape(37, -1).contiguous().view(torch.int32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", [
    # c, oc, groups, k, s, p, d, mode, act
    (130, 33, 1, (3, 3), 1, 1, 1, "zeros", "none"),
    (64, 40, 2, (3, 3), 2, 1, 1, "zeros", "relu"),
    (20, 8, 1, (5, 3), 1, 2, 2, "ones", "hardtanh"),
    (3, 5, 1, (1, 1), 1, 0, 1, "zeros", "prelu"),
    (96, 66, 3, (3, 3), 1, 2, 1, "zeros", "none"),
], ids=str)
@pytest.mark.parametrize("path", ["popcount", "dot"])
def test_conv_matches_reference(gen, case, path):
    c, oc, groups, k, s, p, d, mode, act = case
    x, w = _x(gen, 2, c, 7, 6), _x(gen, oc, c // groups, *k)
    bits, wsum = bf.pack_conv_weight(w, groups)
    sc, sh, sl = torch.rand(oc, generator=gen) + 0.1, torch.randn(oc, generator=gen), torch.randn(oc, generator=gen)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    y = tk.conv2d(dev(x), dev(bits), dev(wsum), dev(sc), dev(sh), dev(sl), oc, k, s, p, d, groups, mode, act,
                  -0.4, 0.5, path=path)
    assert tk.last_path["conv"] == path
    ref = rb.binary_conv2d(x, w, sc, sh, s, p, d, groups, mode, act, (-0.4, 0.5), sl)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("path", ["popcount", "dot"])
@pytest.mark.parametrize("m,k,n", [(1, 130, 33), (5, 64, 64), (40, 200, 70)])
def test_linear_both_paths(gen, path, m, k, n):
    x, w = _x(gen, m, k), _x(gen, n, k)
    bits, _ = bf.pack_conv_weight(w, 1)
    sc = torch.rand(n, generator=gen)
    y = tk.linear(x.to(DEVICE), bits.to(DEVICE), sc.to(DEVICE), None, None, n, path=path)
    assert tk.last_path["linear"] == path
    assert torch.equal(y.cpu(), rb.binary_linear(x, w, sc, None))


def test_linear_picks_by_rows(gen):
    w = _x(gen, 8, 64)
    bits, _ = bf.pack_conv_weight(w, 1)
    tk.linear(_x(gen, 2, 64).to(DEVICE), bits.to(DEVICE), None, None, None, 8)
    assert tk.last_path["linear"] == "popcount"
    tk.linear(_x(gen, tk.POPCOUNT_MAX_M + 1, 64).to(DEVICE), bits.to(DEVICE), None, None, None, 8)
    assert tk.last_path["linear"] == "dot"


@pytest.mark.parametrize("pixels", [2, 40])
def test_pointwise_conv_takes_the_linear_paths(gen, pixels):
    """A plain 1 x 1 conv runs as the Triton linear over its pixels; every conv
    picks popcount up to POPCOUNT_MAX_M output pixels, tl.dot beyond."""
    x, w = _x(gen, 1, 70, 1, pixels), _x(gen, 33, 70, 1, 1)
    bits, wsum = bf.pack_conv_weight(w, 1)
    sc = torch.rand(33, generator=gen)
    y = tk.conv2d(x.to(DEVICE), bits.to(DEVICE), wsum.to(DEVICE), sc.to(DEVICE), None, None, 33, (1, 1), 1, 0, 1, 1)
    assert tk.last_path["conv"] == ("popcount" if pixels <= tk.POPCOUNT_MAX_M else "dot")
    assert torch.equal(y.cpu(), rb.binary_conv2d(x, w, sc, None))
    w3 = _x(gen, 33, 70, 3, 3)
    bits3, wsum3 = bf.pack_conv_weight(w3, 1)
    tk.conv2d(x.to(DEVICE), bits3.to(DEVICE), wsum3.to(DEVICE), None, None, None, 33, (3, 3), 1, 1, 1, 1)
    assert tk.last_path["conv"] == ("popcount" if pixels <= tk.POPCOUNT_MAX_M else "dot")  # k x k: by pixels too


_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import binary as tk
    cc = int(sys.argv[1])
    target = GPUTarget("cuda", cc, 32)
    ptrs = lambda names, t: {n: t for n in names}
    sig = {**ptrs(["xb_ptr", "w_ptr", "wsum_ptr"], "*i32"), **ptrs(["y_ptr", "scale_ptr", "shift_ptr", "slope_ptr"],
           "*fp32"), **ptrs(["NPIX", "H", "W", "OH", "OW", "OC", "OCG", "CG", "WG", "KW", "TAPS", "SH", "SW", "PH",
           "PW", "DH", "DW"], "i32"), "lo": "fp32", "hi": "fp32", **ptrs(["G", "ZERO_PAD", "HAS_SCALE", "HAS_SHIFT",
           "ACT_KIND", "BLOCK_M", "BLOCK_N"], "constexpr")}
    k = triton.compile(ASTSource(fn=tk._conv_popcount_kernel, signature=sig, constexprs=dict(
        G=1, ZERO_PAD=True, HAS_SCALE=True, HAS_SHIFT=True, ACT_KIND=2, BLOCK_M=64, BLOCK_N=32)), target=target)
    assert "xor.b32" in k.asm["ptx"]
    del sig["wsum_ptr"], sig["BLOCK_N"]
    k = triton.compile(ASTSource(fn=tk._conv_dot_kernel, signature=sig, constexprs=dict(
        G=1, ZERO_PAD=True, HAS_SCALE=True, HAS_SHIFT=True, ACT_KIND=1, BLOCK_M=64)), target=target)
    assert ".s8.s8.s32" in k.asm["ptx"] or "wgmma" in k.asm["ptx"], "no int8 tensor-core instruction in the conv"
    sig = {**ptrs(["xb_ptr", "w_ptr"], "*i32"), **ptrs(["y_ptr", "scale_ptr", "shift_ptr", "slope_ptr"], "*fp32"),
           **ptrs(["M", "N", "K", "KW32"], "i32"), "lo": "fp32", "hi": "fp32",
           **ptrs(["HAS_SCALE", "HAS_SHIFT", "ACT_KIND", "BLOCK_M", "BLOCK_N"], "constexpr")}
    k = triton.compile(ASTSource(fn=tk._linear_dot_kernel, signature=sig, constexprs=dict(
        HAS_SCALE=True, HAS_SHIFT=False, ACT_KIND=0, BLOCK_M=64, BLOCK_N=64)), target=target)
    ptx = k.asm["ptx"]
    assert ".s8.s8.s32" in ptx or "wgmma" in ptx, "no int8 tensor-core instruction"
    sig = {"x_ptr": "*fp32", "out_ptr": "*i32", **ptrs(["R", "C", "CG", "WG", "W_TOTAL", "stride_xr", "stride_or"],
           "i32"), "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}
    triton.compile(ASTSource(fn=tk._pack_kernel, signature=sig, constexprs=dict(BLOCK_R=64, BLOCK_W=32)),
                   target=target)
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE, cc, tmp_path)
