"""Inference modules of binary layers: bit-packed weights, popcount kernels.

:class:`XnorConv2d` and :class:`XnorLinear` compute

    y = act( dot(sign(x), w±1) * scale + bias )

with the XNOR-popcount kernels of csrc/binary (AVX-512 VPOPCNTDQ / AVX2 /
portable; the reference in :mod:`pyaccel.reference_binary` elsewhere). Built by
``pyaccel.patch`` from eval-mode :class:`~pyaccel.nn.BinaryConv2d` /
:class:`~pyaccel.nn.BinaryLinear` layers (``from_binary``), with a BatchNorm
and an activation that follow folded into scale / bias / act: scale =
alpha * gamma / sqrt(var + eps), bias = (b - mean) * gamma / sqrt(var + eps)
+ beta; a negative gamma is just a negative scale in this float epilogue.

Canonical state (state_dict): ``weight_bits`` (int64, the machine-independent
packing of :func:`pyaccel.formats.binary.pack_conv_weight`), ``scale``,
``bias`` (optional), ``slope`` (PReLU only). ``wsum`` (border correction) is
derived (the family's packing in PackedModule's lifecycle: rebuilt after any
load, assignment or in-place edit of weight_bits). Both modules honour the
module contract (tests/test_module_contract.py).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from pyaccel import _native
from pyaccel import ops_binary as ob
from pyaccel.nn._conv import _pair, in_format, is_channels_last
from pyaccel.nn._packed import PackedModule, _fx_proxy, _grad_enabled, _hand_torch_to
from pyaccel.formats import binary as bf
from pyaccel.reference_binary import ACTIVATIONS

_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_get_num_threads = torch.get_num_threads
_CL = torch.channels_last


def _wsum_from_bits(bits: Tensor, oc: int, cg: int, kh: int, kw: int) -> Tensor:
    w = bf.unpack_conv_weight(bits, oc, cg, kh, kw)
    return w.reshape(oc, cg, kh * kw).sum(1).to(torch.int32)


def check_batchnorm(bn, channels: int, want: type = nn.modules.batchnorm._BatchNorm,
                    device: Optional[torch.device] = None) -> None:
    """Raise TypeError / ValueError naming ``bn`` unless it is a `want` module
    (nn.BatchNorm2d after a conv, nn.BatchNorm1d after a linear layer) that an
    epilogue can fold: in eval mode (training mode normalizes with batch
    statistics), with running statistics (track_running_stats=True) over
    `channels` features, on `device` (the layer's) when given."""
    if not isinstance(bn, want):
        raise TypeError(f"bn: expected an nn.{want.__name__} or None, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn: in training mode (it normalizes with batch statistics there); call .eval() before "
                         "folding")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: no running statistics (track_running_stats=False: it normalizes with batch "
                         "statistics in eval mode too), so there is nothing to fold")
    if bn.num_features != channels or bn.running_mean.shape != (channels,) or bn.running_var.shape != (channels,):
        raise ValueError(f"bn: expected {channels} features (the layer's output channels), got num_features="
                         f"{bn.num_features}")
    if device is not None and bn.running_mean.device != device:
        raise ValueError(f"bn: on {bn.running_mean.device}, expected the layer's device {device}")


def fold_epilogue(alpha: Tensor, bias: Optional[Tensor], bn: Optional[nn.Module]) -> Tuple[Tensor, Optional[Tensor]]:
    """(scale, shift) float32 [OC] of alpha * dot + bias followed by an eval-mode BatchNorm
    (or none); alpha, bias: [OC]. TypeError / ValueError naming bn where it cannot be
    folded (:func:`check_batchnorm`)."""
    alpha = alpha.detach().float()
    shift = bias.detach().float() if bias is not None else None
    if bn is None:
        return alpha.clone(), None if shift is None else shift.clone()
    check_batchnorm(bn, alpha.numel())
    inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
    g = gamma * inv
    base = (shift if shift is not None else torch.zeros_like(inv)) - bn.running_mean.detach().float()
    return alpha * g, base * g + beta


def activation_of(act: Optional[nn.Module], oc: int) -> Tuple[str, float, float, Optional[Tensor]]:
    """(act, lo, hi, slope) epilogue descriptor of nn.ReLU / nn.Hardtanh (ReLU6) / nn.PReLU / None.
    ValueError naming act for another module, a Hardtanh whose bounds are not finite with
    min_val < max_val, or a PReLU with neither 1 nor oc slopes."""
    if act is None or isinstance(act, nn.Identity):
        return "none", 0.0, 0.0, None
    if isinstance(act, nn.ReLU):
        return "relu", 0.0, 0.0, None
    if isinstance(act, nn.Hardtanh):
        lo, hi = float(act.min_val), float(act.max_val)
        if ob.act_bounds_error("hardtanh", lo, hi) is not None:
            raise ValueError(f"act: {act!r}: expected finite bounds with min_val < max_val")
        return "hardtanh", lo, hi, None
    if isinstance(act, nn.PReLU):
        w = act.weight.detach().float()
        if w.numel() not in (1, oc):
            raise ValueError(f"act: PReLU with {w.numel()} slopes after {oc} channels (expected 1 or {oc})")
        return "prelu", 0.0, 0.0, w.expand(oc).clone()
    raise ValueError(f"act: expected nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU, nn.Identity or None, got "
                     f"{type(act).__name__}")


def numeric_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """conv.padding as (ph, pw): 'valid' is (0, 0); 'same' (stride 1 in torch) is
    d * (k - 1) / 2 per side where that is a whole number (odd dilated kernel
    extents), else ValueError: torch then pads one more pixel at the
    bottom / right, which the symmetric binary kernels do not express."""
    p = conv.padding
    if not isinstance(p, str):
        return tuple(p)
    return _string_padding(p, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))


_FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32


def _fx_leaf(mod: nn.Module, x):
    """torch.fx: record a leaf call_module node instead of tracing into forward."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(mod), (x,), {})


class _XnorBase(PackedModule):
    """State, validation and calls shared by XnorConv2d and XnorLinear.

    Canonical buffers (state_dict): ``weight_bits``, ``scale``, ``bias``,
    ``slope``. The derived ``wsum`` (border correction) is this family's
    packing (``_packed``): rebuilt whenever weight_bits changes (PackedModule's
    lifecycle); scale / bias / slope are read in place by every path.
    """

    WEIGHT_NAMES = frozenset({"weight_bits", "scale", "bias", "slope"})
    _READ_IN_PLACE = frozenset({"scale", "bias", "slope"})

    def _init_state(self, bias: bool, act: str, act_lo: float, act_hi: float, device) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")
        self.act, self.act_lo, self.act_hi = act, act_lo, act_hi  # the bounds: floats (__setattr__), checked below
        oc = self._oc()
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("weight_bits", torch.zeros(self._bits_shape(), dtype=torch.int64, device=device))
        self.register_buffer("scale", torch.ones(oc, **f32))
        self.register_buffer("bias", torch.zeros(oc, **f32) if bias else None)
        self.register_buffer("slope", torch.full((oc,), 0.25, **f32) if act == "prelu" else None)
        self._repack_or_raise()

    def _set_state(self, bits: Tensor, scale: Tensor, bias: Optional[Tensor], slope: Optional[Tensor]) -> None:
        """Replace the canonical buffers at once (validated; ValueError naming the bad one)."""
        t = {"weight_bits": bits, "scale": scale, "bias": bias, "slope": slope}
        err = self._canonical_error(t)
        if err is not None:
            raise ValueError(err)
        for name, v in t.items():
            self._buffers[name] = v
        self._repack()

    def _bits_shape(self) -> tuple:
        kh, kw = self._ksize()
        g = self._groups()
        return (g, -(-(self._oc() // g) // bf.NR), kh * kw, bf.words(self._cg()), bf.NR)

    def _canonical_error(self, t) -> Optional[str]:
        oc, shape = self._oc(), self._bits_shape()
        bits = t.get("weight_bits")
        if not isinstance(bits, Tensor) or bits.dtype != torch.int64 or tuple(bits.shape) != shape:
            return f"weight_bits: expected int64 of shape {shape}, got {ob._desc(bits)}"
        if not bits.is_meta and bool((bits & ~bf.valid_bits_mask(shape, oc, self._cg(), bits.device)).any()):
            return (f"weight_bits: bits set past the {self._cg()} input channels per group or the "
                    f"{oc // self._groups()} output channels per group (the canonical packing, "
                    "pyaccel.formats.binary.pack_conv_weight, has 0 there)")
        for name in ("scale", "bias", "slope"):
            v = t.get(name)
            if v is None:
                if name == "scale":
                    return "scale: missing"
                if name == "slope" and self.act == "prelu":
                    return "slope: act='prelu' needs a float32 slope per output channel"
                continue
            if not isinstance(v, Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (oc,):
                return f"{name}: expected float32 of shape ({oc},), got {ob._desc(v)}"
            if name == "scale" and not v.is_meta and not bool(torch.isfinite(v).all()):
                return "scale: holds non-finite values (inf/nan)"
        devs = {v.device for v in t.values() if isinstance(v, Tensor)}
        if len(devs) > 1:
            return f"weight_bits/scale/bias/slope: on different devices {sorted(map(str, devs))}"
        if self.act not in ACTIVATIONS:
            return f"act: expected one of {ACTIVATIONS}, got {self.act!r}"
        return ob.act_bounds_error(self.act, self.act_lo, self.act_hi)

    def _pack(self) -> None:
        kh, kw = self._ksize()
        bits = self.weight_bits
        if bits.is_meta:
            self._packed = torch.empty((self._oc(), kh * kw), dtype=torch.int32, device="meta")
        else:
            self._packed = _wsum_from_bits(bits, self._oc(), self._cg(), kh, kw).contiguous()

    @property
    def wsum(self) -> Tensor:
        """int32 [out, kh * kw]: per tap, the sum of the ±1 weights (the exact zero padding's border
        correction), derived from weight_bits. Read it, do not edit it: it is rebuilt from
        weight_bits, and the eager fast path's per-shape plans keep the border table built from
        it (edit weight_bits instead)."""
        self._refresh()
        return self._packed

    def backend(self) -> str:
        dev = self.weight_bits.device
        if dev.type == "cpu" and _native.available():
            return f"cpu/{_native.selected_isa()} ({_native.lib().binary_kernel_name()})"
        return "cuda/triton" if dev.type == "cuda" else f"{dev.type}/reference"

    def _args(self, x4: Tensor) -> tuple:
        kh, kw = self._ksize()
        b = self._buffers
        c = lambda t: t if t is None or t.is_contiguous() else t.contiguous()  # noqa: E731
        return (x4, c(b["weight_bits"]), self._packed, c(b["scale"]), c(b["bias"]), c(b["slope"]), self._oc(),
                [kh, kw], list(self._stride()), list(self._padding()), list(self._dilation()), self._groups(),
                self._pad_mode(), self.act, self.act_lo, self.act_hi)

    def _run4(self, x4: Tensor, fast: bool) -> Tensor:
        """x4: fp32 [N, C, H, W] -> fp32 [N, OC, OH, OW] in channels_last memory; fast: the native kernel
        straight from the module (checked here), else the checked torch.ops op."""
        if fast:
            y = self._eager(x4)
            if y is not None:
                return y
        return torch.ops.pyaccel.binary_conv2d(*self._args(x4))

    def _fast_ok(self, x: Tensor) -> bool:
        return (type(x) is Tensor and x.is_cpu and _native.available() and not _is_compiling()
                and _tracing_state() is None and not (x.requires_grad and _grad_enabled())
                and self._packed is not None and self._packed.is_cpu)

    def _eager(self, x: Tensor) -> Optional[Tensor]:
        """The native kernel on a float32 CPU x [N, C, H, W] (any strides); None for what it does not take."""
        b = self._buffers
        bits, wsum = b["weight_bits"], self._packed
        scale, shift, slope = b["scale"], b["bias"], b["slope"]
        if any(t is not None and not t.is_contiguous() for t in (bits, scale, shift, slope)):
            return None
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._ksize(), self._stride(), self._padding(), self._dilation()
        groups, oc = self._groups(), self._oc()
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self._cg() * groups:
            return None
        n, c, h, w = x.shape
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1 or min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0 or max(kh, kw) > 64:
            return None  # the op names what is wrong
        y = torch.empty((n, oc, oh, ow), dtype=torch.float32, device="cpu", memory_format=_CL)
        if y.numel() == 0:
            return y
        if x.stride(1) != 1 and x.stride(3) != 1:
            x = x.contiguous()
        sxn, sxc, sxh, sxw = x.stride()
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        _native.lib().binary_conv(
            x.data_ptr(), n, c, h, w, sxn, sxc, sxh, sxw, groups, bits.data_ptr(), oc, kh, kw, sh, sw, ph, pw, dh,
            dw, ob.PAD_CODES[self._pad_mode()], wsum.data_ptr(), scale.data_ptr(), ptr(shift),
            ob.ACT_CODES[self.act], self.act_lo, self.act_hi, ptr(slope), y.data_ptr(), oh, ow, _get_num_threads())
        return y

    def _checked_op(self, x: Tensor) -> Tensor:
        """The module's checked torch.ops path (the same kernels, no fast path)."""
        return self._forward(x, fast=False)

    # ---- the eager fast path: one native BinaryConvPlan per input shape and strides ------------
    # The checked path (_forward) makes a plan after each native call it runs
    # (_remember_plan); PackedModule.__call__ / forward try the most recent one
    # (self._plan), _general the others by (shape, strides). A plan declines
    # once a canonical buffer is reassigned, swapped or (weight_bits) edited
    # in place; a repack or a geometry attribute assignment drops them all.
    _DERIVED = ("_packed", "_plan", "_plans")
    _plans = None
    _GEOMETRY_ATTRS = frozenset({"stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "act",
                                 "act_lo", "act_hi", "in_channels", "out_channels", "in_features", "out_features",
                                 "emit_bits", "takes_bits"})

    def __setattr__(self, name, value):
        if name in self._GEOMETRY_ATTRS:
            if name in ("stride", "padding", "dilation", "kernel_size"):
                value = _pair(value, name)  # a tuple: nothing to mutate behind the plans' back
            elif name in ("act_lo", "act_hi"):
                value = _real(name, value)
            self.__dict__["_plan"] = self.__dict__["_plans"] = None
        super().__setattr__(name, value)
        if name in self._GEOMETRY_ATTRS and "weight_bits" in self._buffers:
            self._repack()  # the buffers are checked against the new geometry (the next call raises if invalid)

    def _general(self, x) -> Tensor:
        if type(x) is Tensor:
            plans = self._plans
            if plans and not _is_compiling():
                plan = plans.get((x.shape, x.stride()))
                if plan is not None:
                    y = plan.forward(x)
                    if y is not None:
                        self.__dict__["_plan"] = plan
                        return y
        elif _fx_proxy(x):
            return _fx_leaf(self, x)
        return self._forward(x, fast=True)

    def _remember_plan(self, x: Tensor, dims, strides, oh: int, ow: int, layout: int, out_shape=(),
                       in_bits: bool = False, out_bits: bool = False) -> None:
        """A plan for x's shape and strides; dims, strides: (N, C, H, W) and the element strides the kernel
        reads x with (packed signs: the strides are unused). Called right after the same native call
        succeeded on valid, contiguous buffers."""
        C = _native.lib()
        _hand_torch_to(C)
        b = self._buffers
        bits, scale, shift, slope = b["weight_bits"], b["scale"], b["bias"], b["slope"]
        n, c, h, w = dims
        sxn, sxc, sxh, sxw = strides
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._ksize(), self._stride(), self._padding(), self._dilation()
        oc = self._oc()
        yshape = (n, oh, ow, bf.words(oc)) if out_bits else (n, oc) if layout >= 2 else (n, oh, ow, oc)
        watch = (("weight_bits", bits, True), ("scale", scale, False), ("bias", shift, False), ("slope", slope, False))
        # the storages, not the tensors: a .data swap elsewhere never frees memory a running plan reads
        keep = tuple(t.untyped_storage() for t in (self._packed, bits, scale, shift, slope) if t is not None)
        plan = C.BinaryConvPlan(
            tuple(x.shape), tuple(x.stride()), yshape, layout, tuple(out_shape), in_bits, out_bits, n, c, h, w, sxn,
            sxc, sxh, sxw,
            self._groups(), bits.data_ptr(), oc, kh, kw, sh, sw, ph, pw, dh, dw, ob.PAD_CODES[self._pad_mode()],
            self._packed.data_ptr(), scale.data_ptr(), 0 if shift is None else shift.data_ptr(),
            ob.ACT_CODES[self.act], self.act_lo, self.act_hi, 0 if slope is None else slope.data_ptr(), oh, ow,
            keep, watch, self._buffers)
        plans = self._plans
        if plans is None or len(plans) >= 16:
            plans = self.__dict__["_plans"] = {}
        plans[(x.shape, x.stride())] = plan
        self.__dict__["_plan"] = plan

    def _act_repr(self) -> str:
        if self.act == "hardtanh":
            return f", act=hardtanh({self.act_lo:g}, {self.act_hi:g})"
        return f", act={self.act}" if self.act != "none" else ""

    # geometry, per subclass
    def _stride(self):
        return (1, 1)

    def _padding(self):
        return (0, 0)

    def _dilation(self):
        return (1, 1)

    def _groups(self):
        return 1

    def _pad_mode(self):
        return "zeros"


