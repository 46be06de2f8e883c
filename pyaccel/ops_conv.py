"""Convolution ops (``torch.ops.pyaccel.dws_conv2d``): schema, argument
checks, fake kernel, CPU kernel (pyaccel._C, NHWC), CUDA kernel (Triton,
kernels/dwconv_fused.py), reference everywhere else, autograd to x.

Fused depthwise-separable convolution::

    y = act2(conv1x1(act1(depthwise_conv(x, dw_weight, dw_bias)), pw_weight, pw_bias))

Arguments: x [N, C, H, W] float32/bfloat16 (NCHW or channels_last; the
output has x's memory format and dtype); dw_weight float32 [C, 1, kh, kw];
dw_bias float32 [C] or None; pw_weight float32 [Cout, C, 1, 1]; pw_bias
float32 [Cout] or None; stride, dilation [2]; padding [4] (top, bottom,
left, right) or tf_same=True (TensorFlow "SAME", from the input size);
act codes (pyaccel._pattern.ActKind) with [lo, hi] params (Hardtanh);
packed: the native packing (uint8) or None.

A packing bakes in the channel counts, window, stride, dilation, activations
and which biases it holds: with the native library loaded, every CPU call
reads its header (O(1); packed_pw, an int8 GEMM packing: its header and, if
it has one, its pair-safe section's tables, O(Cout + entries)) and raises
ValueError starting with the argument's name (``packed: ...``,
``packed_dw: ...``, ``packed_pw: ...``) with what the call expected and what
the buffer holds when it was made for other parameters, is truncated or is no
such packing. Without the native library the CPU runs the reference, which
ignores the packings. The weights' values are not compared: a packing of
other weights of the same shapes and parameters goes undetected. A valid
packing made for another ISA's panel width is not an error: the call runs the
reference (a module repacks for the ISA in use).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from pyaccel import _native, reference
from pyaccel.ops import check_packed_device, require_strided
from pyaccel._pattern import ActKind, Activation
from pyaccel.nn._conv import ConvGeometry, TF_SAME, from_nhwc, to_nhwc


def _desc(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def geometry_of(stride: List[int], dilation: List[int], padding: List[int], tf_same: bool, kernel) -> ConvGeometry:
    return ConvGeometry(tuple(kernel), tuple(stride), tuple(dilation), TF_SAME if tf_same else tuple(padding))


def act_from(code: int, params: List[float], which: int = 1) -> Activation:
    """act{which} / act{which}_params as an Activation; ValueError naming them
    for an unknown code, PReLU, or Hardtanh bounds that are not finite with
    lo < hi (as nn.Hardtanh asks: a NaN bound would give NaN, reversed bounds a
    constant). The other activations ignore the params."""
    try:
        kind = ActKind(int(code))
    except ValueError:
        raise ValueError(f"act{which}: expected an ActKind code {[int(a) for a in ActKind]}, got {code}") from None
    if kind == ActKind.PRELU:
        raise ValueError(f"act{which}: PReLU is not supported by dws_conv2d")
    lo, hi = (params + [-1.0, 1.0])[:2] if params else (-1.0, 1.0)
    if kind == ActKind.HARDTANH and not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"act{which}_params: Hardtanh clamps to [lo, hi]: expected finite bounds with lo < hi, "
                         f"got {list(params)}")
    return Activation(kind, float(lo), float(hi))


def check_dws_args(x, dw_weight, dw_bias, pw_weight, pw_bias, packed=None) -> None:
    """TypeError/ValueError naming the bad argument of dws_conv2d."""
    for name, t in (("x", x), ("dw_weight", dw_weight), ("pw_weight", pw_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    require_strided(x)
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x: expected float32 or bfloat16, got {_desc(x)} (the fused conv computes in fp32; "
                        "its buffers stay fp32 under .double() / .half())")
    if dw_weight.dtype != torch.float32 or dw_weight.dim() != 4 or dw_weight.shape[1] != 1:
        raise ValueError(f"dw_weight: expected float32 [C, 1, kh, kw], got {_desc(dw_weight)}")
    c = dw_weight.shape[0]
    if pw_weight.dtype != torch.float32 or pw_weight.dim() != 4 or tuple(pw_weight.shape[1:]) != (c, 1, 1):
        raise ValueError(f"pw_weight: expected float32 [Cout, {c}, 1, 1], got {_desc(pw_weight)}")
    if x.dim() != 4 or x.shape[1] != c:
        raise ValueError(f"x: expected [N, {c}, H, W], got {_desc(x)}")
    for name, t, n in (("dw_bias", dw_bias, c), ("pw_bias", pw_bias, pw_weight.shape[0])):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n,)):
            raise ValueError(f"{name}: expected float32 of shape ({n},) or None, got {_desc(t)}")
    for name, t in (("dw_weight", dw_weight), ("dw_bias", dw_bias), ("pw_weight", pw_weight), ("pw_bias", pw_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {_desc(t)} "
                             f"(move the module with .to({str(x.device)!r}))")
    check_packed_type("packed", packed)
    check_packed_device(packed, x)


def check_packed_type(name: str, packed) -> None:
    """TypeError naming `name` unless `packed` is None or a 1-D uint8 tensor."""
    if packed is not None and (not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1):
        raise TypeError(f"{name}: expected a 1-D uint8 tensor (a native packing) or None, got {_desc(packed)}")


def _cpu_bytes(name: str, packed: Tensor) -> None:
    if not packed.is_cpu or not packed.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous CPU tensor (the packing's bytes), got {_desc(packed)}")


def check_dws_packing(name: str, packed: Tensor, c: int, cout: int, geo: ConvGeometry, a1: Activation,
                      a2: Activation, flags: int) -> bool:
    """ValueError naming `name` unless `packed` is a DWS1 packing made for
    these channels, window, stride, dilation, activations and biases (header
    only: csrc/dwconv_fused dws_packing_error). True when the selected kernel
    takes it; False for a valid packing of another ISA's panel width (the
    caller then runs the reference)."""
    _cpu_bytes(name, packed)
    C = _native.lib()
    ptr, nbytes = packed.data_ptr(), packed.numel()
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
    err = C.dws_packing_error(ptr, nbytes, c, cout, kh, kw, sh, sw, dh, dw, int(a1.kind), a1.lo, a1.hi,
                              int(a2.kind), a2.lo, a2.hi, flags)
    if err:
        raise ValueError(f"{name}: {err}")
    return C.dws_check_packed(ptr, nbytes, c, cout, kh, kw) is None


def dws_native_nhwc(xn: Tensor, packed: Tensor, geo: ConvGeometry, c: int, cout: int) -> Tensor:
    """The native kernel: contiguous fp32 NHWC x -> NHWC y (packing valid for the selected kernel)."""
    n, h, w, _ = xn.shape
    oh, ow = geo.out_size(h, w)
    t, _, l, _ = geo.pads(h, w)
    y = torch.empty(n, oh, ow, cout, dtype=torch.float32, device=xn.device)
    if y.numel():
        _native.lib().dws_forward(xn.data_ptr(), n, h, w, c, packed.data_ptr(), packed.numel(), cout,
                                  geo.kernel[0], geo.kernel[1], y.data_ptr(), oh, ow, t, l, torch.get_num_threads())
    return y


def _reference(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2):
    return reference.dws_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, geo.stride, geo.dilation,
                                geo.pads(x.shape[-2], x.shape[-1]), a1, a2)


@torch.library.custom_op("pyaccel::dws_conv2d", mutates_args=())
def dws_conv2d(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor, pw_bias: Optional[Tensor],
               stride: List[int], dilation: List[int], padding: List[int], tf_same: bool, act1: int,
               act1_params: List[float], act2: int, act2_params: List[float], packed: Optional[Tensor]) -> Tensor:
    """Fused depthwise-separable conv (see the module docstring). TypeError /
    ValueError naming the bad argument; on the CPU, ValueError ``packed: ...``
    when `packed` was made for other parameters (channels, window, stride,
    dilation, activations, which biases it holds), is truncated or is no DWS1
    packing; the weights' and biases' values are not compared."""
    raise NotImplementedError("no kernel for this device")  # pragma: no cover - per-device kernels below


def _run(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params, act2,
         act2_params, packed, device_kernel):
    check_dws_args(x, dw_weight, dw_bias, pw_weight, pw_bias, packed)
    geo = geometry_of(stride, dilation, padding, tf_same, dw_weight.shape[2:])
    geo.out_size(x.shape[2], x.shape[3])
    a1, a2 = act_from(act1, act1_params, 1), act_from(act2, act2_params, 2)
    out = device_kernel(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2, packed)
    if out is not None:
        return out
    return _reference(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2)


def _cpu_kernel(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2, packed):
    c, cout = dw_weight.shape[0], pw_weight.shape[0]
    C = _native.lib()
    if packed is None or C is None:
        return None
    # PackedHeader.flags (csrc/dwconv_fused/dwconv_fused.h): the biases a packing was given
    flags = (C.HAS_DW_BIAS if dw_bias is not None else 0) | (C.HAS_PW_BIAS if pw_bias is not None else 0)
    if not check_dws_packing("packed", packed, c, cout, geo, a1, a2, flags):
        return None
    if x.numel() == 0:
        return reference.dws_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, geo.stride, geo.dilation,
                                    geo.pads(x.shape[2], x.shape[3]), a1, a2)
    xn, cl = to_nhwc(x.float())
    y = from_nhwc(dws_native_nhwc(xn, packed, geo, c, cout), cl)
    return y.to(x.dtype)


def _cuda_kernel(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2, packed):
    try:
        from pyaccel.kernels import dwconv_fused as tk
    except Exception:  # pragma: no cover - no Triton: the reference
        return None
    return tk.dws_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, geo, a1, a2)


@dws_conv2d.register_kernel("cpu")
def _dws_cpu(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params, act2,
             act2_params, packed):
    return _run(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params,
                act2, act2_params, packed, _cpu_kernel)


@dws_conv2d.register_kernel("cuda")
def _dws_cuda(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params, act2,
              act2_params, packed):
    return _run(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params,
                act2, act2_params, packed, _cuda_kernel)


@dws_conv2d.register_fake
def _dws_fake(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, act1_params, act2,
              act2_params, packed):
    check_dws_args(x, dw_weight, dw_bias, pw_weight, pw_bias, packed)
    act_from(act1, act1_params, 1), act_from(act2, act2_params, 2)
    return _fake_out(x, pw_weight.shape[0], geometry_of(stride, dilation, padding, tf_same, dw_weight.shape[2:]))


def _fake_out(x: Tensor, cout: int, geo: ConvGeometry) -> Tensor:
    """An empty [N, cout, OH, OW] in x's memory format (the fake kernels' result)."""
    oh, ow = geo.out_size(x.shape[2], x.shape[3])
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x.new_empty((x.shape[0], cout, oh, ow)).contiguous(memory_format=fmt)


def _setup(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, dilation, padding, tf_same, act1, p1, act2, p2, _ = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight, pw_bias)
    ctx.args = (stride, dilation, padding, tf_same, act1, p1, act2, p2)


def _grad_x(ctx, grad_y, x, dw_weight, dw_bias, pw_weight, pw_bias) -> Tensor:
    """d(fp32 reference block)/dx applied to grad_y (ctx.args: the geometry and activations)."""
    stride, dilation, padding, tf_same, act1, p1, act2, p2 = ctx.args
    geo = geometry_of(stride, dilation, padding, tf_same, dw_weight.shape[2:])
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        y = _reference(xr, dw_weight, dw_bias, pw_weight, pw_bias, geo, act_from(act1, p1), act_from(act2, p2))
        (gx,) = torch.autograd.grad(y, xr, grad_y.to(y.dtype))
    return gx


def _backward(ctx, grad_y):
    return (_grad_x(ctx, grad_y, *ctx.saved_tensors),) + (None,) * 13


dws_conv2d.register_autograd(_backward, setup_context=_setup)


# ---- int8 pointwise stage -------------------------------------------------------------------
def check_dws_int8_args(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, packed_dw=None, packed_pw=None) -> None:
    """TypeError/ValueError naming the bad argument of dws_conv2d_int8 (the
    packings' types here; their headers in the CPU kernel)."""
    check_packed_type("packed_dw", packed_dw)
    check_packed_type("packed_pw", packed_pw)
    check_packed_device(packed_dw, x, "packed_dw")
    check_packed_device(packed_pw, x, "packed_pw")
    if not isinstance(pw_int8, Tensor) or pw_int8.dtype != torch.int8 or pw_int8.dim() != 2:
        raise TypeError(f"pw_int8: expected an int8 tensor [Cout, C], got {_desc(pw_int8)}")
    c = dw_weight.shape[0] if isinstance(dw_weight, Tensor) else None
    check_dws_args(x, dw_weight, dw_bias, pw_int8.new_empty((pw_int8.shape[0], pw_int8.shape[1], 1, 1),
                                                             dtype=torch.float32), pw_bias)
    if pw_int8.shape[1] != c:
        raise ValueError(f"pw_int8: expected [Cout, {c}], got {_desc(pw_int8)}")
    if not isinstance(pw_scale, Tensor) or pw_scale.dtype != torch.float32 or tuple(pw_scale.shape) != (
            pw_int8.shape[0],):
        raise ValueError(f"pw_scale: expected float32 of shape ({pw_int8.shape[0]},), got {_desc(pw_scale)}")


def _reference_int8(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, geo, a1, a2):
    return reference.dws_conv2d_int8(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, geo.stride, geo.dilation,
                                     geo.pads(x.shape[-2], x.shape[-1]), a1, a2)


def dws_int8_native_nhwc_into(xn: Tensor, y: Tensor, packed_dw: Tensor, packed_pw: Tensor, pw_scale: Tensor,
                              bias: Optional[Tensor], kernel, pad_t: int, pad_l: int) -> None:
    n, h, w, c = xn.shape
    _native.lib().dws_forward_int8(xn.data_ptr(), n, h, w, c, packed_dw.data_ptr(), packed_dw.numel(), kernel[0],
                                   kernel[1], packed_pw.data_ptr(), packed_pw.numel(), y.shape[-1],
                                   pw_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                                   y.shape[1], y.shape[2], pad_t, pad_l, torch.get_num_threads())


@torch.library.custom_op("pyaccel::dws_conv2d_int8", mutates_args=())
def dws_conv2d_int8(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_int8: Tensor, pw_scale: Tensor,
                    pw_bias: Optional[Tensor], stride: List[int], dilation: List[int], padding: List[int],
                    tf_same: bool, act1: int, act1_params: List[float], act2: int, act2_params: List[float],
                    packed_dw: Optional[Tensor], packed_pw: Optional[Tensor]) -> Tensor:
    """Fused depthwise-separable conv, int8 pointwise stage (reference.dws_conv2d_int8).
    packed_dw: the DWS1 packing of the depthwise part alone (Cout = 0, no
    pointwise bias); packed_pw: pyaccel's int8 packing of pw_int8. On the
    CPU, ValueError ``packed_dw: ...`` / ``packed_pw: ...`` when a packing was
    made for other parameters (channels, window, stride, dilation,
    activations; the pointwise weight's shape), is truncated or is no such
    packing; the native kernel runs when both are given and valid for it."""
    raise NotImplementedError("no kernel for this device")  # pragma: no cover


def _dws_int8_any(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, stride, dilation, padding, tf_same, act1,
                  act1_params, act2, act2_params, packed_dw, packed_pw):
    check_dws_int8_args(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, packed_dw, packed_pw)
    geo = geometry_of(stride, dilation, padding, tf_same, dw_weight.shape[2:])
    oh, ow = geo.out_size(x.shape[2], x.shape[3])
    a1, a2 = act_from(act1, act1_params, 1), act_from(act2, act2_params, 2)
    c, cout = dw_weight.shape[0], pw_int8.shape[0]
    C = _native.lib()
    native = x.is_cpu and C is not None
    if native and packed_dw is not None:  # the depthwise part alone: no pointwise channels, no pointwise bias
        native = check_dws_packing("packed_dw", packed_dw, c, 0, geo, a1, a2,
                                   C.HAS_DW_BIAS if dw_bias is not None else 0)
    if x.is_cpu and C is not None and packed_pw is not None:
        _cpu_bytes("packed_pw", packed_pw)
        err = C.dws_pw_packing_error(packed_pw.data_ptr(), packed_pw.numel(), cout, c)
        if err:
            raise ValueError(f"packed_pw: {err}")
    if (native and packed_dw is not None and packed_pw is not None and x.numel() > 0
            and (pw_bias is None or pw_bias.is_contiguous()) and pw_scale.is_contiguous()):
        xn, cl = to_nhwc(x.float())
        y = torch.empty(x.shape[0], oh, ow, cout)
        t, _, l, _ = geo.pads(x.shape[2], x.shape[3])
        dws_int8_native_nhwc_into(xn, y, packed_dw, packed_pw, pw_scale, pw_bias, geo.kernel, t, l)
        return from_nhwc(y, cl).to(x.dtype)
    return _reference_int8(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, geo, a1, a2)


dws_conv2d_int8.register_kernel("cpu")(_dws_int8_any)
dws_conv2d_int8.register_kernel("cuda")(_dws_int8_any)  # the reference on CUDA (no Triton int8 variant yet)


@dws_conv2d_int8.register_fake
def _dws_int8_fake(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, stride, dilation, padding, tf_same, act1,
                   act1_params, act2, act2_params, packed_dw, packed_pw):
    check_dws_int8_args(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, packed_dw, packed_pw)
    act_from(act1, act1_params, 1), act_from(act2, act2_params, 2)
    return _fake_out(x, pw_int8.shape[0], geometry_of(stride, dilation, padding, tf_same, dw_weight.shape[2:]))


def _setup_int8(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias, stride, dilation, padding, tf_same, a1, p1, a2, p2 = inputs[:14]
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias)
    ctx.args = (stride, dilation, padding, tf_same, a1, p1, a2, p2)


def _backward_int8(ctx, grad_y):
    """Gradient to x through the dequantized weights (activation quantization as identity)."""
    x, dw_weight, dw_bias, pw_int8, pw_scale, pw_bias = ctx.saved_tensors
    wp = (pw_int8.float() * pw_scale[:, None]).reshape(pw_int8.shape[0], pw_int8.shape[1], 1, 1)
    return (_grad_x(ctx, grad_y, x, dw_weight, dw_bias, wp, pw_bias),) + (None,) * 15


dws_conv2d_int8.register_autograd(_backward_int8, setup_context=_setup_int8)
