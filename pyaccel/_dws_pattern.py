"""The depthwise -> pointwise chain pattern for pyaccel.patch:

    Conv2d(groups = in = out channels) -> [BatchNorm2d] -> [activation]
      -> Conv2d 1x1 -> [BatchNorm2d] -> [activation]

replaced by :class:`pyaccel.nn.FusedDWSeparableConv2d` (BatchNorm folded);
and, tried after it, a lone 1x1 conv -> [BatchNorm2d] -> [activation] (the
expand and head convs of MobileNetV2/EfficientNet blocks), the same module
with an identity depthwise stage.
Activations: ReLU, ReLU6, Hardswish, SiLU, Hardtanh (modules or, through
torch.fx, F.relu / F.relu6 / F.hardswish / F.silu / F.hardtanh / torch.relu).
A depthwise conv whose output feeds a squeeze-excitation branch (two users)
is reported, not fused; Conv2d subclasses that pad on their own are read
through pyaccel.nn._conv.conv_geometry (TF "same" handled) or reported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyaccel import _pattern
from pyaccel._pattern import ActKind, ChainPattern, Elem, Slot, activation_of, bn_usable
from pyaccel.nn._conv import ConvSkip, conv_geometry
from pyaccel.nn.dws_conv import FusedDWSeparableConv2d
from pyaccel.nn.dws_conv_int8 import FusedDWSeparableInt8Conv2d

MAX_KERNEL = 11  # larger depthwise windows are left to torch


def _float_conv(m) -> bool:
    """An nn.Conv2d the conv patterns may read (not a pyaccel binary training layer, whose forward
    binarizes: the binary rules take those)."""
    return isinstance(m, nn.Conv2d) and not getattr(m, "_pyaccel_trainable", False)


def _is_depthwise(e: Elem):
    m = e.module
    if not _float_conv(m):
        return False
    c = m.in_channels
    if m.groups != c or c == 1 or m.kernel_size == (1, 1):  # one input channel: a plain conv
        return False
    if m.out_channels != c:
        return f"depthwise conv with depth multiplier {m.out_channels // c} (out {m.out_channels}, in {c}): not fused"
    if max(m.kernel_size) > MAX_KERNEL:
        return f"depthwise window {m.kernel_size} larger than {MAX_KERNEL}: not fused"
    if m.weight.dtype != torch.float32:
        return f"depthwise conv with {m.weight.dtype} weights: the fused kernel takes float32 models"
    try:
        conv_geometry(m)
    except ConvSkip as exc:
        return str(exc)
    return True


def _is_bn(e: Elem):
    if e.module is None or not isinstance(e.module, nn.modules.batchnorm._BatchNorm):
        return False
    why = bn_usable(e.module)
    return True if why is None else why


def _is_act(e: Elem):
    a = activation_of(e)
    return a is not None and a.kind != ActKind.PRELU


# activations the fused kernels do not compute (the ones they do: activation_of)
_OTHER_ACT_FNS = (F.gelu, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.sigmoid, F.tanh, F.softplus,
                  torch.sigmoid, torch.tanh)


def _is_act1(e: Elem):
    """act1, between the depthwise and the pointwise conv: an activation the
    kernels lack stops the chain with that reason (after the pointwise conv
    such a module just stays outside the fused span: _is_act)."""
    if _is_act(e):
        return True
    other = (e.module is not None and type(e.module).__module__ == "torch.nn.modules.activation") or (
        e.module is None and e.fn in _OTHER_ACT_FNS)
    if other:
        return (f"depthwise-separable: activation {e.describe()} between the depthwise and the 1x1 conv is not "
                "one the fused kernels compute (ReLU, ReLU6, Hardswish, SiLU, Hardtanh)")
    return False


def _is_pointwise(e: Elem):
    m = e.module
    if not _float_conv(m) or m.kernel_size != (1, 1):
        return False
    if m.groups != 1:
        return f"1x1 conv with groups={m.groups} after the depthwise conv: not fused"
    try:
        g = conv_geometry(m)
    except ConvSkip as exc:
        return str(exc)
    if g.stride != (1, 1) or g.pads(1, 1) != (0, 0, 0, 0):
        return f"1x1 conv with {g.describe()} after the depthwise conv: not fused"
    return True


_TRAINING = ("in training mode: the fused module is for inference (frozen, folded weights); call model.eval() "
             "before patching")


def _build(found, ctx):
    dw, pw = found["dw"].module, found["pw"].module
    if dw.training or pw.training:
        return f"{type(dw).__name__} {_TRAINING}"
    if pw.in_channels != dw.out_channels:
        return f"1x1 conv takes {pw.in_channels} channels, the depthwise conv gives {dw.out_channels}"
    a1 = activation_of(found["act1"]) if "act1" in found else None
    a2 = activation_of(found["act2"]) if "act2" in found else None
    bn1 = found["bn1"].module if "bn1" in found else None
    bn2 = found["bn2"].module if "bn2" in found else None
    try:
        mod = FusedDWSeparableConv2d.from_modules(dw, bn1, a1, pw, bn2, a2)
    except ConvSkip as exc:
        return str(exc)
    return _maybe_int8(mod, ctx)


def _maybe_int8(mod, ctx):
    """(module, lossy): the int8 pointwise variant when patch was asked to quantize."""
    if getattr(ctx, "quantize", None) == "int8":
        return FusedDWSeparableInt8Conv2d.from_float(mod), True
    return mod, False


DWS_PATTERN = _pattern.register(ChainPattern(
    name="depthwise-separable",
    slots=[
        Slot("dw", _is_depthwise),
        Slot("bn1", _is_bn, optional=True),
        Slot("act1", _is_act1, optional=True),
        Slot("pw", _is_pointwise),
        Slot("bn2", _is_bn, optional=True),
        Slot("act2", _is_act, optional=True),
    ],
    build=_build,
))


def _is_plain_pointwise(e: Elem):
    m = e.module
    if not isinstance(m, nn.Conv2d) or m.kernel_size != (1, 1) or m.groups != 1 or m.weight.dtype != torch.float32:
        return False
    try:
        g = conv_geometry(m)
    except ConvSkip:
        return False  # left alone quietly: not a chain head pyaccel promises to take
    return g.stride == (1, 1) and g.pads(1, 1) == (0, 0, 0, 0)


def _build_pointwise(found, ctx):
    """A lone 1x1 conv (+ BN + act): the fused kernel with an identity depthwise
    stage (1x1 window, weight 1, bias 0: exact), so the BN and activation ride in
    the GEMM's epilogue instead of two more passes over memory."""
    pw = found["pw"].module
    if pw.training:
        return f"{type(pw).__name__} {_TRAINING}"
    c = pw.in_channels
    ident = nn.Conv2d(c, c, 1, groups=c, bias=False).to(pw.weight.device)
    with torch.no_grad():
        ident.weight.fill_(1.0)
    a2 = activation_of(found["act2"]) if "act2" in found else None
    bn2 = found["bn2"].module if "bn2" in found else None
    mod = FusedDWSeparableConv2d.from_modules(ident, None, None, pw, bn2, a2)
    mod.notes.append("1x1 conv + BN + activation (identity depthwise stage)")
    return _maybe_int8(mod, ctx)


POINTWISE_PATTERN = _pattern.register(ChainPattern(
    name="pointwise conv + BN + activation",
    slots=[Slot("pw", _is_plain_pointwise), Slot("bn2", _is_bn, optional=True), Slot("act2", _is_act, optional=True)],
    build=_build_pointwise,
    standalone=False,  # through torch.fx only along with a depthwise-separable chain
))
