"""Triton 2:4 sparse linear: y = x @ W.T + bias, W in pyaccel's canonical 2:4
form (values fp32 [N, 2G], meta uint8 [N, ceil(G/2)] with a nibble i0 | i1 << 2
per group of 4 inputs). Each program loads the compressed values and
positions of its [BLOCK_N, BLOCK_K] weight tile, expands them to dense in
registers, and feeds tl.dot: at small M the weight bytes read are about half
of dense (the bandwidth win), the math is dense tensor-core math.

fp32 activations use IEEE fp32 dot products (no TF32), so results match the
dense fp32 reference to rounding; bf16 activations use bf16 tensor cores with
fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import interpreting


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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_ok = rn[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk  # [BK]
        grp = kk // 4
        posk = (kk % 4)[:, None]
        k_ok = kk[:, None] < K
        # positions: nibble of group grp in byte grp // 2 of row n
        byte = tl.load(meta_ptr + rn[None, :].to(tl.int64) * stride_metan + (grp // 2)[:, None],
                       mask=n_ok & k_ok, other=0).to(tl.int32)
        nib = (byte >> ((grp % 2) * 4)[:, None]) & 0xF
        i0 = nib & 3
        i1 = nib >> 2
        vrow = v_ptr + rn[None, :].to(tl.int64) * stride_vn + (2 * grp)[:, None]
        v0 = tl.load(vrow, mask=n_ok & k_ok, other=0.0)
        v1 = tl.load(vrow + 1, mask=n_ok & k_ok, other=0.0)
        w = tl.where(posk == i0, v0, tl.where(posk == i1, v1, 0.0))  # [BK, BN] dense tile
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
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


def gemm_config(m: int, n: int, k: int) -> dict:
    """Tiles keyed on M (sm80/sm90): short tiles for decode-sized M, where the
    kernel is bound by weight bytes; the interpreter gets small tiles."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [M, K] float (unit stride along K); values fp32 [N, 2G]; meta uint8 [N, ceil(G/2)]."""
    if x.dim() != 2 or (x.shape[0] > 0 and x.stride(1) != 1):
        raise ValueError(f"x: expected a 2-D tensor with unit stride along K, got {tuple(x.shape)} {x.stride()}")
    m = x.shape[0]
    n = values.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _sparse24_kernel[grid](x, values, meta, bias if bias is not None else values, y, m, n, k,
                           x.stride(0), values.stride(0), meta.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16,
                           BF16_DOT=x.dtype == torch.bfloat16 and not interpreting(), **cfg)
    return y
