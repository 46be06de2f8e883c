"""FusedDWSeparableInt8Conv2d: the fused depthwise-separable conv with its
pointwise stage in int8 (``pyaccel.patch(model, quantize="int8")``; lossy).

The depthwise stage stays fp32 (1 - 7 % of the MACs); its output is
quantized per output pixel (symmetric, max|t| / 127, as pyaccel's int8
linear quantizes a row) against int8 pointwise weights quantized per output
channel, and the int32 sums are dequantized with the bias in the epilogue
(csrc/int8_gemm's micro-kernels and epilogue, fed band by band from the
fused kernel's cache-resident buffer), then act2. Judged by SQNR against
the fp32 block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyaccel import _native
from pyaccel.formats.int8 import pack_int8_weight, quantize_weight_per_channel
from pyaccel.nn.dws_conv import FusedDWSeparableConv2d


class FusedDWSeparableInt8Conv2d(FusedDWSeparableConv2d):
    """FusedDWSeparableConv2d with an int8 pointwise stage.

    Same arguments as FusedDWSeparableConv2d. Buffers: dw_weight float32
    [C, 1, kh, kw], dw_bias float32 [C], pw_weight_int8 int8 [Cout, C] in
    [-127, 127], pw_scale float32 [Cout] (finite), bias float32 [Cout] or None.
    Build one with :meth:`from_float` (from a FusedDWSeparableConv2d). The
    pointwise stage follows pyaccel's int8 scheme, as Int8Linear's
    (README.md, "Int8Linear"): the depthwise output quantized per pixel to
    [-127, 127] at run time, weights per output channel, int32 sums,
    dequantization + bias, then act2. Lossy: judge it by SQNR against the fp32
    module (MobileNetV1 blocks: 45 - 47 dB, bench/RESULTS.md).
    """

    WEIGHT_NAMES = frozenset({"dw_weight", "dw_bias", "pw_weight_int8", "pw_scale", "bias"})
    _DERIVED = ("_packed", "_plan", "_packed_pw")
    _packed_pw: Optional[Tensor] = None

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1, act1=None,
                 act2=None, bias: bool = True, device=None):
        super(FusedDWSeparableConv2d, self).__init__()
        self._init_common(in_channels, out_channels, kernel_size, stride, padding, dilation, act1, act2, device)
        self.register_buffer("pw_weight_int8", torch.zeros(out_channels, in_channels, dtype=torch.int8, device=device))
        self.register_buffer("pw_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32, device=device) if bias else None)
        self._repack_or_raise()

    @classmethod
    def from_float(cls, fused: FusedDWSeparableConv2d) -> "FusedDWSeparableInt8Conv2d":
        """Quantize a FusedDWSeparableConv2d's pointwise weights per output channel
        (lossy); the depthwise stage stays fp32. TypeError for anything but a
        float FusedDWSeparableConv2d (this int8 class included; build one from
        a chain with ``FusedDWSeparableConv2d.from_modules`` or ``pyaccel.patch``)."""
        if not isinstance(fused, FusedDWSeparableConv2d) or isinstance(fused, cls):
            raise TypeError(f"fused: expected a float pyaccel.nn.FusedDWSeparableConv2d, got "
                            f"{type(fused).__name__}")
        g = fused.geometry
        mod = cls(fused.in_channels, fused.out_channels, g.kernel, g.stride, g.padding, g.dilation, fused.act1,
                  fused.act2, bias=fused.bias is not None, device=fused.dw_weight.device)
        q = quantize_weight_per_channel(fused.pw_weight.reshape(fused.out_channels, fused.in_channels))
        with torch.no_grad():
            mod.dw_weight.copy_(fused.dw_weight)
            mod.dw_bias.copy_(fused.dw_bias)
            mod.pw_weight_int8.copy_(q.values)
            mod.pw_scale.copy_(q.scale)
            if fused.bias is not None:
                mod.bias.copy_(fused.bias)
        mod.notes = list(fused.notes)
        mod._repack_or_raise()
        return mod

    def _buffer_specs(self):
        c, n = self.in_channels, self.out_channels
        return dict(self._dw_specs(), pw_weight_int8=(torch.int8, (n, c)), pw_scale=(torch.float32, (n,)),
                    bias=(torch.float32, (n,)))

    def _value_error(self, name: str, v: Tensor) -> Optional[str]:
        if name == "pw_weight_int8" and bool((v == -128).any()):
            return "pw_weight_int8: holds -128 (symmetric int8 is [-127, 127])"
        if name in ("dw_weight", "pw_scale") and not bool(torch.isfinite(v).all()):
            return f"{name}: holds non-finite values (inf/nan)"
        return None

    def _pack(self) -> None:
        self._packed_isa = None
        C = _native.lib()
        if C is None or not self.dw_weight.is_cpu or not self.pw_scale.is_contiguous() or (
                self.bias is not None and not self.bias.is_contiguous()):
            return
        self._packed = self._pack_dws(C, None, None, 0)  # the depthwise part alone
        self._packed_pw = pack_int8_weight(self.pw_weight_int8, pair_safe=False)  # its int8 stage reads the plain panels
        self._packed_isa = _native.selected_isa()

    def _native_nhwc_into(self, xn: Tensor, y: Tensor, pad_t: int, pad_l: int) -> None:
        from pyaccel.ops_conv import dws_int8_native_nhwc_into

        dws_int8_native_nhwc_into(xn, y, self._packed, self._packed_pw, self.pw_scale, self.bias,
                                  self.geometry.kernel, pad_t, pad_l)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        from pyaccel import ops_conv  # noqa: F401  (registers torch.ops.pyaccel.dws_conv2d_int8)

        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if (not torch.compiler.is_compiling() and x.is_cpu and self._packed is not None
                and self._packed_isa != _native.selected_isa()):
            self._repack()
        cpu = x.is_cpu
        return torch.ops.pyaccel.dws_conv2d_int8(x, self.dw_weight, self.dw_bias, self.pw_weight_int8, self.pw_scale,
                                                 bias, *self._op_geometry(), self._packed if cpu else None,
                                                 self._packed_pw if cpu else None)

    def backend(self) -> str:
        b = super().backend()
        C = _native.lib()
        if b.startswith("cpu/") and C is not None and self._packed is not None:
            b = b[:-1] + f" + {C.int8_kernel_name()})"
        return b
