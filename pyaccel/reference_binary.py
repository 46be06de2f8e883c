"""Pure-PyTorch references of the binary (XNOR) ops: what the kernels compute.

Two independent formulations, tested against each other:

- :func:`binary_conv2d`: float arithmetic on ±1 tensors,
  ``F.conv2d(sign(x), sign(w), padding=p)`` (exact zero padding) or
  ``F.conv2d(pad(sign(x), value=+1), sign(w))`` (one padding), then the
  epilogue ``y = dot * scale + shift`` and the activation. Every dot is an
  integer below 2**24, so fp32 holds it exactly.
- :func:`binary_conv2d_bits`: bit arithmetic as the kernels do it: channels
  packed into 64-bit words, ``K - 2 * popcount(x xor w)`` over a +1-padded
  input, minus the border correction (sum of the ±1 weights of every tap
  that falls outside the input) for exact zero padding.

The epilogue multiplies, then adds (no FMA), as the kernels do, so a layer
without folded BatchNorm gives bit-identical results on every path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyaccel.formats import binary as bf

ACTIVATIONS = ("none", "relu", "hardtanh", "prelu")
"""Epilogue activations: relu; hardtanh(min_val, max_val); prelu(slope per
output channel, or one slope broadcast)."""
PADDING_MODES = ("zeros", "ones")
"""Spatial padding of the ±1 input: 'zeros' is exact (a border tap adds 0),
'ones' pads with +1 (cheaper: no correction term; what Larq calls one-padding)."""


def pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def epilogue(dot: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], act: str = "none",
             act_params: Sequence[float] = (), slope: Optional[Tensor] = None, dim: int = 1) -> Tensor:
    """y = act(dot * scale + shift), scale/shift per output channel along `dim`."""
    shape = [1] * dot.dim()
    shape[dim] = -1
    y = dot
    if scale is not None:
        y = y * scale.reshape(shape)
    if shift is not None:
        y = y + shift.reshape(shape)
    if act == "relu":
        y = torch.relu(y)
    elif act == "hardtanh":
        y = torch.clamp(y, act_params[0], act_params[1])
    elif act == "prelu":
        s = slope.reshape(shape) if slope.numel() > 1 else slope.reshape(())
        y = torch.where(y >= 0, y, y * s)
    elif act != "none":
        raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")
    return y


def binary_conv2d_dot(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                      padding_mode: str = "zeros", ste: bool = False) -> Tensor:
    """The integer dot products of a binary conv as fp32: conv(sign(x), sign(w)).
    ste=True: sign(x) in x's float dtype with the straight-through gradient
    (passed where |x| <= 1), the gradient the inference modules define."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if ste:
        from pyaccel.nn.binary import sign_ste

        sx = sign_ste(x)
        sw = bf.sign(weight.to(x.dtype))
    else:
        sx, sw = bf.sign(x.float()), bf.sign(weight.float())
    ph, pw = pair(padding)
    if padding_mode == "ones":
        sx = F.pad(sx, (pw, pw, ph, ph), value=1.0)
        ph = pw = 0
    return F.conv2d(sx, sw, None, pair(stride), (ph, pw), pair(dilation), groups)


def binary_conv2d(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride=1,
                  padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", act: str = "none",
                  act_params: Sequence[float] = (), slope: Optional[Tensor] = None, ste: bool = False) -> Tensor:
    """Binary convolution, NCHW in and out (fp32; ste=True: x's dtype, with the
    straight-through gradient of :func:`binary_conv2d_dot`):
    ``act(conv(sign(x), sign(w)) * scale + shift)``.

    x: [N, C, H, W]; weight: [OC, C / groups, kh, kw] (only its signs count);
    scale, shift: [OC] or None. Method: XNOR-Net (Rastegari et al., 2016)
    with scale = alpha = mean|w| per output channel (BatchNorm folded in by patch).
    """
    dot = binary_conv2d_dot(x, weight, stride, padding, dilation, groups, padding_mode, ste)
    if ste:  # the training modules' gradients: nn.Hardtanh / ReLU6 pass none at their bounds, nn.PReLU its slope at 0
        scale, shift, slope = (None if t is None else t.to(dot.dtype) for t in (scale, shift, slope))
        y = epilogue(dot, scale, shift)
        if act == "hardtanh":
            return F.hardtanh(y, act_params[0], act_params[1])
        if act == "prelu":
            return F.prelu(y, slope.reshape(-1))
        return epilogue(y, None, None, act, act_params, slope, dim=1)
    return epilogue(dot, scale, shift, act, act_params, slope, dim=1)


def binary_linear(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                  act: str = "none", act_params: Sequence[float] = (), slope: Optional[Tensor] = None) -> Tensor:
    """Binary linear: ``act((sign(x) @ sign(w)ᵀ) * scale + shift)``; x [..., K], weight [N, K]."""
    dot = bf.sign(x.float()) @ bf.sign(weight.float()).t()
    return epilogue(dot, scale, shift, act, act_params, slope, dim=-1)


def border_correction(wsum: Tensor, h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Tensor:
    """int32 [OH, OW, OC]: for each output pixel the sum, over the taps that
    fall outside the H x W input, of that tap's ±1 weight sum (wsum [OC, kh*kw])."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ih = torch.arange(oh)[:, None] * sh - ph + torch.arange(kh)[None, :] * dh  # [OH, kh]
    iw = torch.arange(ow)[:, None] * sw - pw + torch.arange(kw)[None, :] * dw  # [OW, kw]
    out_h = (ih < 0) | (ih >= h)
    out_w = (iw < 0) | (iw >= w)
    outside = out_h[:, None, :, None] | out_w[None, :, None, :]  # [OH, OW, kh, kw]
    return (outside.reshape(oh, ow, kh * kw).to(torch.int64) @ wsum.t().to(torch.int64)).to(torch.int32)


def binary_conv2d_bits(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                       padding_mode: str = "zeros") -> Tensor:
    """The dots of :func:`binary_conv2d_dot` computed from packed bits (int32,
    NHWC [N, OH, OW, OC]): xor + popcount over a +1-padded input, then the
    border correction for zero padding. Small shapes only (it materializes patches)."""
    n, c, h, w = x.shape
    oc, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    xb = bf.pack_bits_last((x < 0).permute(0, 2, 3, 1).reshape(n, h, w, groups, cg))  # [N,H,W,G,Cw]
    xb = F.pad(xb, (0, 0, 0, 0, pw, pw, ph, ph))  # +1 (bit 0) border
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (torch.arange(oh) * sh)[:, None] + torch.arange(kh)[None, :] * dh
    cols = (torch.arange(ow) * sw)[:, None] + torch.arange(kw)[None, :] * dw
    patches = xb[:, rows[:, None, :, None], cols[None, :, None, :]]  # [N,OH,OW,kh,kw,G,Cw]
    wb = bf.pack_bits_last((weight < 0).permute(0, 2, 3, 1)).reshape(groups, oc // groups, kh, kw, -1)
    # [N,OH,OW,G,OCg,kh,kw,Cw]
    xor = patches.permute(0, 1, 2, 5, 3, 4, 6)[:, :, :, :, None] ^ wb[None, None, None]
    pop = bf.popcount64(xor).sum((-1, -2, -3)).reshape(n, oh, ow, oc)
    dot = kh * kw * cg - 2 * pop
    if padding_mode == "zeros":
        wsum = (cg - 2 * (weight < 0).reshape(oc, cg, kh * kw).sum(1))
        dot = dot - border_correction(wsum, h, w, kh, kw, stride, padding, dilation)[None]
    return dot.to(torch.int32)
