"""Pure-PyTorch references for every pyaccel op.

These define what the kernels compute, for finite inputs. Native and Triton
kernels are tested against them (integer parts exactly), and they run wherever
no faster backend exists. They work on any device and dtype torch supports.

One difference with non-finite x: the sparse references (sparse24_linear,
block_sparse_linear) multiply by the dense weight, so a NaN or inf in
x[..., j] gives NaN in every output of that row (0 * inf is NaN), whereas the
kernels read x[..., j] only for the weights they keep and give NaN only in
the outputs whose kept weights read it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

QMAX = 127
QMAX7 = 63
"""Activation range of the opt-in 7-bit mode (Int8Linear act_bits=7): q in [-63, 63]."""
ACT_QMAX = {8: QMAX, 7: QMAX7}
"""act_bits -> qmax of the per-row activation quantization."""
INT8_MAX_K = 131072
"""Largest K for int8 paths: 127 * 127 * K stays below 2**31, so the int32
accumulators cannot overflow whatever the values."""
"""Symmetric int8 range is [-127, 127]: -128 is never produced, so negating a
value (the sign trick of the AVX2 kernels) cannot overflow."""


TINY_AMAX = 2.0 ** -64
"""Rows with 0 < max|x| < TINY_AMAX are quantized after multiplying x and max|x|
by TINY_LIFT = 2**64 (exact in fp32: the results are normal): 127 / max|x|
itself overflows fp32 for max|x| below ~3.7e-37. Where 127 / max|x| is finite
the lift does not change q: fp32(127 / (max|x| * 2**64)) = inv * 2**-64 with
inv = fp32(127 / max|x|), and x * 2**64 * inv * 2**-64 is the same real number
as x * inv, so both round to the same fp32 value. Only rows that used to
overflow get a different q."""
TINY_LIFT = 2.0 ** 64


def quantize_rows_fp32(xf: torch.Tensor, amax: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """The int8 rounding rule shared by activations and weights.

    xf: fp32 [..., K] (finite); amax: fp32 [..., 1], max|xf| over the last dim;
    qmax: 127, or 63 for 7-bit activations.
    Returns q int8 [..., K]: with lift = 2**64 if 0 < amax < 2**-64 else 1,
    q = clamp(round_half_even(fp32(fp32(xf * lift) * fp32(qmax / (amax * lift)))), -qmax, qmax);
    q = 0 where amax is 0. Every multiplication by lift is exact, so q is finite
    and correct for every finite fp32 amax, subnormal included.
    """
    lift = torch.where(amax < TINY_AMAX, torch.full_like(amax, TINY_LIFT), torch.ones_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, float(qmax)) / (amax * lift), torch.zeros_like(amax))
    return torch.round((xf * lift) * inv).clamp_(-qmax, qmax).to(torch.int8)


def quantize_per_row(x: torch.Tensor, qmax: int = QMAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row (last dim) of `x`.

    scale = fp32(max|x| / 127); q = clamp(round_half_even(x * (127 / max|x|)), -127, 127),
    or the same with 63 in place of 127 when qmax = 63 (7-bit activations),
    with x and max|x| first multiplied by 2**64 when 0 < max|x| < 2**-64 (see
    quantize_rows_fp32), so q is right for every finite row, subnormals included.
    The scale is subnormal below max|x| ≈ 1.5e-36 (127 * 2**-126); its
    relative spacing there grows to 2**-149 / scale (about 2e-3 at max|x| = 1e-40),
    and below max|x| ≈ 8.9e-44 (127 * 2**-150) the scale rounds to 0.
    A row of zeros gets scale 0 and q 0; a row holding an inf or NaN gets q 0
    and scale NaN (so int8_linear returns NaN there, as the float layer would).
    Computed in fp32 whatever x's dtype.
    Returns (q int8 [..., K], scale fp32 [...]).
    """
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    xf = torch.where(finite, xf, torch.zeros_like(xf))
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] > 0 else xf.new_zeros(*xf.shape[:-1], 1)
    q = quantize_rows_fp32(xf, amax, qmax)
    scale = torch.where(finite, amax / qmax, torch.full_like(amax, float("nan")))
    return q, scale.squeeze(-1)


