"""Triton binary (XNOR) kernels: sign-and-bitpack, popcount implicit-GEMM
convolution (Linear = the 1x1 case) and, for compute-bound layers (conv and
linear), bits unpacked to ±1 int8 in registers feeding ``tl.dot`` (tensor cores).

Same contract as ``pyaccel.reference_binary`` (sign(0) = +1, bit 1 = -1, exact
zero padding by a border correction, 'ones' padding without one). On the GPU
words are 32 bits: the canonical 64-bit weight words
(``pyaccel.formats.binary.pack_conv_weight``) viewed as int32 pairs keep their
bit order (little endian: channels 0-31 in the low word).

Popcount is bit arithmetic (SWAR), which the interpreter runs (it has no
libdevice) and which compiles to a handful of integer ops on the GPU.
Choice per shape (:func:`linear` by rows, :func:`conv2d` by output pixels; a
plain 1 x 1 conv runs as the linear): up to POPCOUNT_MAX_M rows read the packed
weights (32x less traffic than int8) with popcount on CUDA cores; more rows
unpack to int8 and use tensor cores. The threshold is a guess not yet measured
on a GPU. ``last_path`` says which ran.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyaccel.kernels._common import interpreting

POPCOUNT_MAX_M = 16
ACT = {"none": 0, "relu": 1, "hardtanh": 2, "prelu": 3}
last_path = {"linear": None, "conv": None}


@triton.jit
def _popc32(v):
    """Bits set in each int32 lane (SWAR; logical shifts via uint32)."""
    v = v.to(tl.uint32, bitcast=True)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return (v & 0x3F).to(tl.int32)


@triton.jit
def _pack_kernel(
    # pointers: x fp32 rows (a pixel's channels, channel stride 1), out int32 [rows, words]
    x_ptr, out_ptr,
    # sizes
    R, C, CG, WG, W_TOTAL,
    # strides (elements)
    stride_xr, stride_or,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Sign bits of x's channels, 32 to a word, per group (WG words of CG
    channels each; bits past CG stay 0)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ww = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    g = ww // WG
    c0 = g * CG + (ww % WG) * 32
    lim = (g + 1) * CG
    word = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
    for b in tl.static_range(32):
        c = c0 + b
        ok = (rr[:, None] < R) & (ww[None, :] < W_TOTAL) & (c[None, :] < lim[None, :])
        v = tl.load(x_ptr + rr[:, None].to(tl.int64) * stride_xr + c[None, :], mask=ok, other=0.0)
        word = word | ((v < 0).to(tl.int32) << b)
    tl.store(out_ptr + rr[:, None].to(tl.int64) * stride_or + ww[None, :], word,
             mask=(rr[:, None] < R) & (ww[None, :] < W_TOTAL))


@triton.jit
def _epilogue(dot, rm, rn, nmask, M, y_ptr, stride_ym, scale_ptr, shift_ptr, slope_ptr, lo, hi,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT_KIND: tl.constexpr):
    """y = act(dot * scale + shift) (multiply, then add: the reference's rounding)."""
    v = dot.to(tl.float32)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + rn, mask=nmask, other=1.0)[None, :]
    if HAS_SHIFT:
        v = v + tl.load(shift_ptr + rn, mask=nmask, other=0.0)[None, :]
    if ACT_KIND == 1:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT_KIND == 2:
        v = tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    elif ACT_KIND == 3:
        s = tl.load(slope_ptr + rn, mask=nmask, other=0.0)
        v = tl.where(v >= 0, v, v * s[None, :])
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], v,
             mask=(rm[:, None] < M) & nmask[None, :])


@triton.jit
def _tap(rm, t, NPIX, H, W, OH, OW, KW, SH, SW, PH, PW, DH, DW, G, WG, g):
    """For output pixels rm and tap t: whether the tap reads inside the input,
    and the word offset of its pixel's group-g words in the packed input."""
    img = rm // (OH * OW)
    rem = rm % (OH * OW)
    iy = (rem // OW) * SH - PH + (t // KW) * DH
    ix = (rem % OW) * SW - PW + (t % KW) * DW
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W) & (rm < NPIX)
    return inside, ((img * H + iy) * W + ix).to(tl.int64) * (G * WG) + g * WG


