"""Triton fused depthwise-separable kernel: interpreter (or GPU) against the
float64 reference on small shapes (tiles of 32, sizes <= 256); compiles to
PTX for sm_80 and sm_90."""
import textwrap

import pytest
import torch
from _helpers import run_compile_script, triton_device

from pyaccel import reference
from pyaccel._pattern import ActKind, Activation
from pyaccel.nn._conv import ConvGeometry

DEVICE = triton_device()
tk = pytest.importorskip("pyaccel.kernels.dwconv_fused")


def _case(c, co, k, stride, padding, g):
    wd = torch.randn(c, 1, k, k, generator=g)
    bd = torch.randn(c, generator=g)
    wp = torch.randn(co, c, 1, 1, generator=g) / c ** 0.5
    bp = torch.randn(co, generator=g)
    return ConvGeometry(k, stride, 1, padding), wd, bd, wp, bp


@pytest.mark.parametrize("c,co,k,stride,padding,hw,n", [
    (8, 16, 3, 1, 1, (7, 9), 1), (33, 40, 3, 2, 1, (9, 8), 2), (20, 5, 5, 1, 2, (6, 6), 1),
    (48, 33, 5, 2, "tf_same", (10, 10), 1), (3, 64, 3, 2, (0, 1, 0, 1), (8, 8), 1), (70, 70, 1, 1, 0, (5, 3), 1),
])
@pytest.mark.parametrize("acts", [("relu6", "none"), ("hardswish", "silu"), ("none", "relu"),
                                  (Activation(ActKind.HARDTANH, -0.3, 0.4), "relu6")])
def test_triton_matches_reference(c, co, k, stride, padding, hw, n, acts):
    g = torch.Generator().manual_seed(c * 7 + co + k)
    geo, wd, bd, wp, bp = _case(c, co, k, stride, padding, g)
    a1, a2 = Activation.parse(acts[0]), Activation.parse(acts[1])
    x = torch.randn(n, c, *hw, generator=g)
    ref = reference.dws_conv2d(x.double(), wd.double(), bd.double(), wp.double(), bp.double(), geo.stride,
                               geo.dilation, geo.pads(*hw), a1, a2)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    y = tk.dws_conv2d(dev(x), dev(wd), dev(bd), dev(wp), dev(bp), geo, a1, a2).cpu()
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = ref.abs().max().item() + 1e-30
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale
    ycl = tk.dws_conv2d(dev(x).contiguous(memory_format=torch.channels_last), dev(wd), dev(bd), dev(wp), dev(bp),
                        geo, a1, a2)
    assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl.cpu(), y)


def test_triton_bf16_empty_and_no_bias():
    g = torch.Generator().manual_seed(5)
    geo, wd, bd, wp, bp = _case(16, 24, 3, 1, 1, g)
    a = Activation.parse("relu")
    x = torch.randn(1, 16, 5, 5, generator=g).to(torch.bfloat16)
    y = tk.dws_conv2d(x.to(DEVICE), wd.to(DEVICE), bd.to(DEVICE), wp.to(DEVICE), None, geo, a, a).cpu()
    ref = reference.dws_conv2d(x, wd, bd, wp, None, geo.stride, geo.dilation, geo.pads(5, 5), a, a)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    e = tk.dws_conv2d(torch.randn(0, 16, 5, 5).to(DEVICE), wd.to(DEVICE), bd.to(DEVICE), wp.to(DEVICE), bp.to(DEVICE),
                      geo, a, a)
    assert e.shape == (0, 24, 5, 5)


_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import dwconv_fused as tk
    cc = int(sys.argv[1])
    sig = {"x_ptr": "*fp32", "wd_ptr": "*fp32", "bd_ptr": "*fp32", "wp_ptr": "*fp32", "bp_ptr": "*fp32",
           "y_ptr": "*fp32", "P": "i32", "H": "i32", "W": "i32", "C": "i32", "COUT": "i32", "OH": "i32", "OW": "i32",
           "SH": "i32", "SW": "i32", "DH": "i32", "DW": "i32", "PAD_T": "i32", "PAD_L": "i32",
           "lo1": "fp32", "hi1": "fp32", "lo2": "fp32", "hi2": "fp32",
           "KH": "constexpr", "KW": "constexpr", "ACT1": "constexpr", "ACT2": "constexpr", "HAS_BIAS": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for k, a1, a2, cout in ((3, 2, 0, 64), (5, 4, 3, 256)):
        cfg = tk.dws_config(128, cout)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        src = ASTSource(fn=tk._dws_kernel, signature=sig,
                        constexprs=dict(KH=k, KW=k, ACT1=a1, ACT2=a2, HAS_BIAS=True, **cfg))
        triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_dwconv_fused_compiles_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE, cc, tmp_path)
