"""Binary (XNOR) ops, registered with ``torch.library``: schema, argument
checks naming the argument, the CPU kernels (pyaccel._C, csrc/binary/), the
pure-PyTorch reference elsewhere (:mod:`pyaccel.reference_binary`), fake
implementations. Autograd: the straight-through estimator's gradient to x
(that of :class:`pyaccel.nn.BinaryConv2d`), none to the buffers.

``torch.ops.pyaccel.binary_conv2d(x, weight_bits, wsum, scale, shift, slope,
out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
act, act_lo, act_hi)`` -> fp32 [N, OC, OH, OW] in channels_last memory format;
``torch.ops.pyaccel.binary_linear(x, weight_bits, wsum, scale, shift, slope,
out_features, act, act_lo, act_hi)``: its 1 x 1 case on x [..., K] -> [..., N].
act_lo / act_hi are act='hardtanh''s bounds: finite, act_lo < act_hi
(ValueError naming them otherwise); other activations ignore them.
weight_bits and wsum must hold pack_conv_weight's values where the kernels
read them: bits past the input channels in a row's last word must be 0, and
wsum must be the ±1 weight sums of weight_bits where it is read (exact zero
padding with padding > 0); a call checks both (ValueError naming them) unless
the same tensor objects passed the same check before and neither has been
written since (their version counters unchanged): a module's calls pay the
pass over the weights (and on CUDA a device sync) once, not per call (the
wsum pass costs about 0.5 - 3x a batch-1 3x3 conv call on one CPU thread).
Writes that move no version counter are not seen: through ``.data``
(``wsum.data[0, 0] = 5``), ``.numpy()``, ``torch.from_numpy`` / DLPack
aliases, or another tensor over the same storage. After such a write, write
through the tensor itself (``with torch.no_grad(): wsum.copy_(new)``) or pass
new tensor objects, and the next call checks them.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyaccel import _native
from pyaccel.ops import require_strided
from pyaccel import reference_binary as rb
from pyaccel.formats import binary as bf

ACT_CODES = {"none": 0, "relu": 1, "hardtanh": 2, "prelu": 3}
PAD_CODES = {"zeros": 0, "ones": 1}


def _desc(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def act_bounds_error(act: str, act_lo: float, act_hi: float) -> Optional[str]:
    """Why (act_lo, act_hi) cannot be act's bounds, naming them; None when they can.
    act='hardtanh' clamps to [act_lo, act_hi]: both finite and act_lo < act_hi (as
    nn.Hardtanh asks): a NaN bound would drop its clamp in the kernels, and reversed
    bounds give a constant whose value differs between the kernels and torch.clamp.
    Other activations ignore the bounds."""
    if act != "hardtanh":
        return None
    if not (math.isfinite(act_lo) and math.isfinite(act_hi) and act_lo < act_hi):
        return (f"act_lo / act_hi: act='hardtanh' clamps to [act_lo, act_hi]: expected finite bounds with "
                f"act_lo < act_hi, got act_lo={act_lo}, act_hi={act_hi}")
    return None


def check_conv_args(x, weight_bits, wsum, scale, shift, slope, oc, kernel_size, stride, padding, dilation, groups,
                    padding_mode, act, act_lo, act_hi) -> None:
    """Raise TypeError/ValueError naming the bad argument of binary_conv2d."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    require_strided(x)
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {_desc(x)}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [N, C, H, W], got {_desc(x)}")
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding),
                    ("dilation", dilation)):
        if len(v) != 2:
            raise ValueError(f"{name}: expected 2 values (height, width), got {list(v)}")
    kh, kw = kernel_size
    if min(kh, kw, *stride, *dilation) < 1 or min(padding) < 0:
        raise ValueError(f"kernel_size/stride/dilation must be >= 1 and padding >= 0, got {kernel_size}, {stride}, "
                         f"{dilation}, {padding}")
    c = x.shape[1]
    if groups < 1 or c % groups or oc % groups:
        raise ValueError(f"groups: {groups} must divide the input channels {c} and the output channels {oc}")
    cg, ocg = c // groups, oc // groups
    shape = (groups, -(-ocg // bf.NR), kh * kw, bf.words(cg), bf.NR)
    if not isinstance(weight_bits, Tensor) or weight_bits.dtype != torch.int64 or tuple(weight_bits.shape) != shape:
        raise ValueError(f"weight_bits: expected int64 of shape {shape} for x {_desc(x)}, got {_desc(weight_bits)}")
    if not isinstance(wsum, Tensor) or wsum.dtype != torch.int32 or tuple(wsum.shape) != (oc, kh * kw):
        raise ValueError(f"wsum: expected int32 of shape ({oc}, {kh * kw}), got {_desc(wsum)}")
    for name, t in (("scale", scale), ("shift", shift), ("slope", slope)):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (oc,)):
            raise ValueError(f"{name}: expected float32 of shape ({oc},), got {_desc(t)}")
    for name, t in (("weight_bits", weight_bits), ("wsum", wsum), ("scale", scale), ("shift", shift),
                    ("slope", slope)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {_desc(t)}")
    for name, t in (("weight_bits", weight_bits), ("wsum", wsum), ("scale", scale), ("shift", shift),
                    ("slope", slope)):
        if t is not None and not t.is_contiguous():  # the kernels read them as dense arrays
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
    if padding_mode not in PAD_CODES:
        raise ValueError(f"padding_mode: expected one of {tuple(PAD_CODES)}, got {padding_mode!r}")
    if act not in ACT_CODES:
        raise ValueError(f"act: expected one of {tuple(ACT_CODES)}, got {act!r}")
    if act == "prelu" and slope is None:
        raise ValueError("slope: act='prelu' needs a float32 slope per output channel")
    err = act_bounds_error(act, act_lo, act_hi)
    if err is not None:
        raise ValueError(err)
    if padding_mode == "zeros" and max(padding) > 0 and max(kh, kw) > 64:
        raise ValueError(f"kernel_size: exact zero padding takes kernels up to 64 x 64, got {kernel_size}")
    oh, ow = (out_size(x.shape[2], kh, stride[0], padding[0], dilation[0]),
              out_size(x.shape[3], kw, stride[1], padding[1], dilation[1]))
    if oh < 1 or ow < 1:
        raise ValueError(f"x: input {tuple(x.shape[2:])} is smaller than the (dilated) kernel {kernel_size} "
                         f"with padding {padding}")


def wsum_from_bits(weight_bits: Tensor, oc: int, cg: int) -> Tensor:
    """int32 [OC, kh * kw]: the ±1 weight sum of each output channel and tap
    (Cg - 2 * popcount) of canonically packed weight_bits [G, NB, T, W, NR]
    (no bits past Cg): what pack_conv_weight returns as wsum."""
    groups, nb, taps, _, nr = weight_bits.shape
    neg = bf.popcount64(weight_bits).sum(3)  # [G, NB, T, NR]
    neg = neg.permute(0, 1, 3, 2).reshape(groups, nb * nr, taps)[:, :oc // groups]
    return (cg - 2 * neg).reshape(oc, taps).to(torch.int32)


def check_weight_values(weight_bits: Tensor, wsum: Tensor, oc: int, cg: int, padding, padding_mode: str) -> None:
    """Raise ValueError naming weight_bits / wsum where their values differ from
    pack_conv_weight's, where that changes what the kernels compute (shapes
    already checked):

    - weight_bits: a bit set past the Cg input channels in a row's last word
      (the kernels count it, the reference drops it). O(N * taps) reads.
    - wsum: only where the kernels read it (exact zero padding, padding > 0;
      the reference derives it from weight_bits), compared with the sums of
      weight_bits's bits: O(weights / 64) popcounts, one pass over the
      weights, as each output pixel's dot products make.

    Skipped where the same weight_bits / wsum objects passed it before with
    their data pointers and version counters unchanged (the module docstring
    says which writes that misses).
    """
    need_wsum = padding_mode == "zeros" and max(padding) > 0
    if _passed_before(weight_bits, wsum, oc, cg, need_wsum):
        return
    tail = cg % bf.WORD_BITS
    if tail and bool((weight_bits[..., -1, :] >> tail).any()):
        raise ValueError(f"weight_bits: bits set past the {cg} input channels per group in a row's last word "
                         "(the canonical packing, pyaccel.formats.binary.pack_conv_weight, has 0 there)")
    if padding_mode == "zeros" and max(padding) > 0:
        want = wsum_from_bits(weight_bits, oc, cg).to(wsum.device)
        if not torch.equal(wsum, want):
            bad = (wsum != want).nonzero()[0].tolist()
            raise ValueError(f"wsum: expected the ±1 weight sums of weight_bits (pack_conv_weight's wsum), got "
                             f"{int(wsum[bad[0], bad[1]])} at [{bad[0]}, {bad[1]}] where weight_bits gives "
                             f"{int(want[bad[0], bad[1]])}")
    _remember_passed(weight_bits, wsum, oc, cg, need_wsum)


# Weight tensors that passed check_weight_values: id(weight_bits) -> (weak
# references to weight_bits and wsum, the state they passed in). An entry
# counts only for the same live objects (an id can be reused after a tensor
# is freed), the same data pointers and version counters (every in-place
# write, load_state_dict's copy_ included, bumps the counter), the same
# (oc, cg), and a wsum check when this call needs one.
_PASSED: Dict[int, Tuple] = {}
_PASSED_MAX = 4096


def _state(weight_bits: Tensor, wsum: Tensor, oc: int, cg: int) -> Tuple:
    return (weight_bits.data_ptr(), weight_bits._version, wsum.data_ptr(), wsum._version, oc, cg)


def _passed_before(weight_bits: Tensor, wsum: Tensor, oc: int, cg: int, need_wsum: bool) -> bool:
    entry = _PASSED.get(id(weight_bits))
    if entry is None or isinstance(weight_bits, torch._subclasses.FakeTensor):
        return False
    bits_ref, wsum_ref, state, wsum_checked = entry
    return (bits_ref() is weight_bits and wsum_ref() is wsum and state == _state(weight_bits, wsum, oc, cg)
            and (wsum_checked or not need_wsum))


def _remember_passed(weight_bits: Tensor, wsum: Tensor, oc: int, cg: int, wsum_checked: bool) -> None:
    if isinstance(weight_bits, torch._subclasses.FakeTensor):
        return
    if len(_PASSED) >= _PASSED_MAX:  # drop the entries of freed tensors (and, if still full, all)
        for key in [k for k, e in _PASSED.items() if e[0]() is None or e[1]() is None]:
            del _PASSED[key]
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
    _PASSED[id(weight_bits)] = (weakref.ref(weight_bits), weakref.ref(wsum), _state(weight_bits, wsum, oc, cg),
                                wsum_checked)


def reference_conv(x, weight_bits, scale, shift, slope, oc, kernel_size, stride, padding, dilation, groups,
                   padding_mode, act, act_lo, act_hi) -> Tensor:
    c = x.shape[1]
    w = bf.unpack_conv_weight(weight_bits, oc, c // groups, *kernel_size).to(x.device)
    y = rb.binary_conv2d(x, w, scale, shift, stride, padding, dilation, groups, padding_mode, act,
                         (act_lo, act_hi), slope)
    return y.contiguous(memory_format=torch.channels_last)


def native_conv(x: Tensor, weight_bits: Tensor, wsum: Tensor, scale, shift, slope, oc: int, kernel_size, stride,
                padding, dilation, groups: int, padding_mode: str, act: str, act_lo: float, act_hi: float) -> Tensor:
    """The CPU kernel (arguments checked); y NHWC as [N, OC, OH, OW] channels_last."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((n, oh, ow, oc), dtype=torch.float32)
    if y.numel() == 0:
        return y.permute(0, 3, 1, 2)
    if x.numel() and x.stride(1) != 1 and x.stride(3) != 1:
        x = x.contiguous()
    sn, sc, sh, sw = x.stride()
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    _native.lib().binary_conv(
        x.data_ptr(), n, c, h, w, sn, sc, sh, sw, groups, weight_bits.data_ptr(), oc, kh, kw, stride[0], stride[1],
        padding[0], padding[1], dilation[0], dilation[1], PAD_CODES[padding_mode], wsum.data_ptr(), ptr(scale),
        ptr(shift), ACT_CODES[act], float(act_lo), float(act_hi), ptr(slope), y.data_ptr(), oh, ow,
        torch.get_num_threads())
    return y.permute(0, 3, 1, 2)


@torch.library.custom_op("pyaccel::binary_conv2d", mutates_args=())
def binary_conv2d(x: Tensor, weight_bits: Tensor, wsum: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                  slope: Optional[Tensor], out_channels: int, kernel_size: List[int], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int, padding_mode: str, act: str,
                  act_lo: float, act_hi: float) -> Tensor:
    """Binary conv: act(conv(sign x, ±1 weights) * scale + shift), fp32 NCHW-shaped, channels_last memory."""
    check_conv_args(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding, dilation,
                    groups, padding_mode, act, act_lo, act_hi)
    check_weight_values(weight_bits, wsum, out_channels, x.shape[1] // groups, padding, padding_mode)
    if x.device.type == "cpu" and _native.available():
        return native_conv(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding,
                           dilation, groups, padding_mode, act, act_lo, act_hi).clone()
    if x.device.type == "cuda":
        try:
            from pyaccel.kernels import binary as tk
        except ImportError as exc:
            raise ValueError(f"x: a CUDA tensor needs pyaccel's Triton kernels, which cannot load here ({exc})") from exc
        return tk.conv2d(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding,
                         dilation, groups, padding_mode, act, act_lo, act_hi).clone()
    return reference_conv(x, weight_bits, scale, shift, slope, out_channels, kernel_size, stride, padding, dilation,
                          groups, padding_mode, act, act_lo, act_hi)


@binary_conv2d.register_fake
def _(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding, dilation, groups,
      padding_mode, act, act_lo, act_hi):
    check_conv_args(x, weight_bits, wsum, scale, shift, slope, out_channels, kernel_size, stride, padding, dilation,
                    groups, padding_mode, act, act_lo, act_hi)
    n, _, h, w = x.shape
    oh = out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((n, oh, ow, out_channels)).permute(0, 3, 1, 2)


def _setup(ctx, inputs, output):
    x, weight_bits, _, scale, shift, slope = inputs[:6]
    ctx.save_for_backward(x, weight_bits, scale, shift, slope)
    ctx.args = inputs[6:]


def _ste_grad_x(x, weight_bits, scale, shift, slope, grad_y, oc, kernel_size, stride, padding, dilation, groups,
                padding_mode, act, act_lo, act_hi):
    """The straight-through estimator's gradient to x [N, C, H, W] (that of the
    training modules pyaccel.nn.BinaryConv2d / BinaryLinear: passed where
    |x| <= 1), through the float epilogue (scale, bias, activation)."""
    w = bf.unpack_conv_weight(weight_bits, oc, x.shape[1] // groups, *kernel_size).to(x.device)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        y = rb.binary_conv2d(xr, w, scale, shift, stride, padding, dilation, groups, padding_mode, act,
                             (act_lo, act_hi), slope, ste=True)
        (gx,) = torch.autograd.grad(y, xr, grad_y.to(y.dtype))
    return gx


def _backward(ctx, grad_y):
    """Gradient to x only: the buffers get none."""
    x, weight_bits, scale, shift, slope = ctx.saved_tensors
    gx = _ste_grad_x(x, weight_bits, scale, shift, slope, grad_y, *ctx.args) if ctx.needs_input_grad[0] else None
    return (gx,) + (None,) * 15


binary_conv2d.register_autograd(_backward, setup_context=_setup)


def linear_input(x) -> Tensor:
    """x [..., K] as binary_conv2d's [M, K, 1, 1] (ValueError naming x for a
    scalar or K = 0: a binary dot needs at least one input feature)."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected a tensor [..., in_features] with in_features >= 1, got {_desc(x)}")
    return x.reshape(-1, x.shape[-1])[:, :, None, None]


@torch.library.custom_op("pyaccel::binary_linear", mutates_args=())
def binary_linear(x: Tensor, weight_bits: Tensor, wsum: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                  slope: Optional[Tensor], out_features: int, act: str, act_lo: float, act_hi: float) -> Tensor:
    """Binary linear: act((sign x) @ W±1ᵀ * scale + shift); x fp32 [..., K] -> fp32 [..., out_features]
    (the 1 x 1 case of binary_conv2d, any leading dimensions)."""
    x2 = linear_input(x)
    if x.device.type == "cuda":  # the Triton linear picks popcount or int8 tl.dot by rows (last_path says which)
        check_conv_args(x2, weight_bits, wsum, scale, shift, slope, out_features, [1, 1], [1, 1], [0, 0], [1, 1], 1,
                        "zeros", act, act_lo, act_hi)
        check_weight_values(weight_bits, wsum, out_features, x2.shape[1], [0, 0], "zeros")
        from pyaccel.kernels import binary as tk

        y = tk.linear(x2[:, :, 0, 0], weight_bits, scale, shift, slope, out_features, act, act_lo, act_hi)
        return y.reshape(*x.shape[:-1], out_features)
    y = binary_conv2d(x2, weight_bits, wsum, scale, shift, slope, out_features, [1, 1], [1, 1], [0, 0], [1, 1], 1,
                      "zeros", act, act_lo, act_hi)
    return y.reshape(*x.shape[:-1], out_features)


@binary_linear.register_fake
def _(x, weight_bits, wsum, scale, shift, slope, out_features, act, act_lo, act_hi):
    x2 = linear_input(x)
    check_conv_args(x2, weight_bits, wsum, scale, shift, slope, out_features, [1, 1], [1, 1], [0, 0], [1, 1], 1,
                    "zeros", act, act_lo, act_hi)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_linear(ctx, inputs, output):
    x, weight_bits, _, scale, shift, slope = inputs[:6]
    ctx.save_for_backward(x, weight_bits, scale, shift, slope)
    ctx.args = inputs[6:]


def _backward_linear(ctx, grad_y):
    x, weight_bits, scale, shift, slope = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        n, act, act_lo, act_hi = ctx.args
        x4 = x.reshape(-1, x.shape[-1])[:, :, None, None]
        g4 = grad_y.reshape(-1, n)[:, :, None, None]
        gx = _ste_grad_x(x4, weight_bits, scale, shift, slope, g4, n, [1, 1], [1, 1], [0, 0], [1, 1], 1, "zeros",
                         act, act_lo, act_hi).reshape(x.shape)
    return (gx,) + (None,) * 9


binary_linear.register_autograd(_backward_linear, setup_context=_setup_linear)