@triton.jit
def _conv_popcount_kernel(
    # pointers: packed x int32 [N, H, W, G * WG]; weights int32 [G, NB, TAPS, WG / 2, 32, 2] (module doc);
    # wsum int32 [OC, TAPS]; y fp32 [N * OH * OW, OC]; epilogue vectors fp32 [OC]
    xb_ptr, w_ptr, wsum_ptr, y_ptr, scale_ptr, shift_ptr, slope_ptr,
    # sizes
    NPIX, H, W, OH, OW, OC, OCG, CG, WG, KW, TAPS, SH, SW, PH, PW, DH, DW, lo, hi,
    # meta-parameters
    G: tl.constexpr, ZERO_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M output pixels x BLOCK_N (a divisor of 32) channels
    of one group. Taps outside the input read +1 (zero words); with ZERO_PAD
    their weights' sum (wsum) is subtracted: exact zero padding."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    per_block: tl.constexpr = 32 // BLOCK_N
    blk = pid_n // per_block
    lane = (pid_n % per_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc_g = blk * 32 + lane  # channel within the group
    rn = g * OCG + oc_g
    nmask = oc_g < OCG
    pop = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    corr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    nb = (OCG + 31) // 32
    wblock = w_ptr + ((g * nb + blk) * TAPS).to(tl.int64) * WG * 32
    for t in range(0, TAPS):
        inside, base = _tap(rm, t, NPIX, H, W, OH, OW, KW, SH, SW, PH, PW, DH, DW, G, WG, g)
        for q in range(0, WG):
            xw = tl.load(xb_ptr + base + q, mask=inside, other=0)
            # int64 words viewed as int32 pairs: [.., WG / 2, 32 lanes, 2 halves]
            ww = tl.load(wblock + t * WG * 32 + (q // 2) * 64 + lane * 2 + (q % 2), mask=nmask, other=0)
            pop += _popc32(xw[:, None] ^ ww[None, :])
        if ZERO_PAD:
            ws = tl.load(wsum_ptr + rn * TAPS + t, mask=nmask, other=0)
            corr += tl.where(inside, 0, 1)[:, None] * ws[None, :]
    dot = TAPS * CG - 2 * pop - corr
    _epilogue(dot, rm, rn, nmask, NPIX, y_ptr, OC, scale_ptr, shift_ptr, slope_ptr, lo, hi,
              HAS_SCALE, HAS_SHIFT, ACT_KIND)


@triton.jit
def _conv_dot_kernel(
    # pointers and sizes as _conv_popcount_kernel's (no wsum: a tap outside the input is 0 here)
    xb_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, slope_ptr,
    NPIX, H, W, OH, OW, OC, OCG, CG, WG, KW, TAPS, SH, SW, PH, PW, DH, DW, lo, hi,
    G: tl.constexpr, ZERO_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Compute-bound binary conv: one program = BLOCK_M output pixels x one
    32-channel weight block of one group; each (tap, 32-bit word) of x and of
    the weights unpacked to ±1 int8 in registers, tl.dot int8 -> int32. A tap
    outside the input unpacks to 0 with ZERO_PAD (exact zero padding, no
    correction table) and to +1 otherwise; the channel padding bits (+1 on
    both sides) are subtracted per tap that counts."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    g = tl.program_id(2)
    lane = tl.arange(0, 32)
    oc_g = blk * 32 + lane
    rn = g * OCG + oc_g
    nmask = oc_g < OCG
    bits = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, 32), dtype=tl.int32)
    counted = tl.zeros((BLOCK_M,), dtype=tl.int32)  # taps whose padding bits counted
    nb = (OCG + 31) // 32
    wblock = w_ptr + ((g * nb + blk) * TAPS).to(tl.int64) * WG * 32
    for t in range(0, TAPS):
        inside, base = _tap(rm, t, NPIX, H, W, OH, OW, KW, SH, SW, PH, PW, DH, DW, G, WG, g)
        if ZERO_PAD:
            keep = inside.to(tl.int32)
        else:
            keep = tl.full((BLOCK_M,), 1, tl.int32)
        counted += keep
        for q in range(0, WG):
            xw = tl.load(xb_ptr + base + q, mask=inside, other=0)
            ww = tl.load(wblock + t * WG * 32 + (q // 2) * 64 + lane * 2 + (q % 2), mask=nmask, other=0)
            a = ((1 - 2 * ((xw[:, None] >> bits[None, :]) & 1)) * keep[:, None]).to(tl.int8)  # [BLOCK_M, 32]
            b = (1 - 2 * ((ww[None, :] >> bits[:, None]) & 1)).to(tl.int8)  # [32 channels, 32 outputs]
            acc += tl.dot(a, b, out_dtype=tl.int32)
    dot = acc - (counted * (WG * 32 - CG))[:, None]
    _epilogue(dot, rm, rn, nmask, NPIX, y_ptr, OC, scale_ptr, shift_ptr, slope_ptr, lo, hi,
              HAS_SCALE, HAS_SHIFT, ACT_KIND)


@triton.jit
def _linear_dot_kernel(
    # pointers: packed x int32 [M, KW32]; weights int32 [NB, KW32 / 2, 32, 2]; y fp32 [M, N]
    xb_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, slope_ptr,
    # sizes
    M, N, K, KW32, lo, hi,
    # meta-parameters
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Compute-bound binary linear: each 32-bit word of x and of the weights
    unpacked to ±1 int8 in registers, tl.dot int8 -> int32 (tensor cores).
    Padding bits unpack to +1 on both sides: their products (K32 - K of
    them, all +1) are subtracted."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    bits = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wrow = (rn // 32).to(tl.int64) * KW32 * 32 + (rn % 32) * 2  # int32 pairs, as in the conv kernel
    for q in range(0, KW32):
        xw = tl.load(xb_ptr + rm.to(tl.int64) * KW32 + q, mask=rm < M, other=0)
        ww = tl.load(w_ptr + wrow + (q // 2) * 64 + (q % 2), mask=nmask, other=0)
        a = (1 - 2 * ((xw[:, None] >> bits[None, :]) & 1)).to(tl.int8)  # [BLOCK_M, 32]
        b = (1 - 2 * ((ww[None, :] >> bits[:, None]) & 1)).to(tl.int8)  # [32, BLOCK_N]
        acc += tl.dot(a, b, out_dtype=tl.int32)
    dot = acc - (KW32 * 32 - K)
    _epilogue(dot, rm, rn, nmask, M, y_ptr, N, scale_ptr, shift_ptr, slope_ptr, lo, hi,
              HAS_SCALE, HAS_SHIFT, ACT_KIND)


def _words32(bits64: torch.Tensor) -> torch.Tensor:
    return bits64.contiguous().view(torch.int32)


def pack(x_rows: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """x_rows fp32 [R, C] (channel stride 1) -> int32 [R, groups * 2 * ceil(C / groups / 64)]."""
    r, c = x_rows.shape
    cg = c // groups
    wg = 2 * (-(-cg // 64))
    out = torch.empty((r, groups * wg), dtype=torch.int32, device=x_rows.device)
    if r == 0:
        return out
    if x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    br, bw = (32, 16) if interpreting() else (64, 32)
    grid = (triton.cdiv(r, br), triton.cdiv(groups * wg, bw))
    _pack_kernel[grid](x_rows, out, r, c, cg, wg, groups * wg, x_rows.stride(0), out.stride(0),
                       BLOCK_R=br, BLOCK_W=bw)
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: torch.Tensor, weight_bits: torch.Tensor, wsum: torch.Tensor, scale, shift, slope, out_channels: int,
           kernel_size: Sequence[int], stride, padding, dilation, groups: int, padding_mode: str = "zeros",
           act: str = "none", act_lo: float = 0.0, act_hi: float = 0.0, path: Optional[str] = None) -> torch.Tensor:
    """Binary conv (pyaccel.ops_binary.binary_conv2d's arguments, checked
    there): x fp32 [N, C, H, W] -> [N, OC, OH, OW] (channels_last memory).
    path: None picks by output pixels as :func:`linear` picks by rows
    (popcount up to POPCOUNT_MAX_M, int8 tl.dot beyond), 'popcount' or 'dot'.
    A plain 1 x 1 conv (stride 1, no padding, one group) runs as that linear
    over its pixels. ``last_path["conv"]`` says which ran."""
    n, c, h, w = x.shape
    if path not in (None, "popcount", "dot"):
        raise ValueError(f"path: expected None, 'popcount' or 'dot', got {path!r}")
    if (tuple(kernel_size) == (1, 1) and _pair(stride) == (1, 1) and _pair(padding) == (0, 0)
            and _pair(dilation) == (1, 1) and groups == 1):
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        y = linear(rows, weight_bits, scale, shift, slope, out_channels, act, act_lo, act_hi, path)
        last_path["conv"] = last_path["linear"]
        return y.reshape(n, h, w, out_channels).permute(0, 3, 1, 2)
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    npix = n * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    if path is None:
        path = "popcount" if npix <= POPCOUNT_MAX_M else "dot"
    last_path["conv"] = path
    return _conv2d_packed(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding,
                          dilation, groups, padding_mode, act, act_lo, act_hi, path == "dot")


def _conv2d_packed(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding, dilation,
                   groups, padding_mode, act, act_lo, act_hi, dot: bool = False) -> torch.Tensor:
    n, c, h, w = x.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    oc = out_channels
    y = torch.empty((n * oh * ow, oc), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y.reshape(n, oh, ow, oc).permute(0, 3, 1, 2)
    xr = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    xb = pack(xr, groups)
    wg = xb.shape[1] // groups
    ocg = oc // groups
    dummy = y
    if dot:
        bm = 32 if interpreting() else 64
        _conv_dot_kernel[(triton.cdiv(n * oh * ow, bm), -(-ocg // 32), groups)](
            xb, _words32(weight_bits), y, scale if scale is not None else dummy,
            shift if shift is not None else dummy, slope if slope is not None else dummy,
            n * oh * ow, h, w, oh, ow, oc, ocg, c // groups, wg, kw, kh * kw, sh, sw, ph, pw, dh, dw,
            float(act_lo), float(act_hi), G=groups, ZERO_PAD=padding_mode == "zeros", HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, ACT_KIND=ACT[act], BLOCK_M=bm)
        return y.reshape(n, oh, ow, oc).permute(0, 3, 1, 2)
    bm, bn = (32, 32) if interpreting() else (64, 32)
    grid = (triton.cdiv(n * oh * ow, bm), -(-ocg // 32) * (32 // bn), groups)
    _conv_popcount_kernel[grid](
        xb, _words32(weight_bits), wsum, y, scale if scale is not None else dummy,
        shift if shift is not None else dummy, slope if slope is not None else dummy,
        n * oh * ow, h, w, oh, ow, oc, ocg, c // groups, wg, kw, kh * kw, sh, sw, ph, pw, dh, dw,
        float(act_lo), float(act_hi), G=groups, ZERO_PAD=padding_mode == "zeros" and (ph > 0 or pw > 0),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT_KIND=ACT[act], BLOCK_M=bm, BLOCK_N=bn)
    return y.reshape(n, oh, ow, oc).permute(0, 3, 1, 2)


def linear(x: torch.Tensor, weight_bits: torch.Tensor, scale, shift, slope, out_features: int,
           act: str = "none", act_lo: float = 0.0, act_hi: float = 0.0, path: Optional[str] = None) -> torch.Tensor:
    """Binary linear, x fp32 [M, K] -> [M, N]. path: None (pick by M: popcount
    up to POPCOUNT_MAX_M rows, else 'dot'), 'popcount' or 'dot'."""
    m, k = x.shape
    if path is None:
        path = "popcount" if m <= POPCOUNT_MAX_M else "dot"
    last_path["linear"] = path
    if path == "popcount":
        wsum = torch.zeros((out_features, 1), dtype=torch.int32, device=x.device)
        y = _conv2d_packed(x[:, :, None, None], weight_bits, wsum, scale, shift, slope, out_features, (1, 1), 1,
                           0, 1, 1, "ones", act, act_lo, act_hi)
        return y.reshape(m, out_features)
    y = torch.empty((m, out_features), dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    xb = pack(x, 1)
    bm, bn = (32, 32) if interpreting() else (64, 64)
    grid = (triton.cdiv(m, bm), triton.cdiv(out_features, bn))
    dummy = y
    _linear_dot_kernel[grid](
        xb, _words32(weight_bits), y, scale if scale is not None else dummy, shift if shift is not None else dummy,
        slope if slope is not None else dummy, m, out_features, k, xb.shape[1], float(act_lo), float(act_hi),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT_KIND=ACT[act], BLOCK_M=bm, BLOCK_N=bn)
    return y
