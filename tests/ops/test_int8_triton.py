"""Triton int8 kernels: run under TRITON_INTERPRET=1 on CPU tensors (or on a
real GPU when there is one) against the reference; compile for sm_80 and
sm_90 without a GPU."""
import textwrap

import pytest
import torch
from _helpers import run_compile_script, triton_device

DEVICE = triton_device()

from pyaccel import reference  # noqa: E402
from pyaccel.formats.int8 import quantize_weight_per_channel  # noqa: E402

from pyaccel.kernels import int8_gemm as tk  # noqa: E402

# tiles are 32 under the interpreter: sizes below, at and above them
SHAPES = [(1, 1, 1), (1, 64, 32), (5, 33, 31), (32, 32, 32), (33, 65, 100), (70, 40, 257)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_quantize_exact(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype).to(DEVICE)
    q, s = tk.quantize_per_row(x)
    qr, sr = reference.quantize_per_row(x)
    assert torch.equal(q.cpu(), qr.cpu())
    assert torch.equal(s.cpu(), sr.cpu())


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_int8_linear(m, n, k, dtype, bias):
    g = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    w = quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    wv, ws = w.values.to(DEVICE), w.scale.to(DEVICE)
    y = tk.int8_linear(x, wv, ws, b, out_dtype=dtype)
    yr = reference.int8_linear(x, wv, ws, b)
    # integer part exact; the epilogue may use an FMA on GPU: one rounding of |y|
    tol = 2 * torch.finfo(dtype).eps * yr.float().abs() + 1e-6
    assert ((y.float() - yr.float()).abs() <= tol).all()


@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (33, 65, 100)])
def test_triton_7bit_activations(m, n, k):
    """qmax=63 (Int8Linear act_bits=7): the quantizer matches the reference exactly,
    extremes (±max rows, ±127 weights) included, and the GEMM's integer part is exact."""
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :] = torch.where(torch.arange(k) % 2 == 0, 5.0, -5.0)  # q = ±63 everywhere
    x = x.to(DEVICE)
    q, s = tk.quantize_per_row(x, 63)
    qr, sr = reference.quantize_per_row(x, 63)
    assert torch.equal(q.cpu(), qr.cpu()) and torch.equal(s.cpu(), sr.cpu())
    assert int(q.abs().max()) == 63
    w = quantize_weight_per_channel(torch.randn(n, k, generator=g))
    wv = w.values.clone()
    wv[0] = torch.where(torch.arange(k) % 2 == 0, 127, -127).to(torch.int8)
    wv, ws = wv.to(DEVICE), w.scale.to(DEVICE)
    y = tk.int8_linear(x, wv, ws, None, out_dtype=torch.float32, qmax=63)
    yr = reference.int8_linear(x, wv, ws, None, qmax=63)
    assert ((y - yr).abs() <= 2 * torch.finfo(torch.float32).eps * yr.abs() + 1e-6).all()
    with pytest.raises(ValueError, match="qmax"):
        tk.quantize_per_row(x, 100)


def test_triton_zero_batch_and_strided_rows():
    g = torch.Generator().manual_seed(3)
    w = quantize_weight_per_channel(torch.randn(40, 50, generator=g))
    y = tk.int8_linear(torch.randn(0, 50).to(DEVICE), w.values.to(DEVICE), w.scale.to(DEVICE), None,
                       out_dtype=torch.float32)
    assert y.shape == (0, 40)
    x = torch.randn(6, 80, generator=g).to(DEVICE)[:, 10:60]
    y = tk.int8_linear(x, w.values.to(DEVICE), w.scale.to(DEVICE), None, out_dtype=torch.float32)
    yr = reference.int8_linear(x, w.values.to(DEVICE), w.scale.to(DEVICE), None)
    assert torch.allclose(y, yr, rtol=1e-6, atol=1e-6)


