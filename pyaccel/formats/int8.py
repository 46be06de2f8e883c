"""int8 weights: symmetric per output channel (int8 [N, K] + fp32 scale [N]).

The canonical form holds values in [-127, 127] (never -128). The native
kernels read a packed copy ("NR64K4", see csrc/int8_gemm/pack.cpp) built by
:func:`pack_int8_weight` once per module; it starts with a header (magic,
layout tag, N, K) that the kernels check, and is never stored in a state_dict.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from pyaccel.formats._buffer import packed_buffer
from pyaccel.formats._checks import _desc, require_int8_values
from pyaccel import _native
from pyaccel.reference import QMAX, quantize_rows_fp32


@dataclasses.dataclass
class Int8Weight:
    """Canonical int8 linear weight: w ≈ values * scale[:, None]."""

    values: torch.Tensor  # int8 [N, K], in [-127, 127]
    scale: torch.Tensor  # fp32 [N]
    notes: List[str] = dataclasses.field(default_factory=list)  # lossy steps taken


def quantize_weight_per_channel(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 quantization of a float [N, K] weight.

    Returns values int8 [N, K] in [-127, 127] and scale fp32 [N] = fp32(max|w[n]| / 127),
    rounded by the activations' rule (pyaccel.reference.quantize_rows_fp32), so
    every finite row quantizes correctly, subnormal ones included. A row with
    max|w| below ≈ 1.5e-36 gets a subnormal scale, whose relative spacing is
    2**-149 / scale (about 1e-6 at max|w| = 2e-37, 2e-3 at 1e-40); below max|w|
    ≈ 8.9e-44 the scale rounds to 0. Raises ValueError naming `weight` for a
    tensor that is not 2-D floating point, or the first row holding an inf or NaN.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight: expected a 2-D floating-point tensor [N, K], got "
            f"{type(weight).__name__} {getattr(weight, 'dtype', '')} {tuple(getattr(weight, 'shape', ()))}"
        )
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if w.shape[1] > 0 else w.new_zeros(w.shape[0], 1)
    bad = (~torch.isfinite(amax.squeeze(1))).nonzero()
    if bad.numel():
        raise ValueError(f"weight: expected finite values, got inf or NaN in row {int(bad[0])} "
                         f"({bad.numel()} row(s) in all)")
    q = quantize_rows_fp32(w, amax)
    return Int8Weight(q.contiguous(), (amax / QMAX).squeeze(1).contiguous())


def dequantize_weight(w: Int8Weight) -> torch.Tensor:
    return w.values.float() * w.scale[:, None]


def from_torch_ao_dynamic_linear(module: torch.nn.Module) -> Int8Weight:
    """Reuse the int8 weight and scales of a torch.ao dynamically quantized Linear.

    Accepts per-tensor and per-channel (axis 0) symmetric qint8 weights (zero
    point 0). Values of -128 (torch.ao's range includes it) are clamped to -127
    so that every kernel path stays exact; the count is recorded in `notes`.
    Raises ValueError for what the int8 kernels cannot represent (float16
    dynamic Linears included: their weights are not int8 at all).
    """
    packed_dtype = getattr(getattr(module, "_packed_params", None), "dtype", None)
    if packed_dtype is None:
        raise ValueError(f"module: expected a torch.ao dynamic quantized Linear, got {type(module).__name__}")
    if packed_dtype != torch.qint8:
        raise ValueError(f"module: a torch.ao dynamic Linear with {packed_dtype} weights, not qint8 "
                         "(pyaccel reuses qint8 weights only)")
    wq, _ = module._packed_params._weight_bias()
    if wq.dtype != torch.qint8:  # pragma: no cover - packed dtype says qint8
        raise ValueError(f"module: expected qint8 weights, got {wq.dtype}")
    scheme = wq.qscheme()
    vals = wq.int_repr()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        if int(wq.q_zero_point()) != 0:
            raise ValueError(f"module: weight zero point must be 0 (symmetric), got {wq.q_zero_point()}")
        scale = torch.full((vals.shape[0],), float(wq.q_scale()), dtype=torch.float32)
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        if wq.q_per_channel_axis() != 0:
            raise ValueError(f"module: per-channel axis must be 0, got {wq.q_per_channel_axis()}")
        if bool((wq.q_per_channel_zero_points() != 0).any()):
            raise ValueError("module: per-channel weight zero points must all be 0 (symmetric)")
        scale = wq.q_per_channel_scales().float()
    else:
        raise ValueError(f"module: unsupported weight qscheme {scheme}")
    notes = []
    n128 = int((vals == -128).sum())
    if n128:
        vals = vals.clamp(min=-QMAX)
        notes.append(f"clamped {n128} weight value(s) from -128 to -127")
    return Int8Weight(vals.to(torch.int8).contiguous(), scale.contiguous(), notes)


def pack_int8_weight(values: torch.Tensor, pair_safe: bool = True, name: str = "values",
                     act_bits: int = 8) -> Optional[torch.Tensor]:
    """Pack int8 [N, K] for the native CPU kernels; None without the native library.
    ValueError (naming `name`) when values holds -128: the AVX2 kernels negate
    weights (sign trick), so the packings hold [-127, 127] only.

    pair_safe: add the section that act_bits' AVX2 kernel reads where the
    selected kernel is that one and the weights qualify (<= 2 % residual
    entries: csrc/int8_gemm/README.md): pair-safe for 8-bit activations,
    quad-safe for the 7-bit mode (act_bits=7). False for packings only the
    fused conv's int8 stage reads (it never uses one)."""
    C = _native.lib()
    if C is None:
        return None
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        raise TypeError(f"{name}: expected a 2-D int8 tensor [N, K], got {_desc(values)}")
    v = values.detach()
    require_int8_values(name, v)
    if v.device.type != "cpu":
        v = v.cpu()
    if v.stride(-1) != 1:
        v = v.contiguous()
    n, k = v.shape
    nbytes = (C.int8_packed_nbytes_for(v.data_ptr(), v.stride(0), n, k, act_bits) if pair_safe
              else C.int8_packed_nbytes(n, k))
    out = packed_buffer(nbytes)
    C.int8_pack(v.data_ptr(), v.stride(0), n, k, out.data_ptr(), nbytes, act_bits)
    return out
