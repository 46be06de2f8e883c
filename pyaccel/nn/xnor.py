"""Inference modules of binary layers: bit-packed weights, popcount kernels.

:class:`XnorConv2d` and :class:`XnorLinear` compute

    y = act( dot(sign(x), w±1) * scale + shift )

with the XNOR-popcount kernels of csrc/binary (AVX-512 VPOPCNTDQ / AVX2 /
portable; the reference in :mod:`pyaccel.reference_binary` elsewhere). Built by
``pyaccel.patch`` from eval-mode :class:`~pyaccel.nn.BinaryConv2d` /
:class:`~pyaccel.nn.BinaryLinear` layers (``from_binary``), with a BatchNorm
and an activation that follow folded into scale / shift / act: scale =
alpha * gamma / sqrt(var + eps), shift = (bias - mean) * gamma / sqrt(var + eps)
+ beta; a negative gamma is just a negative scale in this float epilogue.

Canonical state (state_dict): ``weight_bits`` (int64, the machine-independent
packing of :func:`pyaccel.formats.binary.pack_conv_weight`), ``scale``,
``shift`` (optional), ``slope`` (PReLU, optional). ``wsum`` (border
correction) is derived and rebuilt on load. Inputs: float32 (bf16 / fp16 are
converted); NCHW or channels_last, output in the input's memory format. No
gradients (inference only; train the Binary* modules).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from pyaccel import _native
from pyaccel import ops_binary as ob
from pyaccel.nn._packed import _any_global_hook
from pyaccel.formats import binary as bf
from pyaccel.reference_binary import ACTIVATIONS, pair

_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_get_num_threads = torch.get_num_threads
_CL = torch.channels_last


def _wsum_from_bits(bits: Tensor, oc: int, cg: int, kh: int, kw: int) -> Tensor:
    w = bf.unpack_conv_weight(bits, oc, cg, kh, kw)
    return w.reshape(oc, cg, kh * kw).sum(1).to(torch.int32)


def fold_epilogue(alpha: Tensor, bias: Optional[Tensor], bn: Optional[nn.Module]) -> Tuple[Tensor, Optional[Tensor]]:
    """(scale, shift) of alpha * dot + bias followed by an eval-mode BatchNorm (or none)."""
    alpha = alpha.detach().float()
    shift = bias.detach().float() if bias is not None else None
    if bn is None:
        return alpha.clone(), None if shift is None else shift.clone()
    inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
    g = gamma * inv
    base = (shift if shift is not None else torch.zeros_like(inv)) - bn.running_mean.detach().float()
    return alpha * g, base * g + beta


def activation_of(act: Optional[nn.Module], oc: int) -> Tuple[str, float, float, Optional[Tensor]]:
    """(act, lo, hi, slope) epilogue descriptor of nn.ReLU / nn.Hardtanh (ReLU6) / nn.PReLU / None."""
    if act is None or isinstance(act, nn.Identity):
        return "none", 0.0, 0.0, None
    if isinstance(act, nn.ReLU):
        return "relu", 0.0, 0.0, None
    if isinstance(act, nn.Hardtanh):
        return "hardtanh", float(act.min_val), float(act.max_val), None
    if isinstance(act, nn.PReLU):
        w = act.weight.detach().float()
        if w.numel() not in (1, oc):
            raise ValueError(f"PReLU with {w.numel()} slopes after {oc} channels")
        return "prelu", 0.0, 0.0, w.expand(oc).clone()
    raise ValueError(f"no epilogue for {type(act).__name__}")


def _check_checkpoint(mod, state_dict, prefix, *args) -> None:
    bits = state_dict.get(prefix + "weight_bits")
    if bits is not None and (bits.dtype != torch.int64 or bits.shape != mod.weight_bits.shape):
        raise ValueError(f"weight_bits: expected int64 of shape {tuple(mod.weight_bits.shape)}, got {ob._desc(bits)}")


def _rebuild(mod, incompatible_keys) -> None:
    mod.wsum = mod._wsum()


def numeric_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """conv.padding as (ph, pw): 'valid' is (0, 0); 'same' (stride 1 in torch) is
    d * (k - 1) / 2 per side where that is a whole number (odd dilated kernel
    extents), else ValueError: torch then pads one more pixel at the
    bottom / right, which the symmetric binary kernels do not express."""
    p = conv.padding
    if not isinstance(p, str):
        return tuple(p)
    if p == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(conv.kernel_size)} and dilation "
                         f"{tuple(conv.dilation)} pads unevenly; no binary kernel for that")
    return (total[0] // 2, total[1] // 2)


def _version(t: Tensor) -> int:
    """t's in-place edit counter (inference-mode tensors have none: they cannot be edited outside it)."""
    return -1 if t.is_inference() else t._version


