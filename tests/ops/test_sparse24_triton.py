"""Triton 2:4 kernel: interpreter (or GPU) against the dense reference; compiles for sm_80/sm_90."""
import textwrap

import pytest
import torch
from _helpers import run_compile_script, triton_device

DEVICE = triton_device()

from pyaccel import reference  # noqa: E402
from pyaccel.formats import sparse24 as s24  # noqa: E402

from pyaccel.kernels import sparse24 as tk  # noqa: E402

SHAPES = [(1, 1, 1), (1, 64, 32), (5, 33, 31), (32, 32, 64), (33, 65, 100), (40, 16, 257)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_sparse24(m, n, k, dtype, bias):
    g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    w = torch.randn(n, k, generator=g)
    w = w * s24.mask_24(w)
    if k >= 8:
        w[:, :4] = 0
    sw = s24.compress(w)
    vals, meta = sw.values.float().to(DEVICE), sw.meta.to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    y = tk.sparse24_linear(x, vals, meta, k, b)
    ref = reference.sparse24_linear(x, vals, meta, k, b)
    assert y.dtype == dtype and y.shape == (m, n)
    scale = x.float().abs() @ w.abs().t().to(DEVICE) + (b.abs() if bias else 0)
    eps = torch.finfo(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32).eps
    assert ((y.float() - ref.float()).abs() <= 4 * eps * scale + 1e-6).all()


_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import sparse24 as tk
    cc = int(sys.argv[1])
    for xdt, bf16 in (("*fp32", False), ("*bf16", True)):
        sig = {"x_ptr": xdt, "v_ptr": "*fp32", "meta_ptr": "*u8", "bias_ptr": "*fp32", "y_ptr": xdt,
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_vn": "i32",
               "stride_metan": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr", "BF16": "constexpr", "BF16_DOT": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        for m in (1, 128):
            cfg = tk.gemm_config(m, 4096, 4096)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            src = ASTSource(fn=tk._sparse24_kernel, signature=sig, constexprs=dict(HAS_BIAS=True, BF16=bf16, BF16_DOT=bf16, **cfg))
            triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_sparse24_compiles_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE, cc, tmp_path)
