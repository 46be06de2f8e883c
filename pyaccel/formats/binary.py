"""Bit-packed binary (±1) tensors: the canonical form of XNOR layers.

Conventions:

- sign(v) = -1 where v < 0, else +1 (sign(0) = sign(-0.0) = +1; NaN counts as +1).
- A bit is 1 for -1 and 0 for +1, so for two ±1 vectors of K entries
  ``dot = K - 2 * popcount(a xor b)``.
- Bits are packed along channels (channels-last) into 64-bit words, channel c
  of a group in bit ``c % 64`` of word ``c // 64``. The bits past the group's
  channel count are 0 in every operand, so their xor is 0 and they never count.

Pure functions of torch tensors (any device), so the packed weights are
machine-independent; the CPU kernels read them as they are.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

WORD_BITS = 64
NR = 32
"""Output channels per packed weight block: the kernels' register tile
(AVX-512: 4 vectors of 8 64-bit lanes; AVX2 and portable kernels read the
same blocks 8 or 1 lanes at a time). Channels past a group's count are 0."""

_SHIFTS = None


def words(channels: int) -> int:
    """64-bit words holding `channels` bits."""
    return -(-channels // WORD_BITS)


def sign(x: Tensor) -> Tensor:
    """±1 in x's dtype: -1 where x < 0, else +1 (0, -0.0 and NaN give +1)."""
    return torch.where(x < 0, -torch.ones((), dtype=x.dtype, device=x.device),
                       torch.ones((), dtype=x.dtype, device=x.device))


def pack_bits_last(neg: Tensor) -> Tensor:
    """Bool [..., C] (True = -1) -> int64 words [..., ceil(C / 64)] (bit c % 64
    of word c // 64; bits past C are 0)."""
    c = neg.shape[-1]
    w = words(c)
    if w * WORD_BITS != c:
        neg = torch.nn.functional.pad(neg, (0, w * WORD_BITS - c))
    bits = neg.reshape(*neg.shape[:-1], w, WORD_BITS).to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=neg.device, dtype=torch.int64)
    # distinct powers of two never carry, so the (wrapping) sum is the bitwise or
    return (bits << shifts).sum(-1)


def unpack_bits_last(packed: Tensor, channels: int) -> Tensor:
    """int64 words [..., W] -> bool [..., channels] (True = -1)."""
    shifts = torch.arange(WORD_BITS, device=packed.device, dtype=torch.int64)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * WORD_BITS)[..., :channels].bool()


def popcount64(v: Tensor) -> Tensor:
    """Bits set in each int64 word (SWAR bit arithmetic; works wherever torch does)."""
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    # byte sum without a wrapping multiply: shift-adds, then the low byte
    v = v + (v >> 8)
    v = v + (v >> 16)
    v = v + (v >> 32)
    return v & 0x7F


def pack_conv_weight(weight: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Pack a conv weight [OC, Cg, kh, kw] (any float dtype) for the kernels.

    Returns (packed, wsum):
      packed: int64 [groups, ceil(OCg / NR), kh * kw, ceil(Cg / 64), NR], the
        sign bits of output channel ``g * OCg + b * NR + j`` at tap t, word i in
        ``packed[g, b, t, i, j]`` (0 past OCg: those channels are never stored);
      wsum: int32 [OC, kh * kw], the sum of the ±1 weights of each tap
        (Cg - 2 * popcount): the exact-zero-padding correction of a tap that
        falls outside the input.
    A Linear weight [N, K] is the 1x1 case with groups = 1.
    """
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    oc, cg, kh, kw = weight.shape
    if groups < 1 or oc % groups:
        raise ValueError(f"groups: {groups} does not divide the {oc} output channels")
    ocg = oc // groups
    neg = (weight.detach() < 0).permute(0, 2, 3, 1)  # [OC, kh, kw, Cg]
    bits = pack_bits_last(neg).reshape(groups, ocg, kh * kw, words(cg))
    nb = -(-ocg // NR)
    if nb * NR != ocg:
        bits = torch.nn.functional.pad(bits, (0, 0, 0, 0, 0, nb * NR - ocg))
    packed = bits.reshape(groups, nb, NR, kh * kw, words(cg)).permute(0, 1, 3, 4, 2).contiguous()
    wsum = (cg - 2 * neg.reshape(oc, kh * kw, cg).sum(-1)).to(torch.int32)
    return packed, wsum


def valid_bits_mask(shape, oc: int, cg: int, device=None) -> Tensor:
    """int64 mask of :func:`pack_conv_weight`'s output shape [G, NB, T, W, NR]
    with every bit set that holds a weight: channel bits below ``cg`` in each
    group's words and lanes below ``oc / G`` in each group's panels. The
    canonical packing has 0 everywhere else (the kernels count those bits)."""
    groups, nb, taps, nw, nr = shape
    ocg = oc // groups
    word = torch.full((nw,), -1, dtype=torch.int64, device=device)
    rem = cg - WORD_BITS * (nw - 1)
    if 0 < rem < WORD_BITS:
        word[-1] = (1 << rem) - 1
    lane = (torch.arange(nb * nr, device=device) < ocg).reshape(nb, nr)
    mask = torch.where(lane[:, None, None, :], word[None, None, :, None], torch.zeros((), dtype=torch.int64))
    return mask.expand(groups, nb, taps, nw, nr)


def unpack_conv_weight(packed: Tensor, oc: int, cg: int, kh: int, kw: int) -> Tensor:
    """The ±1 float32 weight [OC, Cg, kh, kw] of :func:`pack_conv_weight`'s output."""
    groups, nb = packed.shape[0], packed.shape[1]
    ocg = oc // groups
    bits = packed.permute(0, 1, 4, 2, 3).reshape(groups, nb * NR, kh * kw, -1)[:, :ocg]
    neg = unpack_bits_last(bits, cg).reshape(oc, kh, kw, cg).permute(0, 3, 1, 2)
    return 1.0 - 2.0 * neg.float()
