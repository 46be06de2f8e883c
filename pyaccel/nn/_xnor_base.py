"""The shared lifecycle and call paths of the XNOR inference modules
(:class:`pyaccel.nn.XnorConv2d`, :class:`pyaccel.nn.XnorLinear`): canonical
state, packing, the eager fast path and the checked op path, and the input
and argument helpers both classes use."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from pyaccel import _native
from pyaccel import ops_binary as ob
from pyaccel.nn._conv import _pair
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


def _check_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: expected >= {low}, got {v}")
    return int(v)
