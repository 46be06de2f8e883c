"""Triton int8 linear: per-row activation quantization + int8 GEMM (tl.dot
int8 x int8 -> int32) with the dequantization and bias fused in the epilogue.

Same contract as ``pyaccel.reference.int8_linear``; the quantization is
bit-exact with the reference (IEEE division, round-half-even, no FMA fusion).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import dequant_store, interpreting, load_rows, tile_ranges

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to nearest even


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr,
    # sizes
    K,
    # strides (elements)
    stride_xm, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr,
    QMAX: tl.constexpr,
):
    """One program per row: amax pass, then scale-round-clamp pass; q in
    [-QMAX, QMAX] (127, or 63 for the opt-in 7-bit activations).

    Rows with 0 < amax < 2**-64 are lifted by 2**64 (x and amax, both exact) so
    that QMAX / amax stays finite: pyaccel.reference.quantize_rows_fp32's rule.
    The scale is div_rn(amax, QMAX) of the original amax. Subnormal x, amax and
    scales are kept: the PTX has div.rn.f32 and mul.rn.f32, no .ftz (checked
    by tests/ops/test_int8_triton.py)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.float32)  # sum of x * 0: NaN iff an inf or NaN
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        bad += v * 0.0
    a = tl.max(amax, axis=0)
    finite = tl.sum(bad, axis=0) == 0.0
    lift = tl.where(a < 5.421010862427522e-20, 18446744073709551616.0, 1.0)  # 2**-64, 2**64
    use = finite & (a > 0)
    qmax = QMAX * 1.0
    inv = tl.where(use, tl.math.div_rn(qmax, tl.where(use, a * lift, 1.0)), 0.0)
    tl.store(s_ptr + row, tl.where(finite, tl.math.div_rn(a, qmax), float("nan")))
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        p = (v * lift) * inv
        r = (p + 12582912.0) - 12582912.0
        r = tl.where(finite, tl.minimum(tl.maximum(r, -qmax), qmax), 0.0)
        tl.store(q_ptr + row * stride_qm + offs, r.to(tl.int8), mask=mask)


@triton.jit
def _int8_gemm_kernel(
    # pointers
    q_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides (elements)
    stride_qm, stride_wn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = float(sum_k q[m, k] w[n, k]) * sx[m] * sw[n] + bias[n] (order: _common.dequant_store)."""
    rm, rn, rk = tile_ranges(BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = load_rows(q_ptr, rm, kk, M, K, stride_qm)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    dequant_store(acc, sx_ptr, sw_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


def gemm_config(m: int, n: int, k: int) -> dict:
    """Tile sizes for the GEMM, keyed on the problem size (sm80/sm90).

    Small M (decode-style GEMV) uses short, wide tiles so that more programs
    stream the weight; large M uses square 128-wide tiles for tensor-core reuse.
    The interpreter (tests) always gets small tiles.
    """
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def quantize_per_row(x: torch.Tensor, qmax: int = 127) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float (unit stride along K) -> (q int8 [M, K] in [-qmax, qmax], scale fp32 [M]);
    qmax 127, or 63 (7-bit activations)."""
    if qmax not in (127, 63):
        raise ValueError(f"qmax: expected 127 or 63, got {qmax!r}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x: expected a 2-D tensor with unit stride along K, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    if k == 0:
        return q, s.zero_()
    block_k = 256 if interpreting() else min(4096, triton.next_power_of_2(k))
    kwargs = {} if interpreting() else dict(enable_fp_fusion=False)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block_k, QMAX=qmax, **kwargs)
    return q, s


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype, qmax: int = 127) -> torch.Tensor:
    """x: [M, K] float; w_int8: [N, K] int8; w_scale [N] fp32; bias [N] fp32 or None;
    qmax: activation range, 127 or 63 (the opt-in 7-bit mode)."""
    m, k = x.shape
    n = w_int8.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    q, sx = quantize_per_row(x, qmax)
    cfg = gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _int8_gemm_kernel[grid](
        q, w_int8, sx, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, q.stride(0), w_int8.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, **cfg)
    return y
