"""Triton block-sparse (BSR) linear: y = x @ W.T + bias, W in pyaccel's
canonical BSR form (pyaccel.formats.block_sparse: values [nnzb, bh, bw],
int32 crow_indices [ceil(n / bh) + 1], int32 col_indices [nnzb], logical
shape (n, k); entries of edge blocks past n or k are never read or written).

Grid: one program per (block row, part of it, M tile). A program owns output
columns [r * bh + part * BLOCK_N, ...) of block row r (BLOCK_N covers the block
height, padded to a power of 2 >= 16; taller blocks are split into parts) and
loops over its row's blocks crow[r] .. crow[r + 1]. Each step feeds tl.dot a
[BLOCK_M, BLOCK_K] x tile and a [BLOCK_K, BLOCK_N] weight tile built from
BLOCK_K // CHUNK_K "units": a unit is CHUNK_K columns of one block (the block
width padded to a power of 2, or a slice of a block wider than BLOCK_K), so
narrow blocks are gathered several to a step (x columns col * bw + t, read
through the column indices) and wide ones are read in slices. Everything past
the block, the row's last block, n or k is masked (loads give 0; stores skip).

Short blocks (bh < 16, e.g. 1 x 4) are handled correctly but not efficiently:
the weight tile's N dimension is padded to 16 with masks, so a 1 x 4 layer's
program computes one output column (tensor-core work 16x the useful work; the
bytes read are only the kept blocks). Empty block rows store the bias (or 0).

fp32 activations use IEEE fp32 dot products (no TF32); bf16 activations use
bf16 tensor cores with fp32 accumulation (the weight rounded to bf16, as in
sparse24). The int8 variant quantizes x per row with int8_gemm's Triton
quantizer (bit-exact with reference.quantize_per_row), runs int8 x int8 ->
int32 tl.dot, and fuses the dequantization and bias (int8_gemm's epilogue).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import dequant_store, interpreting


@triton.jit
def _bsr_row_setup(crow_ptr, N, BH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr):
    """This program's block row r, its blocks [start, end), output rows rm,
    output columns rn, in-block rows bi and the column limit (rn < n_lim)."""
    pid = tl.program_id(0)
    r = pid // PARTS
    bi = (pid % PARTS) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows inside the block
    rn = r * BH + bi  # output columns
    n_lim = tl.minimum(N, r * BH + BH)  # not past the block row nor n
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    return r, start, end, rm, rn, bi, n_lim


@triton.jit
def _bsr_tiles(x_ptr, v_ptr, col_ptr, u0, n_units, start, rm, bi, n_lim_ok,
               M, K, BH, BW, stride_xm, stride_vb, stride_vh, stride_vw,
               BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr):
    """The x tile [BLOCK_M, BLOCK_K] and weight tile [BLOCK_K, BLOCK_N] of units
    u0 .. u0 + BLOCK_K // CHUNK_K (unit u: slice u % CHUNKS of block start + u // CHUNKS)."""
    kk = tl.arange(0, BLOCK_K)
    u = u0 + kk // CHUNK_K
    j = start + u // CHUNKS  # block index into values / col_indices
    t = (u % CHUNKS) * CHUNK_K + kk % CHUNK_K  # column inside the block
    in_block = (u < n_units) & (t < BW)
    col = tl.load(col_ptr + j, mask=in_block, other=0)
    xk = col * BW + t  # x column
    k_ok = in_block & (xk < K)
    a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + xk[None, :],
                mask=(rm[:, None] < M) & k_ok[None, :], other=0)
    w = tl.load(v_ptr + j[:, None].to(tl.int64) * stride_vb + bi[None, :] * stride_vh + t[:, None] * stride_vw,
                mask=k_ok[:, None] & n_lim_ok[None, :], other=0)
    return a, w