def int8_matmul_exact(q: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """int32 accumulation q @ w_int8.T, exact (fp64 holds every partial sum exactly)."""
    return (q.double() @ w_int8.double().t()).to(torch.int32)


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    qmax: int = QMAX,
) -> torch.Tensor:
    """y = float(q(x) @ w_int8.T) * sx * w_scale + bias, in x's dtype.

    x: [..., K] float; w_int8: [N, K] int8; w_scale: [N] fp32; bias: [N] or None;
    qmax: the activation range, 127 (8-bit) or 63 (the opt-in 7-bit mode).
    The scale product is formed as (float(acc) * lo) * (hi * w_scale), (lo, hi) =
    (sx, 1) where sx < 1, else (1, sx): float(acc) * sx cannot overflow when sx < 1
    (|acc| < 2**31) and keeps a tiny or subnormal sx's precision, and sx * w_scale
    cannot underflow when sx >= 1. y is then accurate unless it is itself subnormal
    (below 1.2e-38) or beyond fp32.
    """
    k = w_int8.shape[1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    q, sx = quantize_per_row(x2, qmax)
    acc = int8_matmul_exact(q, w_int8)
    small = sx < 1
    lo = torch.where(small, sx, torch.ones_like(sx))[:, None]
    hi = torch.where(small, torch.ones_like(sx), sx)[:, None]
    y = (acc.float() * lo) * (hi * w_scale.float()[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T + bias for a 2:4 weight in canonical form (pyaccel.formats.sparse24),
    computed densely in fp32; output in x's dtype. A NaN / inf in x therefore
    spreads to every output of its row (the pruned weights' 0 * inf is NaN);
    the kernels spread it only to the outputs whose kept weights read it.
    For finite x, this is what the kernels compute."""
    from pyaccel.formats.sparse24 import Sparse24Weight, decompress

    w = decompress(Sparse24Weight(values, meta, k)).float()
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                         w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int8_linear with a 2:4 int8 weight in canonical form (values int8 [N, 2G])."""
    from pyaccel.formats.sparse24 import Sparse24Weight, decompress

    w = decompress(Sparse24Weight(values, meta, k))
    return int8_linear(x, w, w_scale, bias)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                        col_indices: torch.Tensor, n: int, k: int,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T + bias for a block-sparse W in canonical BSR form
    (pyaccel.formats.block_sparse: values [nnzb, bh, bw] fp32, int32 indices),
    computed densely in fp32; output in x's dtype. A NaN / inf in x therefore
    spreads to every output of its row (the pruned weights' 0 * inf is NaN);
    the kernels spread it only to the outputs whose kept weights read it.
    For finite x, this is what the kernels compute."""
    from pyaccel.formats.block_sparse import BlockSparseWeight, decompress

    w = decompress(BlockSparseWeight(values, crow_indices, col_indices, (n, k))).float()
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def block_sparse_int8_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                             col_indices: torch.Tensor, n: int, k: int, w_scale: torch.Tensor,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int8_linear with a block-sparse int8 weight in canonical BSR form
    (values int8 [nnzb, bh, bw] in [-127, 127], w_scale fp32 [n])."""
    from pyaccel.formats.block_sparse import BlockSparseWeight, decompress

    w = decompress(BlockSparseWeight(values, crow_indices, col_indices, (n, k)))
    return int8_linear(x, w, w_scale, bias)


def _dws_depthwise(x, dw_weight, dw_bias, stride, dilation, pads, act1):
    """act1(depthwise conv of zero-padded x), fp32 NCHW (x [N, C, H, W] or
    unbatched [C, H, W]). x is taken contiguous (NCHW) first: torch's depthwise
    conv sums in another order for channels_last input, and the reference
    must not depend on the memory format."""
    import torch.nn.functional as F

    xf = x.float().contiguous()
    t, b, l, r = pads
    if t or b or l or r:
        xf = F.pad(xf, (l, r, t, b))
    d = F.conv2d(xf, dw_weight.float(), None if dw_bias is None else dw_bias.float(), tuple(stride), 0,
                 tuple(dilation), groups=dw_weight.shape[0])
    return act1(d)


def _in_format_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's dtype and memory format (channels_last or contiguous)."""
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def dws_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor], pw_weight: torch.Tensor,
               pw_bias: Optional[torch.Tensor], stride, dilation, pads, act1, act2) -> torch.Tensor:
    """Fused depthwise-separable convolution, what the native and Triton kernels compute:

        t = act1(conv2d(pad(x), dw_weight, dw_bias, stride, dilation, groups=C))
        y = act2(conv2d(t, pw_weight, pw_bias))

    x [N, C, H, W] (fp32/bf16, computed in fp32, returned in x's dtype and
    memory format); dw_weight [C, 1, kh, kw]; pw_weight [Cout, C, 1, 1];
    pads (top, bottom, left, right) zero padding; act1/act2: callables
    (pyaccel._pattern.Activation)."""
    import torch.nn.functional as F

    t = _dws_depthwise(x, dw_weight, dw_bias, stride, dilation, pads, act1)
    y = act2(F.conv2d(t, pw_weight.float(), None if pw_bias is None else pw_bias.float()))
    return _in_format_of(y, x)


def dws_conv2d_int8(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                    pw_int8: torch.Tensor, pw_scale: torch.Tensor, pw_bias: Optional[torch.Tensor], stride, dilation,
                    pads, act1, act2) -> torch.Tensor:
    """Fused depthwise-separable conv with an int8 pointwise stage: the depthwise
    part as in dws_conv2d (fp32), then per output pixel the channels quantized
    per row (int8_linear's rule) against int8 per-output-channel weights pw_int8
    [Cout, C] with scales pw_scale [Cout], + bias, act2. x [N, C, H, W] or
    unbatched [C, H, W]; x's dtype and memory format."""
    if x.dim() == 3:  # unbatched [C, H, W]
        return dws_conv2d_int8(x.unsqueeze(0), dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, stride, dilation, pads,
                               act1, act2).squeeze(0)
    rows = _dws_depthwise(x, dw_weight, dw_bias, stride, dilation, pads, act1).permute(0, 2, 3, 1)  # NHWC rows
    y = act2(int8_linear(rows.contiguous(), pw_int8, pw_scale, pw_bias)).permute(0, 3, 1, 2)
    return _in_format_of(y, x)
