"""Triton 2:4 sparse linear: y = x @ W.T + bias, W in pyaccel's canonical 2:4
form (values fp32 [N, 2G], meta uint8 [N, ceil(G/2)] with a nibble i0 | i1 << 2
per group of 4 inputs). Each program loads the compressed values and
positions of its [BLOCK_N, BLOCK_K] weight tile, expands them to dense in
registers, and feeds tl.dot: at small M the weight bytes read are about half
of dense (the bandwidth win), the math is dense tensor-core math.

fp32 activations use IEEE fp32 dot products (no TF32), so results match the
dense fp32 reference to rounding; bf16 activations use bf16 tensor cores with
fp32 accumulation.

The int8 variant (values int8, activations quantized per row by the int8
module's Triton quantizer) expands the same way and runs tl.dot int8 x int8 ->
int32 with int8_gemm's fused dequantization epilogue: per weight tile it reads
2 value bytes + half a position byte per group of 4 inputs, vs 4 dense.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import dequant_store, interpreting, load_rows, tile_ranges


@triton.jit
def _dense_24_tile(v_ptr, meta_ptr, rn, kk, n_ok, K, stride_vn, stride_metan):
    """The dense [BLOCK_K, BLOCK_N] tile (rows kk, columns rn) of a canonical
    2:4 weight, expanded in registers from its values and position nibbles."""
    grp = kk // 4
    posk = (kk % 4)[:, None]
    ok = n_ok & (kk[:, None] < K)
    # positions: nibble of group grp in byte grp // 2 of row n
    byte = tl.load(meta_ptr + rn[None, :].to(tl.int64) * stride_metan + (grp // 2)[:, None],
                   mask=ok, other=0).to(tl.int32)
    nib = (byte >> ((grp % 2) * 4)[:, None]) & 0xF
    vrow = v_ptr + rn[None, :].to(tl.int64) * stride_vn + (2 * grp)[:, None]
    v0 = tl.load(vrow, mask=ok, other=0)
    v1 = tl.load(vrow + 1, mask=ok, other=0)
    zero = tl.zeros_like(v0)
    return tl.where(posk == (nib & 3), v0, tl.where(posk == (nib >> 2), v1, zero))


@triton.jit
def _sparse24_kernel(
    # pointers
    x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides (elements)
    stride_xm, stride_vn, stride_metan, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BF16: tl.constexpr, BF16_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm, rn, rk = tile_ranges(BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_ok = rn[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk  # [BK]
        w = _dense_24_tile(v_ptr, meta_ptr, rn, kk, n_ok, K, stride_vn, stride_metan)  # [BK, BN]
        a = load_rows(x_ptr, rm, kk, M, K, stride_xm)
        if BF16_DOT:
            acc += tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16))
        elif BF16:
            # same products as the bf16 dot (bf16 x bf16 is exact in fp32); used
            # under TRITON_INTERPRET, whose bf16 tl.dot returns garbage (3.9)
            acc += tl.dot(a.to(tl.bfloat16).to(tl.float32), w.to(tl.bfloat16).to(tl.float32),
                          input_precision="ieee")
        else:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok)


INT8_BLOCK_K = 128  # 128 bytes of K per int8 tile row (64 for fp32/bf16)


def gemm_config(m: int, n: int, k: int, block_k: int = 64) -> dict:
    """Tiles keyed on M (sm80/sm90): short tiles for decode-sized M, where the
    kernel is bound by weight bytes; the interpreter gets small tiles."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=3)


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    """Check x ([M, K], unit stride along K) and allocate y [M, n] in x's dtype."""
    if x.dim() != 2 or (x.shape[0] > 0 and x.stride(1) != 1):
        raise ValueError(f"x: expected a 2-D tensor with unit stride along K, got {tuple(x.shape)} {x.stride()}")
    return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [M, K] float (unit stride along K); values fp32 [N, 2G]; meta uint8 [N, ceil(G/2)]."""
    n = values.shape[0]
    y = _output(x, n)
    m = x.shape[0]
    if m == 0:
        return y
    cfg = gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _sparse24_kernel[grid](x, values, meta, bias if bias is not None else values, y, m, n, k,
                           x.stride(0), values.stride(0), meta.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16,
                           BF16_DOT=x.dtype == torch.bfloat16 and not interpreting(), **cfg)
    return y


@triton.jit
def _sparse24_int8_kernel(
    # pointers
    q_ptr, v_ptr, meta_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides (elements)
    stride_qm, stride_vn, stride_metan, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = float(sum_k q[m, k] w[n, k]) * (sx[m] * sw[n]) + bias[n], w 2:4 int8."""
    rm, rn, rk = tile_ranges(BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    n_ok = rn[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = _dense_24_tile(v_ptr, meta_ptr, rn, kk, n_ok, K, stride_vn, stride_metan)  # int8 [BK, BN]
        acc += tl.dot(load_rows(q_ptr, rm, kk, M, K, stride_qm), w, out_dtype=tl.int32)
    dequant_store(acc, sx_ptr, sw_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


def sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                         w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [M, K] float (unit stride along K), quantized per row here; values int8
    [N, 2G]; meta uint8 [N, ceil(G/2)]; w_scale fp32 [N]. Output in x's dtype."""
    from pyaccel.kernels.int8_gemm import quantize_per_row

    n = values.shape[0]
    y = _output(x, n)
    m = x.shape[0]
    if m == 0:
        return y
    q, sx = quantize_per_row(x)
    cfg = gemm_config(m, n, k, block_k=INT8_BLOCK_K)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _sparse24_int8_kernel[grid](q, values, meta, sx, w_scale, bias if bias is not None else w_scale, y,
                                m, n, k, q.stride(0), values.stride(0), meta.stride(0), y.stride(0),
                                HAS_BIAS=bias is not None, **cfg)
    return y
