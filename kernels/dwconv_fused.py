"""Triton fused depthwise-separable convolution (pyaccel::dws_conv2d on CUDA):

    t[p, c] = act1(sum_taps x[pixel(p, tap), c] * wd[tap, c] + bd[c])   (zero padding)
    y[p, o] = act2(sum_c t[p, c] * wp[c, o] + bp[o])

in NHWC: x [N, H, W, C] contiguous, y [N * OH * OW, Cout]. Grid: one program
per (BLOCK_M output pixels, BLOCK_N output channels). For each chunk of
BLOCK_K channels the program computes the depthwise tile t [BLOCK_M, BLOCK_K]
in registers (a loop over the KH x KW taps, masked at the padding) and feeds
it straight into tl.dot with the pointwise weight tile [BLOCK_K, BLOCK_N]: t
never goes to memory. The depthwise work is repeated for each of the
ceil(Cout / BLOCK_N) column tiles (1 - 7 % of the MACs per repeat for
MobileNet blocks). Dot products in IEEE fp32 (no TF32), fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import interpreting

# activation codes: pyaccel._pattern.ActKind
_NONE, _RELU, _RELU6, _HARDSWISH, _SILU, _HARDTANH = 0, 1, 2, 3, 4, 5


@triton.jit
def _act(v, ACT: tl.constexpr, lo, hi):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    elif ACT == 3:
        v = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 4:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 5:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


@triton.jit
def _dws_kernel(
    # pointers: x NHWC, wd [KH * KW, C], bd [C], wp [C, COUT], bp [COUT] (or unused), y [P, COUT]
    x_ptr, wd_ptr, bd_ptr, wp_ptr, bp_ptr, y_ptr,
    # sizes
    P, H, W, C, COUT, OH, OW,
    # geometry
    SH, SW, DH, DW, PAD_T, PAD_L,
    # activation bounds (Hardtanh)
    lo1, hi1, lo2, hi2,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (over the batch)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    m_ok = rm < P
    img = rm // (OH * OW)
    rest = rm % (OH * OW)
    iy0 = (rest // OW) * SH - PAD_T
    ix0 = (rest % OW) * SW - PAD_L
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        kk = c0 + tl.arange(0, BLOCK_K)
        k_ok = kk < C
        t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32) + tl.load(bd_ptr + kk, mask=k_ok, other=0.0)[None, :]
        for i in tl.static_range(KH):
            iy = iy0 + i * DH
            row_ok = m_ok & (iy >= 0) & (iy < H)
            for j in tl.static_range(KW):
                ix = ix0 + j * DW
                ok = row_ok & (ix >= 0) & (ix < W)
                base = ((img.to(tl.int64) * H + iy) * W + ix) * C
                xv = tl.load(x_ptr + base[:, None] + kk[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                wv = tl.load(wd_ptr + (i * KW + j) * C + kk, mask=k_ok, other=0.0)
                t += xv * wv[None, :]
        t = _act(t, ACT1, lo1, hi1)
        t = tl.where(k_ok[None, :], t, 0.0)  # channels past C add nothing (an activation may move 0)
        wp = tl.load(wp_ptr + kk[:, None].to(tl.int64) * COUT + rn[None, :],
                     mask=k_ok[:, None] & (rn[None, :] < COUT), other=0.0)
        acc += tl.dot(t, wp, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bp_ptr + rn, mask=rn < COUT, other=0.0)[None, :]
    acc = _act(acc, ACT2, lo2, hi2)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * COUT + rn[None, :], acc, mask=m_ok[:, None] & (rn[None, :] < COUT))


def dws_config(c: int, cout: int):
    """Tile sizes: small tiles under the interpreter (tests), GPU tiles otherwise."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64 if cout <= 64 else 128, BLOCK_K=32, num_warps=4, num_stages=2)


def dws_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, act1, act2):
    """x [N, C, H, W] (any memory format, fp32/bf16; computed in fp32) -> y [N, Cout, OH, OW]
    in x's dtype and memory format. Arguments checked by pyaccel.ops_conv."""
    n, c, h, w = x.shape
    cout = pw_weight.shape[0]
    oh, ow = geo.out_size(h, w)
    t, _, l, _ = geo.pads(h, w)
    kh, kw = geo.kernel
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.empty(n, oh, ow, cout, dtype=torch.float32, device=x.device)
    p = n * oh * ow
    if p > 0:
        xn = x.float().permute(0, 2, 3, 1).contiguous()
        wd = dw_weight.reshape(c, kh * kw).t().contiguous()
        wp = pw_weight.reshape(cout, c).t().contiguous()
        bd = dw_bias if dw_bias is not None else torch.zeros(c, device=x.device)
        cfg = dws_config(c, cout)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(p, cfg["BLOCK_M"]), triton.cdiv(cout, cfg["BLOCK_N"]))
        _dws_kernel[grid](xn, wd, bd, wp, pw_bias if pw_bias is not None else bd, y,
                          p, h, w, c, cout, oh, ow, geo.stride[0], geo.stride[1], geo.dilation[0], geo.dilation[1],
                          t, l, act1.lo, act1.hi, act2.lo, act2.hi,
                          KH=kh, KW=kw, ACT1=int(act1.kind), ACT2=int(act2.kind), HAS_BIAS=pw_bias is not None,
                          num_warps=warps, num_stages=stages, **cfg)
    y = y.permute(0, 3, 1, 2)
    y = y if cl else y.contiguous()
    return y.to(x.dtype)
