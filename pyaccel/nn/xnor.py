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

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pyaccel import _native
from pyaccel import ops_binary as ob
from pyaccel.formats import binary as bf
from pyaccel.nn._conv import _pair, in_format, is_channels_last
from pyaccel.nn._packed import _grad_enabled
from pyaccel.nn._xnor_base import (_CL, _F32, _XnorBase, _check_int, _get_num_threads, _input, _is_compiling,
                                   _sizes, _tracing_state)
from pyaccel.nn._xnor_fold import (_folded, _string_padding, activation_of, check_batchnorm,  # noqa: F401
                                   fold_epilogue, numeric_padding)


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