def _fx_leaf(mod: nn.Module, x):
    """torch.fx: record a leaf call_module node instead of tracing into forward."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(mod), (x,), {})


class _XnorBase(nn.Module):
    """State and checks shared by XnorConv2d and XnorLinear."""

    def _setup(self, bits: Tensor, scale: Tensor, shift: Optional[Tensor], act: str, lo: float, hi: float,
               slope: Optional[Tensor]) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")
        if act == "prelu" and slope is None:
            raise ValueError("slope: act='prelu' needs a slope per output channel")
        self.act, self.act_lo, self.act_hi = act, float(lo), float(hi)
        oc = self._oc()
        for name, t in (("scale", scale), ("shift", shift), ("slope", slope)):
            if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (oc,)):
                raise ValueError(f"{name}: expected float32 of shape ({oc},), got {ob._desc(t)}")
        self.register_buffer("weight_bits", bits)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("slope", slope)
        self.register_buffer("wsum", self._wsum(), persistent=False)
        self._register_load_state_dict_pre_hook(_check_checkpoint, with_module=True)
        self.register_load_state_dict_post_hook(_rebuild)

    def _wsum(self) -> Tensor:
        kh, kw = self._ksize()
        if self.weight_bits.device.type == "meta":
            return torch.empty((self._oc(), kh * kw), dtype=torch.int32, device="meta")
        return _wsum_from_bits(self.weight_bits, self._oc(), self._cg(), kh, kw)

    def backend(self) -> str:
        dev = self.weight_bits.device
        if dev.type == "cpu" and _native.available():
            return f"cpu/{_native.lib().binary_kernel_name()}"
        return f"{dev.type}/reference"

    def _args(self, x4: Tensor) -> tuple:
        kh, kw = self._ksize()
        b = self._buffers
        return (x4, b["weight_bits"], b["wsum"], b["scale"], b["shift"], b["slope"], self._oc(), [kh, kw],
                list(self._stride()), list(self._padding()), list(self._dilation()), self._groups(),
                self._pad_mode(), self.act, self.act_lo, self.act_hi)

    def _call(self, x4: Tensor) -> Tensor:
        """x4: fp32 [N, C, H, W] -> [N, OC, OH, OW] channels_last memory."""
        if not _is_compiling() and _tracing_state() is None:
            self._refresh_wsum()
        if (type(x4) is Tensor and x4.is_cpu and _native.available() and not _is_compiling()
                and _tracing_state() is None):
            return self._eager(x4)
        return torch.ops.pyaccel.binary_conv2d(*self._args(x4))

    def _refresh_wsum(self) -> None:
        """wsum (border correction) follows weight_bits: rebuilt after any edit or reassignment."""
        bits = self._buffers["weight_bits"]
        sig = (id(bits), bits.data_ptr() if bits.device.type != "meta" else 0, _version(bits))
        if sig != self.__dict__.get("_wsum_sig"):
            self.wsum = self._wsum()
            self.__dict__["_wsum_sig"] = sig

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) must not cast the fp32 epilogue buffers the kernels read
        super()._apply(fn, recurse)
        for name in ("scale", "shift", "slope"):
            t = self._buffers.get(name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self

    def _eager(self, x: Tensor) -> Tensor:
        """The native kernel straight from the module (~ a few µs over the
        kernel): the buffers are checked once per change of their data, x per call."""
        b = self._buffers
        bufs = (b["weight_bits"], b["wsum"], b["scale"], b["shift"], b["slope"])
        sig = tuple((t.data_ptr(), _version(t), t.is_cpu) if t is not None else None for t in bufs) + (
            self._stride(), self._padding(), self._dilation(), self._groups(), self._pad_mode(), self.act,
            self.act_lo, self.act_hi)
        if sig != self.__dict__.get("_checked", (None,))[0]:
            args = self._args(x)
            ob.check_conv_args(*args[:14])
            if any(t is not None and not t.is_contiguous() for t in bufs):
                raise ValueError("weight_bits / scale / shift / slope: expected contiguous buffers")
            # one tuple, assigned once: another thread never sees a signature without its geometry
            self.__dict__["_checked"] = (sig, (self._oc(), *self._ksize(), *self._stride(), *self._padding(),
                                               *self._dilation(), self._groups(), ob.PAD_CODES[self._pad_mode()],
                                               ob.ACT_CODES[self.act], self.act_lo, self.act_hi))
        checked = self.__dict__["_checked"]
        if checked[0] != sig:
            return torch.ops.pyaccel.binary_conv2d(*self._args(x))  # another thread changed them meanwhile
        oc, kh, kw, sh, sw, ph, pw, dh, dw, groups, pad, act, lo, hi = checked[1]
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] % groups or x.shape[1] // groups != self._cg():
            ob.check_conv_args(*self._args(x)[:14])  # raises the error naming x
        n, c, h, w = x.shape
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            ob.check_conv_args(*self._args(x)[:14])
        y = torch.empty((n, oc, oh, ow), memory_format=_CL)  # NHWC memory, as the kernel writes it
        if y.numel() == 0:
            return y
        if x.stride(1) != 1 and x.stride(3) != 1:
            x = x.contiguous()
        bits, wsum, scale, shift, slope = bufs
        sxn, sxc, sxh, sxw = x.stride()
        _native.lib().binary_conv(
            x.data_ptr(), n, c, h, w, sxn, sxc, sxh, sxw, groups, bits.data_ptr(), oc, kh, kw, sh, sw, ph, pw, dh,
            dw, pad, wsum.data_ptr(), scale.data_ptr() if scale is not None else 0,
            shift.data_ptr() if shift is not None else 0, act, lo, hi, slope.data_ptr() if slope is not None else 0,
            y.data_ptr(), oh, ow, _get_num_threads())
        return y

    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ costs ~1.5 µs; without hooks of any kind, call forward directly
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or _any_global_hook()):
            return super().__call__(*args, **kwargs)
        if not args or type(args[0]) is not Tensor or _tracing_state() is not None or _is_compiling():
            return super().__call__(*args, **kwargs)  # torch.fx proxies, jit.trace, compile: the full path
        return self.forward(*args, **kwargs)

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


def _input(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a float tensor for {what}, got {ob._desc(x)}")
    return x if x.dtype == torch.float32 else x.float()


class XnorConv2d(_XnorBase):
    """Binary conv for inference: ``act(conv(sign(x), w±1) * scale + shift)``.

    x: float [N, C, H, W] or [C, H, W] (NCHW or channels_last) -> fp32
    [N, OC, OH, OW] in x's memory format. padding_mode 'zeros' is exact
    (border correction), 'ones' pads sign(x) with +1. Raises TypeError /
    ValueError naming the argument for bad inputs. Method: XNOR-Net
    (Rastegari et al., 2016), bit-packed popcount implicit GEMM.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", act: str = "none", act_lo: float = 0.0,
                 act_hi: float = 0.0, has_shift: bool = False, has_slope: bool = False,
                 weight_bits: Optional[Tensor] = None, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                 slope: Optional[Tensor] = None, device=None):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must divide in_channels {in_channels} and out_channels {out_channels}")
        if padding_mode not in ob.PAD_CODES:
            raise ValueError(f"padding_mode: expected one of {tuple(ob.PAD_CODES)}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride), pair(padding),
                                                                      pair(dilation))
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        shape = (groups, -(-(out_channels // groups) // bf.NR), kh * kw, bf.words(in_channels // groups), bf.NR)
        dev = torch.device(device) if device is not None else None
        if weight_bits is None:
            weight_bits = torch.zeros(shape, dtype=torch.int64, device=dev)
        elif tuple(weight_bits.shape) != shape or weight_bits.dtype != torch.int64:
            raise ValueError(f"weight_bits: expected int64 of shape {shape}, got {ob._desc(weight_bits)}")
        ones = lambda: torch.ones(out_channels, device=weight_bits.device)  # noqa: E731
        self._setup(weight_bits, ones() if scale is None else scale,
                    shift if shift is not None else (ones() * 0 if has_shift else None), act, act_lo, act_hi,
                    slope if slope is not None else (ones() if has_slope else None))

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
        """From an eval-mode pyaccel.nn.BinaryConv2d, optionally folding the
        BatchNorm2d (eval statistics) and the activation that follow it."""
        from pyaccel.nn.binary import BinaryConv2d

        if not isinstance(conv, BinaryConv2d):
            raise TypeError(f"conv: expected a pyaccel.nn.BinaryConv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} has no binary kernel (zeros / binary_padding only)")
        padding = numeric_padding(conv)
        scale, shift = fold_epilogue(conv.alpha(), conv.bias, bn)
        a, lo, hi, slope = activation_of(act, conv.out_channels)
        bits, _ = bf.pack_conv_weight(conv.weight.detach(), conv.groups)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                   conv.groups, conv.binary_padding, a, lo, hi, weight_bits=bits, scale=scale, shift=shift,
                   slope=slope)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        dtype = x.dtype if isinstance(x, Tensor) else None
        x = _input(x, "XnorConv2d")
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [N, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                             f"got {ob._desc(x)}")
        channels_last = x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()
        y = self._call(x)
        if not channels_last:
            y = y.contiguous()
        if dtype != torch.float32:  # computed in fp32, returned in x's dtype
            y = y.to(dtype)
        return y.squeeze(0) if squeeze else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.act != "none":
            s += f", act={self.act}"
        return s + f", backend={self.backend()}"


class XnorLinear(_XnorBase):
    """Binary linear for inference: ``act((sign(x) @ w±1ᵀ) * scale + shift)``.

    x: float [..., in_features] -> fp32 [..., out_features]. Built with
    ``from_binary(BinaryLinear, bn=BatchNorm1d, act=...)``.
    """

    def __init__(self, in_features: int, out_features: int, act: str = "none", act_lo: float = 0.0,
                 act_hi: float = 0.0, has_shift: bool = False, has_slope: bool = False,
                 weight_bits: Optional[Tensor] = None, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                 slope: Optional[Tensor] = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (1, -(-out_features // bf.NR), 1, bf.words(in_features), bf.NR)
        if weight_bits is None:
            weight_bits = torch.zeros(shape, dtype=torch.int64, device=device)
        elif tuple(weight_bits.shape) != shape or weight_bits.dtype != torch.int64:
            raise ValueError(f"weight_bits: expected int64 of shape {shape}, got {ob._desc(weight_bits)}")
        ones = lambda: torch.ones(out_features, device=weight_bits.device)  # noqa: E731
        self._setup(weight_bits, ones() if scale is None else scale,
                    shift if shift is not None else (ones() * 0 if has_shift else None), act, act_lo, act_hi,
                    slope if slope is not None else (ones() if has_slope else None))

    def _oc(self):
        return self.out_features

    def _cg(self):
        return self.in_features

    def _ksize(self):
        return (1, 1)

    @classmethod
    def from_binary(cls, lin: nn.Linear, bn: Optional[nn.Module] = None, act: Optional[nn.Module] = None
                    ) -> "XnorLinear":
        """From an eval-mode pyaccel.nn.BinaryLinear, optionally folding a
        BatchNorm1d (eval statistics) and the activation that follow it."""
        from pyaccel.nn.binary import BinaryLinear

        if not isinstance(lin, BinaryLinear):
            raise TypeError(f"lin: expected a pyaccel.nn.BinaryLinear, got {type(lin).__name__}")
        scale, shift = fold_epilogue(lin.alpha(), lin.bias, bn)
        a, lo, hi, slope = activation_of(act, lin.out_features)
        bits, _ = bf.pack_conv_weight(lin.weight.detach(), 1)
        new = cls(lin.in_features, lin.out_features, a, lo, hi, weight_bits=bits, scale=scale, shift=shift,
                  slope=slope)
        # BatchNorm1d and PReLU normalize / scale dim 1: the fold is right for [N, F] inputs only
        new.__dict__["_dim1_epilogue"] = bn is not None or (isinstance(act, nn.PReLU) and act.weight.numel() > 1)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        dtype = x.dtype if isinstance(x, Tensor) else None
        x = _input(x, "XnorLinear")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got {ob._desc(x)}")
        if self.__dict__.get("_dim1_epilogue") and x.dim() != 2:
            raise ValueError(f"x: this layer folds a BatchNorm1d / per-channel PReLU, which act on dim 1: "
                             f"expected a 2-D input [N, {self.in_features}], got {ob._desc(x)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._call(x2[:, :, None, None]).reshape(*lead, self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.act != "none":
            s += f", act={self.act}"
        return s + f", backend={self.backend()}"


__all__: Sequence[str] = ("XnorConv2d", "XnorLinear", "fold_epilogue", "activation_of")
