"""FusedDWSeparableConv2d: depthwise k x k conv -> (BN) -> act -> 1 x 1 conv ->
(BN) -> act in one kernel, BatchNorm folded (MobileNet, EfficientNet blocks).

The native CPU kernel (csrc/dwconv_fused) computes the depthwise output of
a band of output pixels into a cache-resident buffer, applies the folded BN
and the activation, and feeds it straight into a register-blocked GEMM as
its K dimension: the intermediate never goes to memory. CUDA runs the Triton
kernel (kernels/dwconv_fused.py), everything else the reference
(pyaccel.reference.dws_conv2d).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyaccel import _native
from pyaccel._pattern import ActKind, Activation, fold_bn
from pyaccel.nn._conv import ConvGeometry, ConvSkip, PackedConv2d, TF_SAME, _pair, conv_geometry, conv_weights


def _act_params(a: Activation):
    return int(a.kind), [float(a.lo), float(a.hi)]


class FusedDWSeparableConv2d(PackedConv2d):
    """y = act2(pw(act1(dw(x)))): a depthwise conv (groups = in_channels = its
    out channels, any k x k window, stride, dilation, zero padding -- symmetric,
    per side, or TensorFlow "SAME") followed by a 1 x 1 conv, each with a bias
    (BatchNorm folded in) and an activation: a name ('none' / 'identity',
    'relu', 'relu6', 'hardswish', 'silu' / 'swish'), an activation module
    (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Hardtanh, nn.Identity) or
    None.

    Args: in_channels C, out_channels Cout, kernel_size, stride, padding (int,
    (ph, pw), (top, bottom, left, right) or "tf_same"; None: (k - 1) // 2 *
    dilation, the same-size output at stride 1; nn.Conv2d's 'same' / 'valid'
    strings are not taken), dilation, act1, act2, bias (whether the pointwise
    conv has a bias buffer), device. A module built this way holds zero
    weights (it outputs act2(0) everywhere until they are loaded or copied in).

    Buffers (float32, the canonical state in state_dict): dw_weight
    [C, 1, kh, kw], dw_bias [C], pw_weight [Cout, C, 1, 1], bias [Cout] or
    None. Non-finite weights are refused (ValueError naming the buffer).

    Input [N, C, H, W] float32 or bfloat16, NCHW or channels_last (or
    unbatched [C, H, W], as nn.Conv2d takes it); output [N, Cout, OH, OW]
    ([Cout, OH, OW]) in the input's dtype and memory format, OH = (H + pad
    top + pad bottom - dilation * (kh - 1) - 1) // stride + 1 (OW alike;
    "tf_same": ceil(H / stride)). TypeError / ValueError naming ``x`` for
    other inputs (float64 / float16 included: ``.double()`` / ``.half()`` keep
    this module's fp32 buffers, so call it with float32 or bfloat16). Autograd
    reaches the input (the weights are frozen buffers); train() changes
    nothing. ``act1`` / ``act2`` (as the constructor takes them) and
    ``geometry`` (a ConvGeometry of the same window size) may be reassigned:
    the module repacks.

    Build one with :meth:`from_modules` (what ``pyaccel.patch`` does).
    Method: depthwise-separable convolution (Howard et al., MobileNets, 2017);
    fusing depthwise into pointwise so the intermediate stays in cache.
    """

    WEIGHT_NAMES = frozenset({"dw_weight", "dw_bias", "pw_weight", "bias"})
    _READ_IN_PLACE = frozenset()  # every buffer is copied into the packing
    _packed_isa: Optional[str] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]] = 3,
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Sequence[int], str, None] = None,
                 dilation: Union[int, Tuple[int, int]] = 1, act1: Union[str, Activation, None] = None,
                 act2: Union[str, Activation, None] = None, bias: bool = True, device=None):
        super().__init__()
        self._init_common(in_channels, out_channels, kernel_size, stride, padding, dilation, act1, act2, device)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("pw_weight", torch.zeros(out_channels, in_channels, 1, 1, **f32))
        self.register_buffer("bias", torch.zeros(out_channels, **f32) if bias else None)
        self._repack_or_raise()

    def _init_common(self, in_channels, out_channels, kernel_size, stride, padding, dilation, act1, act2,
                     device) -> None:
        """Validate and set channels, geometry, activations and the depthwise buffers."""
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        # (TypeError naming the argument for anything but an int or a pair of ints)
        kernel_size, stride, dilation = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation,
                                                                                                        "dilation")
        if padding is None:  # "same"-sized output at stride 1 for odd windows (ConvGeometry checks the values)
            padding = (max(kernel_size[0] - 1, 0) // 2 * dilation[0], max(kernel_size[1] - 1, 0) // 2 * dilation[1])
        self.geometry = ConvGeometry(kernel_size, stride, dilation, padding)
        self.act1, self.act2 = act1, act2  # parsed and checked by __setattr__
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        kh, kw = self.geometry.kernel
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("dw_weight", torch.zeros(in_channels, 1, kh, kw, **f32))
        self.register_buffer("dw_bias", torch.zeros(in_channels, **f32))
        self.notes = []

    # ---- construction from the original modules --------------------------------------
    @classmethod
    def from_modules(cls, dw: nn.Conv2d, bn1: Optional[nn.Module], act1: Optional[Activation], pw: nn.Conv2d,
                     bn2: Optional[nn.Module], act2: Optional[Activation]) -> "FusedDWSeparableConv2d":
        """The fused module computing act2(bn2(pw(act1(bn1(dw(x)))))) (BN in eval
        form, folded in float64). bn1 / bn2: BatchNorm2d or None; act1 / act2:
        as the constructor takes them. Raises pyaccel.nn.ConvSkip (a
        ValueError) when a conv's padding cannot be read (a Conv2d subclass
        that pads on its own in an unknown way), ValueError when the shapes do
        not chain (groups, 1 x 1, channel counts) or a BatchNorm is in training
        mode (call .eval() first: it would normalize with batch statistics)."""
        for name, bn in (("bn1", bn1), ("bn2", bn2)):
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training:
                raise ValueError(f"{name}: in training mode (it normalizes with batch statistics there); call "
                                 ".eval() before fusing")
        geo = conv_geometry(dw)
        c = dw.in_channels
        if dw.groups != c or dw.out_channels != c:
            raise ValueError(f"dw: expected a depthwise conv (groups = in = out channels = {c}), got groups="
                             f"{dw.groups}, out_channels={dw.out_channels}")
        pgeo = conv_geometry(pw)
        if (pgeo.kernel != (1, 1) or pgeo.stride != (1, 1) or pgeo.pads(1, 1) != (0, 0, 0, 0) or pw.groups != 1
                or pw.in_channels != c):
            raise ValueError(f"pw: expected a 1x1 conv over {c} channels (stride 1, no padding, groups 1), got "
                             f"{pgeo.describe()}, groups={pw.groups}, in_channels={pw.in_channels}")
        wd, bd = conv_weights(dw)
        wp, bp = conv_weights(pw)
        wd, bd = fold_bn(wd, bd, bn1)
        wp, bp = fold_bn(wp, bp, bn2)
        pad = geo.padding
        mod = cls(c, pw.out_channels, geo.kernel, geo.stride, pad, geo.dilation, act1, act2, bias=True,
                  device=wd.device)
        with torch.no_grad():
            mod.dw_weight.copy_(wd)
            mod.dw_bias.copy_(bd)
            mod.pw_weight.copy_(wp)
            mod.bias.copy_(bp)
        mod._repack_or_raise()
        return mod

    # ---- canonical buffers -----------------------------------------------------------
    def _signature(self) -> tuple:
        """The buffers' signature (PackedModule._signature) plus the geometry and
        activations, which the packing bakes in: assigning ``geometry``,
        ``act1`` or ``act2`` repacks at the next call (ConvGeometry and
        Activation are frozen: only an assignment changes them)."""
        return super()._signature() + (self.geometry, self.act1, self.act2)

    _BAKED_IN = frozenset({"geometry", "act1", "act2"})

    def __setattr__(self, name, value):
        if name in ("act1", "act2"):
            value = Activation.parse(value, name)  # a name, a module, an Activation or None
            if value.kind == ActKind.PRELU:
                raise ValueError(f"{name}: PReLU is not supported by the fused kernel")
        elif name == "geometry":
            self._check_geometry(value)
        super().__setattr__(name, value)
        if name in self._BAKED_IN and "_plan" in self.__dict__:
            self._repack()  # now, not at the next call: compiled code does not check _signature

    def _check_geometry(self, g) -> None:
        """TypeError / ValueError naming `geometry` unless g is a ConvGeometry
        of the window dw_weight holds (once the buffers exist)."""
        if not isinstance(g, ConvGeometry):
            raise TypeError(f"geometry: expected a pyaccel.nn._conv.ConvGeometry (for instance "
                            f"dataclasses.replace(module.geometry, stride=(2, 2))), got {type(g).__name__} {g!r}")
        old = self.__dict__.get("geometry")
        if old is not None and g.kernel != old.kernel:
            raise ValueError(f"geometry: expected a {old.kernel[0]}x{old.kernel[1]} window (dw_weight's), got "
                             f"{g.kernel[0]}x{g.kernel[1]}: build a new module for another window size")

    def _buffer_specs(self):
        """name -> (dtype, shape) of the canonical buffers."""
        c, n = self.in_channels, self.out_channels
        return dict(self._dw_specs(), pw_weight=(torch.float32, (n, c, 1, 1)), bias=(torch.float32, (n,)))

    def _dw_specs(self):
        c = self.in_channels
        kh, kw = self.geometry.kernel
        return {"dw_weight": (torch.float32, (c, 1, kh, kw)), "dw_bias": (torch.float32, (c,))}

    def _value_error(self, name: str, v: Tensor) -> Optional[str]:
        if name in ("dw_weight", "pw_weight") and not bool(torch.isfinite(v).all()):
            return f"{name}: holds non-finite values (inf/nan)"
        return None

    def _canonical_error(self, t) -> Optional[str]:
        for name, (dtype, shape) in self._buffer_specs().items():
            v = t.get(name)
            if v is None:
                if name == "bias":
                    continue
                return f"{name}: missing"
            if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
                got = f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                return f"{name}: expected {dtype} of shape {shape}, got {got}"
            if not v.is_meta:
                err = self._value_error(name, v)
                if err:
                    return err
        devs = {v.device for v in t.values() if isinstance(v, Tensor)}
        if len(devs) > 1:
            return f"dw_weight/dw_bias/pw_weight/bias: on different devices {sorted(map(str, devs))}"
        return None

    def _pack(self) -> None:
        self._packed_isa = None
        C = _native.lib()
        if C is None or not self.dw_weight.is_cpu:
            return
        bp = None if self.bias is None else self.bias.contiguous()
        self._packed = self._pack_dws(C, self.pw_weight.contiguous(), bp, self.out_channels)
        self._packed_isa = _native.selected_isa()

    def _pack_dws(self, C, wp: Optional[Tensor], bp: Optional[Tensor], n: int) -> Tensor:
        """The DWS1 packing of the depthwise part and (n > 0) the pointwise weights wp [n, c, 1, 1]."""
        c = self.in_channels
        kh, kw = self.geometry.kernel
        (sh, sw), (dh, dw) = self.geometry.stride, self.geometry.dilation
        wd, bd = self.dw_weight.contiguous(), self.dw_bias.contiguous()
        nbytes = C.dws_packed_nbytes(c, n, kh, kw)
        packed = torch.empty(nbytes, dtype=torch.uint8)
        a1, p1 = _act_params(self.act1)
        a2, p2 = _act_params(self.act2)
        C.dws_pack(wd.data_ptr(), bd.data_ptr(), 0 if wp is None else wp.data_ptr(), 0 if bp is None else bp.data_ptr(),
                   c, n, kh, kw, sh, sw, dh, dw, a1, p1[0], p1[1], a2, p2[0], p2[1], packed.data_ptr(), nbytes)
        return packed

    def _native_ok(self) -> bool:
        if self._packed is not None and self._packed_isa != _native.selected_isa():
            self._repack()  # the ISA cap changed: the panel layout may differ
        return self._packed is not None

    def _native_nhwc_into(self, xn: Tensor, y: Tensor, pad_t: int, pad_l: int) -> None:
        n, h, w, c = xn.shape
        kh, kw = self.geometry.kernel
        p = self._packed
        _native.lib().dws_forward(xn.data_ptr(), n, h, w, c, p.data_ptr(), p.numel(), self.out_channels, kh, kw,
                                  y.data_ptr(), y.shape[1], y.shape[2], pad_t, pad_l, torch.get_num_threads())

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        from pyaccel import ops_conv  # noqa: F401  (registers torch.ops.pyaccel.dws_conv2d)

        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if (not torch.compiler.is_compiling() and x.is_cpu and self._packed is not None
                and self._packed_isa != _native.selected_isa()):
            self._repack()  # the ISA cap changed since packing
        packed = self._packed if x.is_cpu else None
        return torch.ops.pyaccel.dws_conv2d(x, self.dw_weight, self.dw_bias, self.pw_weight, bias,
                                            *self._op_geometry(), packed)

    def _op_geometry(self) -> list:
        """stride, dilation, padding, tf_same, act1, act1_params, act2, act2_params for the ops."""
        g = self.geometry
        a1, p1 = _act_params(self.act1)
        a2, p2 = _act_params(self.act2)
        tf = g.padding == TF_SAME
        return [list(g.stride), list(g.dilation), [0, 0, 0, 0] if tf else list(g.padding), tf, a1, p1, a2, p2]

    # ---- reporting ---------------------------------------------------------------------
    def backend(self) -> str:
        dev = self.dw_weight.device
        if dev.type == "cpu":
            C = _native.lib()
            if C is None or self._packed is None:
                return "cpu/reference"
            return f"cpu/{_native.selected_isa()} ({C.dws_kernel_name()})"
        return "cuda/triton" if dev.type == "cuda" else f"{dev.type}/reference"

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, {self.geometry.describe()}, act1={self.act1.name}, "
                f"act2={self.act2.name}, bias={self.bias is not None}, backend={self.backend()}")


def fuse_dws(dw: nn.Conv2d, bn1=None, act1=None, pw: nn.Conv2d = None, bn2=None, act2=None):
    """FusedDWSeparableConv2d.from_modules with activations given as the
    constructor takes them (modules, nn.Identity included, names or None);
    ValueError naming act1 / act2 for another one."""
    return FusedDWSeparableConv2d.from_modules(dw, bn1, Activation.parse(act1, "act1"), pw, bn2,
                                               Activation.parse(act2, "act2"))


__all__ = ["FusedDWSeparableConv2d", "fuse_dws", "ConvSkip"]