def _real(name: str, v) -> float:
    """v as a Python float; TypeError naming the argument for a string or a non-number."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}") from None


def _sizes(x: Tensor) -> Tuple[int, ...]:
    """x's sizes as Python ints, for the modules' own shape checks. Under torch.jit.trace
    sizes are traced tensors and comparing them warns (TracerWarning); the check holds
    for the example input, a constant of the trace as every Python branch of forward
    is (later inputs meet the recorded op's checks: rank, dtype, words per group), so
    the sizes are read with that warning off."""
    if _tracing_state() is None:
        return tuple(x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(s) for s in x.shape)


def _input(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    ob.require_strided(x)
    if x.dtype not in _FLOAT_IN:
        raise TypeError(f"x: expected float32, bfloat16 or float16 for {what}, got {ob._desc(x)}")
    return x if x.dtype == torch.float32 else x.float()


def _folded(layer: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module], oc: int, groups: int,
            bn_type: type):
    """(weight_bits, scale, bias, slope, (act, lo, hi)) of a Binary* training layer with the BatchNorm
    and the activation that follow it folded in (from_binary of both classes). TypeError / ValueError
    naming bn or act where they cannot be folded."""
    if bn is not None:
        check_batchnorm(bn, oc, bn_type, layer.weight.device)
    scale, shift = fold_epilogue(layer.alpha(), layer.bias, bn)
    a, lo, hi, slope = activation_of(act, oc)
    bits, _ = bf.pack_conv_weight(layer.weight.detach(), groups)
    return bits, scale, shift, slope, (a, lo, hi)


def _string_padding(padding: str, kernel: Tuple[int, int], stride: Tuple[int, int],
                    dilation: Tuple[int, int]) -> Tuple[int, int]:
    """nn.Conv2d's string paddings as (ph, pw): 'valid' -> (0, 0); 'same' -> d * (k - 1) / 2
    per side (stride 1 only, as torch; ValueError where that is not a whole number)."""
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 or t < 0 for t in total):
        raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} pads unevenly; "
                         f"no binary kernel for that")
    return (total[0] // 2, total[1] // 2)


def _check_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: expected >= {low}, got {v}")
    return int(v)


class XnorConv2d(_XnorBase):
    """Binary conv for inference: ``act(conv(sign(x), w±1) * scale + bias)``.

    Args as nn.Conv2d (in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, bias, padding_mode): kernel_size, stride,
    dilation and padding are ints or pairs of ints (TypeError naming the
    argument otherwise); padding 'valid' is 0 and 'same' (stride 1, as in
    torch) is d * (k - 1) / 2 per side, stored as numbers (ValueError where
    that is not whole: torch would pad unevenly); padding_mode 'zeros'
    (exact: the border correction makes padded taps count 0) or 'ones'
    (sign(x) padded with +1, as BinaryConv2d(binary_padding='ones') trains);
    act 'none' / 'relu' / 'hardtanh' / 'prelu' (slope). act_lo, act_hi:
    hardtanh's clamp [act_lo, act_hi], real numbers (TypeError naming them
    otherwise), for act='hardtanh' finite with act_lo < act_hi (ValueError
    naming them otherwise; the default is nn.Hardtanh's -1, 1); the other
    activations ignore them. Assigning act / act_lo / act_hi later is checked
    the same way at the next call.

    Buffers (the canonical state in state_dict): weight_bits int64
    [groups, ceil(OCg / 32), kh * kw, ceil(Cg / 64), 32] (the packing of
    :func:`pyaccel.formats.binary.pack_conv_weight`; bits past the channel
    counts must be 0), scale float32 [OC] (finite), bias float32 [OC] or
    None, slope float32 [OC] (act='prelu' only). Invalid values are refused
    (ValueError naming the buffer; load errors for a state_dict).

    x: float32 / bfloat16 / float16 [N, C, H, W] (NCHW or channels_last,
    any strides) or [C, H, W] -> [N, OC, OH, OW] in x's dtype and memory
    format, computed in fp32. TypeError / ValueError naming x otherwise.
    Autograd reaches x with the straight-through estimator of the training
    module (gradient passed where |x| <= 1, Courbariaux et al., 2016); the
    buffers are frozen. Method: XNOR-Net (Rastegari et al., 2016),
    bit-packed popcount implicit GEMM.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", act: str = "none",
                 act_lo: float = -1.0, act_hi: float = 1.0, device=None):
        super().__init__()
        in_channels, out_channels = _check_int("in_channels", in_channels), _check_int("out_channels", out_channels)
        groups = _check_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must divide in_channels {in_channels} and out_channels {out_channels}")
        if padding_mode not in ob.PAD_CODES:
            raise ValueError(f"padding_mode: expected one of {tuple(ob.PAD_CODES)}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        kernel_size, stride, dilation = (_pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                                         _pair(dilation, "dilation"))
        if isinstance(padding, str):
            padding = _string_padding(padding, kernel_size, stride, dilation)
        self.kernel_size, self.stride, self.padding, self.dilation = (kernel_size, stride,
                                                                      _pair(padding, "padding"), dilation)
        if min(*self.kernel_size, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"kernel_size/stride/dilation: expected >= 1 and padding >= 0, got {self.kernel_size}, "
                             f"{self.stride}, {self.dilation}, {self.padding}")
        self.padding_mode = padding_mode
        self._init_state(bias, act, act_lo, act_hi, device)

    def _oc(self):
        return self.out_channels

    def _cg(self):
        return self.in_channels // self.groups

    def _ksize(self):
        return self.kernel_size

    def _stride(self):
        return self.stride

    def _padding(self):
        return self.padding

    def _dilation(self):
        return self.dilation

    def _groups(self):
        return self.groups

    def _pad_mode(self):
        return self.padding_mode

    @classmethod
    def from_binary(cls, conv: nn.Conv2d, bn: Optional[nn.Module] = None, act: Optional[nn.Module] = None
                    ) -> "XnorConv2d":
        """From a pyaccel.nn.BinaryConv2d, optionally folding the nn.BatchNorm2d
        (running statistics) and the activation (nn.ReLU / ReLU6 / Hardtanh /
        PReLU) that follow it. TypeError naming conv for another layer;
        TypeError / ValueError naming bn unless it is an nn.BatchNorm2d in eval
        mode with running statistics over out_channels features, on the conv's
        device (:func:`check_batchnorm`); ValueError naming act for an
        activation with no epilogue (:func:`activation_of`)."""
        from pyaccel.nn.binary import BinaryConv2d

        if not isinstance(conv, BinaryConv2d):
            raise TypeError(f"conv: expected a pyaccel.nn.BinaryConv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} has no binary kernel (zeros / binary_padding only)")
        padding = numeric_padding(conv)
        bits, scale, shift, slope, (a, lo, hi) = _folded(conv, bn, act, conv.out_channels, conv.groups,
                                                          nn.BatchNorm2d)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                  conv.groups, shift is not None, conv.binary_padding, a, lo, hi, device="meta")
        new._set_state(bits, scale, shift, slope)
        return new

    # Bit-packed hand-off (set by pyaccel.patch on chains of binary convs in an
    # nn.Sequential, pyaccel._binary_patch.link_handoffs). emit_bits: for a
    # float32 channels_last input in eager mode without autograd, return sign(y)
    # packed as int64 [N, OH, OW, ceil(OC / 64)] (bit 1 = negative; NaN counts
    # +1, as sign does) instead of y; any other input gets the float output.
    # takes_bits: an int64 input is that form (a float one is taken as usual;
    # bits past in_channels in the last word are ignored: the kernel masks them
    # off as it copies the rows, the torch path unpacks in_channels bits only);
    # the float output is then channels_last float32, as the float chain's is
    # for such an input. The next binary layer reads only signs, so the chain
    # computes what the float chain computes (same values, dtype and format)
    # without writing and re-reading floats.
    emit_bits = False
    takes_bits = False

    def _emits_now(self, x) -> bool:
        # tracing first: under torch.jit.trace, sizes are traced tensors (comparing them warns)
        return (type(x) is Tensor and _tracing_state() is None and not _is_compiling() and x.dtype is _F32
                and x.dim() == 4 and x.shape[1] == self.in_channels and x.numel() > 0 and x.is_cpu
                and is_channels_last(x) and not (x.requires_grad and _grad_enabled()) and _native.available())

    def _forward(self, x, fast: bool) -> Tensor:
        if (self.takes_bits and isinstance(x, Tensor) and x.dtype == torch.int64) or (
                self.emit_bits and fast and self._emits_now(x)):
            return self._forward_bits(x, fast)
        dtype = x.dtype if isinstance(x, Tensor) else None
        x = _input(x, "XnorConv2d")
        self._refresh()
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or _sizes(x)[1] != self.in_channels:
            raise ValueError(f"x: expected [N, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                             f"got {ob._desc(x)}")
        channels_last = is_channels_last(x)
        y = None
        if fast and self._fast_ok(x):
            y = self._eager(x)
            if (y is not None and not squeeze and dtype is _F32 and y.numel() and not x.requires_grad
                    and (x.stride(1) == 1 or x.stride(3) == 1)):
                self._remember_plan(x, x.shape, x.stride(), y.shape[2], y.shape[3], 1 if channels_last else 0)
        if y is None:
            y = torch.ops.pyaccel.binary_conv2d(*self._args(x))
        # the op's output is channels_last already (traced: in_format, as numel is a traced value there)
        if not channels_last or _tracing_state() is not None or y.numel() == 0:
            y = in_format(y, channels_last)
        if dtype != torch.float32:  # computed in fp32, returned in x's dtype
            y = y.to(dtype)
        return y.squeeze(0) if squeeze else y

    def _forward_bits(self, x, fast: bool) -> Tensor:
        """The hand-off modes: packed signs in (takes_bits) and / or out (emit_bits). No gradient flows
        through packed signs."""
        c = self.in_channels
        if self.takes_bits and x.dtype == torch.int64:
            words = bf.words(c)
            if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.dim() != 4 or _sizes(x)[3] != words:
                raise ValueError(f"x: this layer takes the packed signs the previous binary layer hands over, "
                                 f"int64 [N, H, W, {words}]; got {ob._desc(x)} (pyaccel.patch(..., "
                                 f"binary_handoff=False), the default, keeps float activations between binary layers)")
            n, h, w = _sizes(x)[:3]
        else:
            x = _input(x, "XnorConv2d")
            shape = _sizes(x)
            if len(shape) != 4 or shape[1] != c:
                raise ValueError(f"x: expected [N, {c}, H, W], got {ob._desc(x)}")
            n, _, h, w = shape
        self._refresh()
        bits_in = x.dtype == torch.int64
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        oc = self.out_channels
        native = (fast and type(x) is Tensor and x.is_cpu and _native.available() and not _is_compiling()
                  and _tracing_state() is None and self._packed is not None and self._packed.is_cpu
                  and all(t is None or t.is_contiguous() for t in self._canonical().values()))
        if native and oh >= 1 and ow >= 1 and n * oh * ow > 0 and (bits_in or not (
                x.requires_grad and _grad_enabled())):
            xb = x.contiguous() if bits_in else None
            xf = None
            if not bits_in:
                xf = x if (x.stride(1) == 1 or x.stride(3) == 1) else x.contiguous()
            yb = torch.zeros((n, oh, ow, bf.words(oc)), dtype=torch.int64, device="cpu") if self.emit_bits else None
            y = None if self.emit_bits else torch.empty((n, oc, oh, ow), dtype=torch.float32, device="cpu",
                                                        memory_format=_CL)
            b = self._buffers
            ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
            strides = (0, 0, 0, 0) if xf is None else xf.stride()
            _native.lib().binary_conv(
                ptr(xf), n, c, h, w, *strides, self.groups, b["weight_bits"].data_ptr(), oc, kh, kw, sh, sw, ph, pw,
                dh, dw, ob.PAD_CODES[self.padding_mode], self._packed.data_ptr(), b["scale"].data_ptr(), ptr(b["bias"]),
                ob.ACT_CODES[self.act], self.act_lo, self.act_hi, ptr(b["slope"]), ptr(y), oh, ow, _get_num_threads(),
                xbits=ptr(xb), ybits=ptr(yb))
            if (xb is x or xf is x) and not x.requires_grad:  # a plan for this shape and these strides
                self._remember_plan(x, (n, c, h, w), strides, oh, ow, 2 if self.emit_bits else 1, (),
                                    bits_in, self.emit_bits)
            return yb if self.emit_bits else y
        # the same with torch ops (tracing, compiling, other devices, empty batches): unpack, the checked op, pack
        xf = (1.0 - 2.0 * bf.unpack_bits_last(x, c).float()).permute(0, 3, 1, 2) if bits_in else x
        y = torch.ops.pyaccel.binary_conv2d(*self._args(xf))
        if self.emit_bits:
            return bf.pack_bits_last(y.permute(0, 2, 3, 1) < 0)
        return y  # channels_last memory: packed signs carry no memory format to follow, and this one is free

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += self._act_repr()
        if self.takes_bits or self.emit_bits:
            s += ", packed signs " + " and ".join(w for w, f in (("in", self.takes_bits), ("out", self.emit_bits)) if f)
        return s + f", bias={self.bias is not None}, backend={self.backend()}"


class XnorLinear(_XnorBase):
    """Binary linear for inference: ``act((sign(x) @ w±1ᵀ) * scale + bias)``.

    Args: in_features, out_features, bias, act / act_lo / act_hi (as
    XnorConv2d), device. Buffers as XnorConv2d's with kh = kw = 1 and one
    group: weight_bits int64 [1, ceil(N / 32), 1, ceil(K / 64), 32].

    x: float32 / bfloat16 / float16 [..., in_features] (any strides) ->
    [..., out_features] in x's dtype, computed in fp32 (2-D only when a
    BatchNorm1d or a per-channel PReLU was folded in: they act on dim 1).
    Autograd as XnorConv2d. Not a linear map, so no ``weight`` view: the
    ±1 weight is ``pyaccel.formats.binary.unpack_conv_weight``. Built with
    ``from_binary(BinaryLinear, bn=BatchNorm1d, act=...)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "none",
                 act_lo: float = -1.0, act_hi: float = 1.0, device=None):
        super().__init__()
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        self._init_state(bias, act, act_lo, act_hi, device)

    def _oc(self):
        return self.out_features

    def _cg(self):
        return self.in_features

    def _ksize(self):
        return (1, 1)

    @classmethod
    def from_binary(cls, lin: nn.Linear, bn: Optional[nn.Module] = None, act: Optional[nn.Module] = None
                    ) -> "XnorLinear":
        """From a pyaccel.nn.BinaryLinear, optionally folding an nn.BatchNorm1d
        (running statistics) and the activation that follow it; errors as
        XnorConv2d.from_binary's (bn: an nn.BatchNorm1d over out_features)."""
        from pyaccel.nn.binary import BinaryLinear

        if not isinstance(lin, BinaryLinear):
            raise TypeError(f"lin: expected a pyaccel.nn.BinaryLinear, got {type(lin).__name__}")
        bits, scale, shift, slope, (a, lo, hi) = _folded(lin, bn, act, lin.out_features, 1, nn.BatchNorm1d)
        new = cls(lin.in_features, lin.out_features, shift is not None, a, lo, hi, device="meta")
        new._set_state(bits, scale, shift, slope)
        # BatchNorm1d and PReLU normalize / scale dim 1: the fold is right for [N, F] inputs only
        new.dim1_epilogue = bn is not None or (isinstance(act, nn.PReLU) and act.weight.numel() > 1)
        return new

    dim1_epilogue = False

    def _forward(self, x, fast: bool) -> Tensor:
        dtype = x.dtype if isinstance(x, Tensor) else None
        x = _input(x, "XnorLinear")
        self._refresh()
        if x.dim() < 1 or _sizes(x)[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got {ob._desc(x)}")
        if self.dim1_epilogue and x.dim() != 2:
            raise ValueError(f"x: this layer folds a BatchNorm1d / per-channel PReLU, which act on dim 1: "
                             f"expected a 2-D input [N, {self.in_features}], got {ob._desc(x)}")
        if fast and self._fast_ok(x):
            x2 = x.reshape(-1, self.in_features)
            y = self._eager(x2[:, :, None, None])
            if y is not None:
                if (dtype is _F32 and y.numel() and not x.requires_grad and x2.stride(1) == 1
                        and (x.dim() == 2 or x.is_contiguous())):
                    self._remember_plan(x, (x2.shape[0], self.in_features, 1, 1), (x2.stride(0), x2.stride(1), 1, 1),
                                        1, 1, 2 if x.dim() == 2 else 3, (*x.shape[:-1], self.out_features))
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y if dtype == torch.float32 else y.to(dtype)
        a = self._args(x)
        y = torch.ops.pyaccel.binary_linear(*a[:7], self.act, self.act_lo, self.act_hi)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += self._act_repr()
        return s + f", backend={self.backend()}"


__all__: Sequence[str] = ("XnorConv2d", "XnorLinear", "fold_epilogue", "activation_of")
