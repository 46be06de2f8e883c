"""Triton block-sparse (BSR) kernels, fp32/bf16 and int8: interpreter (or GPU)
against the references; compile for sm_80/sm_90 without a GPU."""
import textwrap
import zlib

import pytest
import torch
import triton
from _helpers import run_compile_script, triton_device

DEVICE = triton_device()

from pyaccel import reference  # noqa: E402
from pyaccel.formats import block_sparse as bs  # noqa: E402

from pyaccel.kernels import block_sparse as tk  # noqa: E402

# (block, m, n, k): tiles are 32 (M, K) and >= 16 (N) under the interpreter;
# n and k are not multiples of the block, m is 1 or not a multiple of the tile
CASES = [
    ((1, 4), 1, 37, 50), ((1, 4), 33, 19, 70),
    ((16, 16), 1, 40, 70), ((16, 16), 33, 50, 100),
    ((32, 32), 1, 70, 90), ((32, 32), 33, 45, 130),
    ((64, 64), 1, 130, 150), ((64, 64), 33, 100, 200),
    ((3, 40), 5, 20, 90),  # odd block: height < 16, width sliced into 32 + 8
    ((80, 16), 3, 100, 40),  # taller than the interpreter's 64-row N tile: two programs a block row
]


def _weight(n, k, block, g, kind, int8=False):
    """A dense [n, k] weight: "sparse" (about half the blocks kept, block row 1
    and block column 0 empty), "dense" (every block kept) or "empty" (no block)."""
    bh, bw = block
    w = torch.randint(-127, 128, (n, k), generator=g).float() if int8 else torch.randn(n, k, generator=g)
    w[w == 0] = 1.0  # no accidental zero block
    if kind == "empty":
        return w * 0
    if kind == "sparse":
        nb, kb = -(-n // bh), -(-k // bw)
        keep = torch.rand(nb, kb, generator=g) < 0.5
        keep[0, -1] = True
        if nb > 1:
            keep[1] = False
        if kb > 1:
            keep[:, 0] = False
        w = w * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return w


def _compressed(w, block, int8):
    """Canonical BSR of w with the padding of edge blocks poisoned (NaN, or 127
    for int8): the kernels must never read it."""
    sw = bs.compress(w.to(torch.int8) if int8 else w, block)
    (n, k), (bh, bw) = sw.shape, block
    rows = torch.repeat_interleave(torch.arange(sw.crow_indices.numel() - 1),
                                   (sw.crow_indices[1:] - sw.crow_indices[:-1]).long())
    pad_r = rows[:, None] * bh + torch.arange(bh) >= n
    pad_c = sw.col_indices.long()[:, None] * bw + torch.arange(bw) >= k
    v = sw.values.clone()
    v[pad_r[:, :, None] | pad_c[:, None, :]] = 127 if int8 else float("nan")
    return v.to(DEVICE), sw.crow_indices.to(DEVICE), sw.col_indices.to(DEVICE), sw.nnzb


def _x(m, k, dtype, g):
    """Random [m, k] activations, a view whose row stride is k + 3 with NaN past column k."""
    big = torch.randn(m, k + 3, generator=g)
    big[:, k:] = float("nan")
    return big.to(dtype).to(DEVICE)[:, :k]


def _seed(*args):
    return torch.Generator().manual_seed(zlib.crc32(repr(args).encode()))


@pytest.mark.parametrize("block,m,n,k", CASES)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_triton_block_sparse(block, m, n, k, dtype, bias):
    g = _seed("f", block, m, n, k, dtype, bias)
    w = _weight(n, k, block, g, "sparse")
    vals, crow, col, nnzb = _compressed(w, block, int8=False)
    assert 0 < nnzb < crow.numel() * -(-k // block[1])  # some blocks kept, some dropped
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    x = _x(m, k, dtype, g)
    y = tk.block_sparse_linear(x, vals, crow, col, n, k, b)
    ref = reference.block_sparse_linear(x, vals, crow, col, n, k, b)
    assert y.dtype == dtype and y.shape == (m, n)
    scale = x.float().abs() @ w.abs().t().to(DEVICE) + (b.abs() if bias else 0)
    eps = torch.finfo(dtype).eps
    assert ((y.float() - ref.float()).abs() <= 4 * eps * scale + 1e-6).all()


@pytest.mark.parametrize("block,m,n,k", CASES)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_triton_block_sparse_int8(block, m, n, k, dtype, bias):
    g = _seed("i", block, m, n, k, dtype, bias)
    w = _weight(n, k, block, g, "sparse", int8=True)
    vals, crow, col, _ = _compressed(w, block, int8=True)
    ws = (torch.rand(n, generator=g) * 0.02 + 0.001).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    x = _x(m, k, dtype, g)
    y = tk.block_sparse_int8_linear(x, vals, crow, col, n, k, ws, b)
    ref = reference.block_sparse_int8_linear(x, vals, crow, col, n, k, ws, b)
    assert y.dtype == dtype and y.shape == (m, n)
    # integer part exact; the epilogue may use an FMA on GPU: one rounding of |y|
    tol = 2 * torch.finfo(dtype).eps * ref.float().abs() + 1e-6
    assert ((y.float() - ref.float()).abs() <= tol).all()


@pytest.mark.parametrize("block,n,k", [((1, 4), 21, 30), ((16, 16), 40, 50), ((64, 64), 70, 100)])
@pytest.mark.parametrize("kind", ["dense", "empty"])
@pytest.mark.parametrize("int8", [False, True])
def test_triton_block_sparse_dense_and_empty(block, n, k, kind, int8):
    g = _seed("d", block, n, k, kind, int8)
    m = 17
    w = _weight(n, k, block, g, kind, int8=int8)
    vals, crow, col, nnzb = _compressed(w, block, int8)
    assert nnzb == (0 if kind == "empty" else (crow.numel() - 1) * -(-k // block[1]))
    b = torch.randn(n, generator=g).to(DEVICE)
    x = _x(m, k, torch.float32, g)
    if int8:
        ws = (torch.rand(n, generator=g) * 0.02 + 0.001).to(DEVICE)
        y = tk.block_sparse_int8_linear(x, vals, crow, col, n, k, ws, b)
        ref = reference.block_sparse_int8_linear(x, vals, crow, col, n, k, ws, b)
        tol = 2 * torch.finfo(torch.float32).eps * ref.abs() + 1e-6
    else:
        y = tk.block_sparse_linear(x, vals, crow, col, n, k, b)
        ref = reference.block_sparse_linear(x, vals, crow, col, n, k, b)
        tol = 4 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t().to(DEVICE) + b.abs()) + 1e-6
    assert ((y - ref).abs() <= tol).all()
    if kind == "empty":  # bias only, exactly; and zeros without a bias
        assert torch.equal(y, b.expand(m, n))
        y0 = (tk.block_sparse_int8_linear(x, vals, crow, col, n, k, ws) if int8
              else tk.block_sparse_linear(x, vals, crow, col, n, k))
        assert torch.equal(y0, torch.zeros(m, n, device=DEVICE))


@pytest.mark.parametrize("int8", [False, True])
def test_triton_block_sparse_program_writes_only_its_block_row(int8):
    """A program's N tile (16) is taller than a 1 x 4 block row: launched alone,
    block row 0's program must leave the other columns of y alone (on a GPU the
    neighbours' programs may run before it; the interpreter runs them in order)."""
    g = torch.Generator().manual_seed(3 + int8)
    n, k, m, block = 20, 24, 5, (1, 4)
    vals, crow, col, _ = _compressed(_weight(n, k, block, g, "dense", int8=int8), block, int8)
    b = torch.randn(n, generator=g).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    y = torch.full((m, n), float("nan"), device=DEVICE)
    cfg = tk.bsr_config(m, block, block_k=tk.INT8_BLOCK_K if int8 else 64)
    cfg.pop("num_stages", None)
    grid = (1, triton.cdiv(m, cfg["BLOCK_M"]))
    if int8:
        from pyaccel.kernels.int8_gemm import quantize_per_row

        ws = (torch.rand(n, generator=g) * 0.02 + 0.001).to(DEVICE)
        q, sx = quantize_per_row(x)
        tk._bsr_int8_kernel[grid](q, vals, crow, col, sx, ws, b, y, m, n, k, 1, 4, q.stride(0),
                                  *vals.stride(), y.stride(0), HAS_BIAS=True, **cfg)
        ref = reference.block_sparse_int8_linear(x, vals, crow, col, n, k, ws, b)
    else:
        tk._bsr_kernel[grid](x, vals, crow, col, b, y, m, n, k, 1, 4, x.stride(0), *vals.stride(),
                             y.stride(0), HAS_BIAS=True, BF16=False, BF16_DOT=False, **cfg)
        ref = reference.block_sparse_linear(x, vals, crow, col, n, k, b)
    assert torch.isnan(y[:, 1:]).all()
    assert torch.allclose(y[:, 0], ref[:, 0], rtol=1e-5, atol=1e-5)


def test_triton_block_sparse_zero_batch_and_bad_args():
    g = torch.Generator().manual_seed(7)
    vals, crow, col, _ = _compressed(_weight(40, 50, (16, 16), g, "sparse"), (16, 16), int8=False)
    assert tk.block_sparse_linear(torch.randn(0, 50).to(DEVICE), vals, crow, col, 40, 50).shape == (0, 40)
    ws = torch.ones(40).to(DEVICE)
    q = vals.nan_to_num().clamp(-1, 1).round().to(torch.int8)
    assert tk.block_sparse_int8_linear(torch.randn(0, 50).to(DEVICE), q, crow, col, 40, 50, ws).shape == (0, 40)
    x = torch.randn(3, 50).to(DEVICE)
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        tk.block_sparse_linear(torch.randn(3, 100).to(DEVICE)[:, ::2], vals, crow, col, 40, 50)
    with pytest.raises(ValueError, match="x: expected 50 columns"):
        tk.block_sparse_linear(x[:, :49], vals, crow, col, 40, 50)
    with pytest.raises(ValueError, match="crow_indices"):
        tk.block_sparse_linear(x, vals, crow[:-1], col, 40, 50)
    with pytest.raises(ValueError, match="col_indices"):
        tk.block_sparse_linear(x, vals, crow, col.long(), 40, 50)
    with pytest.raises(ValueError, match="values"):
        tk.block_sparse_linear(x, q, crow, col, 40, 50)
    with pytest.raises(ValueError, match="w_scale"):
        tk.block_sparse_int8_linear(x, q, crow, col, 40, 50, ws[:-1])
    with pytest.raises(ValueError, match="bias"):
        tk.block_sparse_linear(x, vals, crow, col, 40, 50, ws[:-1])


_COMPILE = textwrap.dedent(r"""
    import os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyaccel.kernels import block_sparse as tk
    cc = int(sys.argv[1])
    target = GPUTarget("cuda", cc, 32)
    common = {"M": "i32", "N": "i32", "K": "i32", "BH": "i32", "BW": "i32", "stride_vb": "i32",
              "stride_vh": "i32", "stride_vw": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
              "PARTS": "constexpr", "CHUNK_K": "constexpr", "CHUNKS": "constexpr",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}

    def build(fn, sig, cfg, **consts):
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(HAS_BIAS=True, **consts, **cfg))
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})

    for block, m, xdt in (((1, 4), 1, "*fp32"), ((32, 32), 128, "*bf16"), ((64, 64), 1, "*fp32")):
        bf16 = xdt == "*bf16"
        sig = {"x_ptr": xdt, "v_ptr": "*fp32", "crow_ptr": "*i32", "col_ptr": "*i32", "bias_ptr": "*fp32",
               "y_ptr": xdt, "stride_xm": "i32", "BF16": "constexpr", "BF16_DOT": "constexpr", **common}
        k = build(tk._bsr_kernel, sig, tk.bsr_config(m, block), BF16=bf16, BF16_DOT=bf16)
        if bf16:  # fp32 is IEEE (FMA, no TF32); bf16 runs on tensor cores
            assert "mma" in k.asm["ptx"], "no bf16 tensor-core MMA in the PTX"
    for block, m, ydt in (((1, 4), 1, "*fp32"), ((16, 16), 128, "*bf16"), ((64, 64), 16, "*fp32")):
        sig = {"q_ptr": "*i8", "v_ptr": "*i8", "crow_ptr": "*i32", "col_ptr": "*i32", "sx_ptr": "*fp32",
               "sw_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": ydt, "stride_qm": "i32", **common}
        k = build(tk._bsr_int8_kernel, sig, tk.bsr_config(m, block, block_k=tk.INT8_BLOCK_K))
        ptx = k.asm["ptx"]
        assert re.search(r"mma[\w.]*\.s8\.s8", ptx), "no int8 tensor-core MMA in the PTX"
    print("compiled", cc)
""")


@pytest.mark.parametrize("cc", [80, 90])
def test_block_sparse_compiles_for_gpu(cc, tmp_path):
    run_compile_script(_COMPILE, cc, tmp_path)