_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import int8_gemm as tk
    cc = int(sys.argv[1])
    target = GPUTarget("cuda", cc, 32)
    sig = {"q_ptr": "*i8", "w_ptr": "*i8", "sx_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*fp32",
           "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_qm": "i32", "stride_wn": "i32",
           "stride_ym": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    for m in (1, 64, 512):
        cfg = tk.gemm_config(m, 4096, 4096)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        src = ASTSource(fn=tk._int8_gemm_kernel, signature=sig, constexprs=dict(HAS_BIAS=True, **cfg))
        k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        ptx = k.asm["ptx"]
        assert ".s8.s8.s32" in ptx or "wgmma" in ptx, "no int8 tensor-core instruction in the PTX"
    qsig = {"x_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
            "stride_qm": "i32", "BLOCK_K": "constexpr", "QMAX": "constexpr"}
    for qmax in (127, 63):
        k = triton.compile(ASTSource(fn=tk._quantize_rows_kernel, signature=qsig,
                                     constexprs={"BLOCK_K": 1024, "QMAX": qmax}),
                           target=target, options={"enable_fp_fusion": False})
        assert "div.rn.f32" in k.asm["ptx"]
        assert ".ftz" not in k.asm["ptx"], "subnormal x and scales must not be flushed"
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE, cc, tmp_path)


def test_triton_nonfinite_rows():
    x = torch.randn(4, 40)
    x[2, 5] = float("nan")
    x[0, 0] = float("inf")
    q, s = tk.quantize_per_row(x.to(DEVICE))
    qr, sr = reference.quantize_per_row(x)
    assert torch.equal(q.cpu(), qr)
    assert torch.equal(torch.isnan(s.cpu()), torch.isnan(sr))


def test_triton_quantize_tiny_rows():
    """Rows whose 127 / amax overflows fp32, subnormal rows and normal rows in
    one batch: bit-exact with the reference (the 2**64 lift), K across tiles."""
    g = torch.Generator().manual_seed(9)
    amaxes = [2.0 ** -64, 2.0 ** -64 * (1 - 2.0 ** -24), 1e-30, 3.7e-37, 2e-37, 1e-38, 1e-40, 1e-44, 1.0, 5e3]
    for k in (1, 17, 64, 300):
        x = torch.randn(len(amaxes), k, generator=g, dtype=torch.float64)
        x = (x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(amaxes, dtype=torch.float64)[:, None]).float()
        xb = x.to(torch.bfloat16)
        if DEVICE == "cpu":  # the interpreter's bf16 -> fp32 mis-converts subnormals (triton 3.9)
            xb = torch.where(xb.float().abs() < torch.finfo(torch.float32).tiny, 0, xb)
        for xx in (x, xb):
            q, s = tk.quantize_per_row(xx.to(DEVICE))
            qr, sr = reference.quantize_per_row(xx)
            assert torch.equal(q.cpu(), qr), k
            assert torch.equal(s.cpu(), sr), k
        qd = (x.double() / x.double().abs().amax(dim=1, keepdim=True) * 127).round()
        q, _ = tk.quantize_per_row(x.to(DEVICE))
        assert ((q.cpu().double() - qd).abs() <= 1).all()  # not a sign pattern


def test_triton_int8_linear_tiny_and_huge_rows():
    """Tiny (subnormal-scale) and huge activation rows through the Triton
    int8_linear: same epilogue order as the reference, accurate vs float64."""
    g = torch.Generator().manual_seed(11)
    k, n = 100, 40
    w_f = torch.randn(n, k, generator=g) * 0.05
    w = quantize_weight_per_channel(w_f)
    amaxes = [2e-37, 1e-38, 1e-40, 1.0, 1e30, 1e36]
    x = torch.randn(len(amaxes), k, generator=g, dtype=torch.float64)
    x = (x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(amaxes, dtype=torch.float64)[:, None]).float()
    y = tk.int8_linear(x.to(DEVICE), w.values.to(DEVICE), w.scale.to(DEVICE), None, out_dtype=torch.float32).cpu()
    yr = reference.int8_linear(x, w.values, w.scale, None)
    assert ((y - yr).abs() <= 2 * torch.finfo(torch.float32).eps * yr.abs()).all()
    y64 = x.double() @ w_f.double().t()
    assert ((y.double() - y64).norm(dim=1) / y64.norm(dim=1) < 2e-2).all()