@triton.jit
def _bsr_kernel(
    # pointers
    x_ptr, v_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, BH, BW,
    # strides (elements)
    stride_xm, stride_vb, stride_vh, stride_vw, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BF16: tl.constexpr, BF16_DOT: tl.constexpr, PARTS: tl.constexpr,
    CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, r*bh + i] = sum over the blocks j of row r of x[m, col[j]*bw + t] v[j, i, t] (+ bias)."""
    r, start, end, rm, rn, bi, n_lim = _bsr_row_setup(crow_ptr, N, BH, BLOCK_M, BLOCK_N, PARTS)
    n_ok = rn < n_lim
    n_units = (end - start) * CHUNKS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for u0 in range(0, n_units, BLOCK_K // CHUNK_K):
        a, w = _bsr_tiles(x_ptr, v_ptr, col_ptr, u0, n_units, start, rm, bi, n_ok, M, K, BH, BW,
                          stride_xm, stride_vb, stride_vh, stride_vw, BLOCK_K, CHUNK_K, CHUNKS)
        if BF16_DOT:
            acc += tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16))
        elif BF16:
            # same products as the bf16 dot (bf16 x bf16 is exact in fp32); used
            # under TRITON_INTERPRET, whose bf16 tl.dot returns garbage (3.9)
            acc += tl.dot(a.to(tl.bfloat16).to(tl.float32), w.to(tl.bfloat16).to(tl.float32),
                          input_precision="ieee")
        else:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok[None, :])


@triton.jit
def _bsr_int8_kernel(
    # pointers
    q_ptr, v_ptr, crow_ptr, col_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, BH, BW,
    # strides (elements)
    stride_qm, stride_vb, stride_vh, stride_vw, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTS: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = float(sum q[m, k] w[n, k] over the kept blocks) * sx[m] * sw[n] + bias[n], the product in
    int8_gemm's split_scale order (_common.dequant_store)."""
    r, start, end, rm, rn, bi, n_lim = _bsr_row_setup(crow_ptr, N, BH, BLOCK_M, BLOCK_N, PARTS)
    n_ok = rn < n_lim
    n_units = (end - start) * CHUNKS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for u0 in range(0, n_units, BLOCK_K // CHUNK_K):
        a, w = _bsr_tiles(q_ptr, v_ptr, col_ptr, u0, n_units, start, rm, bi, n_ok, M, K, BH, BW,
                          stride_qm, stride_vb, stride_vh, stride_vw, BLOCK_K, CHUNK_K, CHUNKS)
        acc += tl.dot(a, w, out_dtype=tl.int32)
    # n_lim as the column bound: columns of the next block row are not ours
    dequant_store(acc, sx_ptr, sw_ptr, bias_ptr, y_ptr, rm, rn, M, n_lim, stride_ym, HAS_BIAS)


INT8_BLOCK_K = 128  # 128 bytes of K per int8 tile row (64 for fp32/bf16)


def bsr_config(m: int, block, block_k: int = 64) -> dict:
    """Tiles for blocks (bh, bw) (sm80/sm90): BLOCK_N covers the block height
    (>= 16 for tl.dot, <= 128), BLOCK_K gathers several narrow blocks or slices
    a wide one; short M tiles for decode-sized M. The interpreter gets small tiles."""
    bh, bw = block
    if interpreting():
        block_m, block_k, max_n, extra = 32, 32, 64, dict(num_warps=4)
    else:
        block_m, max_n, extra = (16 if m <= 16 else 64), 128, dict(num_warps=4, num_stages=3)
    block_n = min(max(16, triton.next_power_of_2(bh)), max_n)
    chunk_k = min(triton.next_power_of_2(bw), block_k)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, CHUNK_K=chunk_k,
                CHUNKS=triton.cdiv(bw, chunk_k), PARTS=triton.cdiv(bh, block_n), **extra)


def _check(x, values, crow_indices, col_indices, n, k, w_scale, bias, int8: bool):
    if x.dim() != 2 or (x.shape[0] > 0 and x.stride(1) != 1):
        raise ValueError(f"x: expected a 2-D tensor with unit stride along K, got {tuple(x.shape)} {x.stride()}")
    if x.shape[1] != k:
        raise ValueError(f"x: expected {k} columns (k), got shape {tuple(x.shape)}")
    want = torch.int8 if int8 else torch.float32
    if values.dim() != 3 or values.dtype != want or min(values.shape[1:]) < 1:
        raise ValueError(f"values: expected {want} [nnzb, bh, bw], got {values.dtype} {tuple(values.shape)}")
    bh = values.shape[1]
    nb = -(-n // bh)
    if crow_indices.dtype != torch.int32 or tuple(crow_indices.shape) != (nb + 1,):
        raise ValueError(f"crow_indices: expected int32 of shape ({nb + 1},), got "
                         f"{crow_indices.dtype} {tuple(crow_indices.shape)}")
    if col_indices.dtype != torch.int32 or tuple(col_indices.shape) != (values.shape[0],):
        raise ValueError(f"col_indices: expected int32 of shape ({values.shape[0]},), got "
                         f"{col_indices.dtype} {tuple(col_indices.shape)}")
    if w_scale is not None and tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale: expected shape ({n},), got {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    return nb


def block_sparse_linear(x2: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                        col_indices: torch.Tensor, n: int, k: int,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2: [M, k] fp32 or bf16 (unit stride along k); values fp32 [nnzb, bh, bw];
    int32 crow_indices / col_indices; bias fp32 [n] or None. -> y [M, n] in x2's dtype."""
    nb = _check(x2, values, crow_indices, col_indices, n, k, None, bias, int8=False)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x: expected float32 or bfloat16, got {x2.dtype}")
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    cfg = bsr_config(m, tuple(values.shape[1:]))
    grid = (nb * cfg["PARTS"], triton.cdiv(m, cfg["BLOCK_M"]))
    bf16 = x2.dtype == torch.bfloat16
    _bsr_kernel[grid](x2, values, crow_indices, col_indices, bias if bias is not None else values, y,
                      m, n, k, values.shape[1], values.shape[2],
                      x2.stride(0), *values.stride(), y.stride(0),
                      HAS_BIAS=bias is not None, BF16=bf16, BF16_DOT=bf16 and not interpreting(), **cfg)
    return y


def block_sparse_int8_linear(x2: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                             col_indices: torch.Tensor, n: int, k: int, w_scale: torch.Tensor,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2: [M, k] float (unit stride along k), quantized per row here; values int8
    [nnzb, bh, bw] in [-127, 127]; int32 indices; w_scale fp32 [n]; bias fp32 [n]
    or None. -> y [M, n] in x2's dtype."""
    from pyaccel.kernels.int8_gemm import quantize_per_row

    nb = _check(x2, values, crow_indices, col_indices, n, k, w_scale, bias, int8=True)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    q, sx = quantize_per_row(x2)
    cfg = bsr_config(m, tuple(values.shape[1:]), block_k=INT8_BLOCK_K)
    grid = (nb * cfg["PARTS"], triton.cdiv(m, cfg["BLOCK_M"]))
    _bsr_int8_kernel[grid](q, values, crow_indices, col_indices, sx, w_scale,
                           bias if bias is not None else w_scale, y,
                           m, n, k, values.shape[1], values.shape[2],
                           q.stride(0), *values.stride(), y.stride(0),
                           HAS_BIAS=bias is not None, **cfg)
    return y
