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


def _pruned(n, k, g):
    """A random 2:4 weight [n, k] with a group of no and a group of one non-zero."""
    w = torch.randn(n, k, generator=g)
    w = w * s24.mask_24(w)
    if k >= 8:
        w[:, :4] = 0
    if k >= 16:
        w[:, 8:12] *= torch.tensor([0.0, 1.0, 0.0, 0.0])
    return w


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_sparse24(m, n, k, dtype, bias):
    g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    w = _pruned(n, k, g)
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


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_sparse24_int8(m, n, k, dtype, bias):
    from pyaccel.formats.int8 import quantize_weight_per_channel

    g = torch.Generator().manual_seed(m * 17 + n * 5 + k)
    qw = quantize_weight_per_channel(_pruned(n, k, g))
    sw = s24.compress(qw.values.float())
    vals, meta = sw.values.to(torch.int8).to(DEVICE), sw.meta.to(DEVICE)
    ws = qw.scale.to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    y = tk.sparse24_int8_linear(x, vals, meta, k, ws, b)
    ref = reference.sparse24_int8_linear(x, vals, meta, k, ws, b)
    assert y.dtype == dtype and y.shape == (m, n)
    # integer part exact; the epilogue may use an FMA on GPU: one rounding of |y|
    tol = 2 * torch.finfo(dtype).eps * ref.float().abs() + 1e-6
    assert ((y.float() - ref.float()).abs() <= tol).all()


def test_triton_sparse24_int8_zero_batch_and_strided_rows():
    from pyaccel.formats.int8 import quantize_weight_per_channel

    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 50, generator=g)
    w = w * s24.mask_24(w)
    qw = quantize_weight_per_channel(w)
    sw = s24.compress(qw.values.float())
    vals, meta, ws = sw.values.to(torch.int8).to(DEVICE), sw.meta.to(DEVICE), qw.scale.to(DEVICE)
    assert tk.sparse24_int8_linear(torch.randn(0, 50).to(DEVICE), vals, meta, 50, ws, None).shape == (0, 40)
    x = torch.randn(6, 80, generator=g).to(DEVICE)[:, 10:60]
    y = tk.sparse24_int8_linear(x, vals, meta, 50, ws, None)
    ref = reference.sparse24_int8_linear(x, vals, meta, 50, ws, None)
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        tk.sparse24_int8_linear(torch.randn(3, 100).to(DEVICE)[:, ::2], vals, meta, 50, ws, None)


_COMPILE_INT8 = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import sparse24 as tk
    cc = int(sys.argv[1])
    for ydt in ("*fp32", "*bf16"):
        sig = {"q_ptr": "*i8", "v_ptr": "*i8", "meta_ptr": "*u8", "sx_ptr": "*fp32", "sw_ptr": "*fp32",
               "bias_ptr": "*fp32", "y_ptr": ydt, "M": "i32", "N": "i32", "K": "i32", "stride_qm": "i32",
               "stride_vn": "i32", "stride_metan": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        for m in (1, 128):
            cfg = tk.gemm_config(m, 4096, 4096, block_k=tk.INT8_BLOCK_K)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            src = ASTSource(fn=tk._sparse24_int8_kernel, signature=sig, constexprs=dict(HAS_BIAS=True, **cfg))
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
            assert ("mma" in k.asm["ptx"]) and (".s8" in k.asm["ptx"]), "no int8 tensor-core MMA in the PTX"
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_sparse24_int8_compiles_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE_INT8, cc, tmp_path)


@pytest.mark.parametrize("int8", [False, True])
def test_cuda_op_glue_on_nd_inputs(int8):
    """The ops' CUDA implementations (rows view, contiguity, output shape), run
    on whatever device the Triton kernels run on here (the interpreter on CPU)."""
    from pyaccel import ops
    from pyaccel.formats.int8 import quantize_weight_per_channel

    g = torch.Generator().manual_seed(5 + int8)
    w = torch.randn(24, 36, generator=g)
    w = w * s24.mask_24(w)
    b = torch.randn(24, generator=g).to(DEVICE)
    x = torch.randn(2, 3, 36, generator=g).to(DEVICE)
    if int8:
        qw = quantize_weight_per_channel(w)
        sw = s24.compress(qw.values.float())
        vals, meta, ws = sw.values.to(torch.int8).to(DEVICE), sw.meta.to(DEVICE), qw.scale.to(DEVICE)
        y = ops._sparse24_int8_linear_cuda_op(x, vals, meta, 36, ws, b, None)
        ref = reference.sparse24_int8_linear(x, vals, meta, 36, ws, b)
    else:
        sw = s24.compress(w)
        vals, meta = sw.values.float().to(DEVICE), sw.meta.to(DEVICE)
        y = ops._sparse24_linear_cuda_op(x, vals, meta, 36, b, None)
        ref = reference.sparse24_linear(x, vals, meta, 36, b)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
