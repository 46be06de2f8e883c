"""Int8Linear: y = x Wᵀ + b with int8 weights (per output channel) and int8
activations quantized per row at run time; int32 accumulation; the
dequantization and bias are fused into the kernel's epilogue."""
from __future__ import annotations

import numbers
from typing import List, Optional

import torch
from torch import Tensor, nn

from pyaccel import _native, ops
from pyaccel.formats import _checks
from pyaccel.nn._packed import PackedLinear, linear_weights
from pyaccel.formats.int8 import (
    Int8Weight,
    dequantize_weight,
    from_torch_ao_dynamic_linear,
    pack_int8_weight,
    quantize_weight_per_channel,
)
from pyaccel.reference import ACT_QMAX, INT8_MAX_K, QMAX


try:  # torch.ao's dynamic Linear; absent in some builds
    from torch.ao.nn.quantized.dynamic import Linear as _AoDynamicLinear
except Exception:  # pragma: no cover
    _AoDynamicLinear = None


def _act_bits_entry(value) -> Optional[int]:
    """A state_dict's act_bits entry as 8 or 7, or None when it is anything
    else: a float (7.5, and 7.0 as ``module.act_bits = 7.0`` refuses it), a
    bool, a tensor of another dtype or more than one element."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or \
                value.dtype == torch.bool or value.device.type == "meta":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in ACT_QMAX:
        return None
    return int(value)


class Int8Linear(PackedLinear):
    """Linear layer with int8 weights and dynamically quantized int8 activations.

    Buffers (what state_dict holds, machine independent):
        weight_int8: int8 [out_features, in_features], values in [-127, 127]
        weight_scale: float32 [out_features]
        bias: float32 [out_features] (only when the layer has a bias)
    and, only in the 7-bit mode, the entry ``act_bits`` (int64 scalar, 7).

    The native CPU kernels read a packed copy of weight_int8, built once when the
    module is created, loaded or moved to the CPU; it is never saved.

    ``weight`` is a read-only view of the dequantized weight
    (``weight_int8 * weight_scale[:, None]``, float32 [out, in]; see PackedLinear).

    Activation modes (``act_bits``, saved in state_dict; a checkpoint without
    it loads as 8-bit):
        8 (default): x quantized per row to [-127, 127]. SQNR against fp64 on
            the int8 bench suite (4096x4096 and 1024x4096, M = 1 - 512):
            39.6 - 41.2 dB.
        7 (opt-in): x quantized per row to [-63, 63] (scale max|x| / 63, the
            same rounding rule), half the resolution: 33.9 - 35.7 dB on the
            same suite (torch.ao quantize_dynamic, which also uses 7-bit
            activations: 32.5 - 35.6 dB). Faster on AVX2-only CPUs, where
            7-bit activations let the kernel use vpmaddubsw without the sign
            trick (3 instructions per 32 products instead of 4): 1.4 - 1.6x
            the 8-bit kernel at M >= 32 (Zen 4 capped at AVX2); the same
            speed as 8-bit on AVX-512. Every ISA gives the same result for a
            checkpoint in either mode.

    Inputs: [..., in_features] float32 or bfloat16; the output has x's dtype.
    Raises ValueError naming the buffer when canonical values are invalid
    (-128 in weight_int8, a non-finite scale, a wrong shape or dtype): on
    assignment, in load_state_dict, or at the call after an in-place edit.
    """

    WEIGHT_NAMES = frozenset({"weight_int8", "weight_scale", "bias"})

    @property
    def act_bits(self) -> int:
        """8 or 7: the activation mode (see the class docstring). Assigning it
        switches the kernels (ValueError for other values)."""
        return self.__dict__.get("_act_bits", 8)  # 8 for objects pickled before the 7-bit mode

    @act_bits.setter
    def act_bits(self, bits: int) -> None:
        ops.check_act_bits(bits)
        self.__dict__["_act_bits"] = int(bits)
        if "_plan" in self.__dict__:
            self._repack()

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, act_bits: int = 8) -> None:
        super().__init__()
        ops.check_act_bits(act_bits)
        self.act_bits = act_bits
        self._init_features(in_features, out_features, max_in=INT8_MAX_K)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_bias(bias, device)
        self.notes: List[str] = []
        self._repack()

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_weights(cls, weight: Int8Weight, bias: Optional[Tensor] = None, act_bits: int = 8) -> "Int8Linear":
        """Build from a canonical int8 weight (values [N, K] int8, scale [N] fp32);
        act_bits 8 or 7 (see the class docstring). ValueError for other act_bits."""
        ops.check_act_bits(act_bits)
        v, s = weight.values, weight.scale
        if not isinstance(v, Tensor) or v.dtype != torch.int8 or v.dim() != 2:
            raise TypeError(f"weight.values: expected a 2-D int8 tensor, got {ops._desc(v)}")
        if v.numel() and int(v.min()) < -QMAX:
            raise ValueError("weight.values: expected values in [-127, 127], found -128")
        n, k = v.shape
        if not isinstance(s, Tensor) or tuple(s.shape) != (n,) or not s.is_floating_point():
            raise ValueError(f"weight.scale: expected a float tensor of shape ({n},), got {ops._desc(s)}")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias: expected a tensor of shape ({n},) or None, got {ops._desc(bias)}")
        mod = cls(k, n, bias=bias is not None, device=v.device, act_bits=act_bits)
        with torch.no_grad():
            mod.weight_int8.copy_(v)
            mod.weight_scale.copy_(s.float())
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        mod.notes = list(weight.notes)
        mod._repack_or_raise()
        return mod

    @classmethod
    def from_float(cls, linear: nn.Linear, act_bits: int = 8) -> "Int8Linear":
        """Quantize an nn.Linear (or a transformers Conv1D): weights symmetric
        per output channel (lossy), read in their effective form (prune masks,
        parametrizations applied). act_bits=7 selects the opt-in 7-bit
        activation mode (faster on AVX2-only CPUs, ~6 dB less accurate; see
        the class docstring)."""
        w, b = linear_weights(linear)
        return cls.from_weights(quantize_weight_per_channel(w), b, act_bits=act_bits)

    @classmethod
    def from_module(cls, module: nn.Module, act_bits: int = 8) -> "Int8Linear":
        """Reuse the int8 weights of a torch.ao dynamically quantized Linear
        (torch.ao.quantization.quantize_dynamic), per-tensor or per-channel;
        act_bits as in from_float."""
        if _AoDynamicLinear is None or not isinstance(module, _AoDynamicLinear):
            raise TypeError(
                f"module: expected torch.ao.nn.quantized.dynamic.Linear, got {type(module).__name__}"
                + (" (use Int8Linear.from_float for nn.Linear)" if isinstance(module, nn.Linear) else "")
            )
        w = from_torch_ao_dynamic_linear(module)
        _, bias = module._packed_params._weight_bias()
        return cls.from_weights(w, bias.detach() if bias is not None else None, act_bits=act_bits)

    # ---- validation and packing ----------------------------------------------------
    def _canonical_error(self, t):
        n, k = self.out_features, self.in_features
        return (_checks.tensor_error("weight_int8", t["weight_int8"], torch.int8, (n, k))
                or _checks.tensor_error("weight_scale", t["weight_scale"], torch.float32, (n,))
                or self._bias_error(t["bias"]) or _checks.same_device_error(t)
                or _checks.int8_values_error("weight_int8", t["weight_int8"])
                or _checks.scale_error("weight_scale", t["weight_scale"]))

    def _signature(self) -> tuple:
        """PackedModule's, plus whether the level in use reads the section of
        this activation mode (pair-safe for 8-bit, quad-safe for 7-bit): an
        ISA-cap change across the AVX2 level repacks, with or without it."""
        sig = super()._signature()
        if _native.available():
            sig += (_native.lib().pair_safe_levels()[0 if self.act_bits == 8 else 2],)
        return sig

    def _pack(self) -> None:
        if self.weight_int8.device.type == "cpu" and _native.available():
            self._packed = pack_int8_weight(self.weight_int8, act_bits=self.act_bits)
            self._plan = self._make_plan("int8_a7" if self.act_bits == 7 else "int8", self._packed,
                                         self.weight_scale)

    # ---- the activation mode in state_dict --------------------------------------------
    # Saved as "act_bits" (int64 scalar) only for the 7-bit mode, so 8-bit
    # checkpoints stay what they were; loading restores the mode, and a
    # checkpoint without the key (every older one) loads as 8-bit.
    _ACT_BITS_KEY = "act_bits"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.act_bits != 8:
            destination[prefix + self._ACT_BITS_KEY] = torch.tensor(self.act_bits, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + self._ACT_BITS_KEY
        bits = _act_bits_entry(state_dict.get(key, 8))
        if bits is None:
            error_msgs.append(f"{type(self).__name__} ({prefix or 'root'}): {key}: expected the integer 8 or 7 "
                              f"(an integer scalar tensor, as state_dict saves it), got {state_dict.get(key)!r}")
            return
        old = self.act_bits
        self.__dict__["_act_bits"] = bits  # repacked once, at the end of the load
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > n_err:  # refused: keep the mode with the old weights
            self.act_bits = old
            self._repack()
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def dequantized_weight(self) -> Tensor:
        """weight_int8 * weight_scale[:, None], float32 [out_features, in_features]."""
        return dequantize_weight(Int8Weight(self.weight_int8, self.weight_scale))

    _dense_weight = dequantized_weight

    # ---- forward (PackedModule.forward) ---------------------------------------------
    def _native_rows(self, x: Tensor) -> Tensor:
        return ops.int8_linear_cpu(x, self.weight_int8, self.weight_scale, self.bias, self._packed, self.act_bits)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.pyaccel.int8_linear(x, self.weight_int8, self.weight_scale, bias, self._packed,
                                             self.act_bits)

    def backend(self) -> str:
        """Where forward runs: cpu/<isa> (<kernel>), cpu/reference, cuda/triton, ..."""
        name = self._backend_name(self.weight_int8.device, "int8_kernel_name")
        if self.act_bits == 7 and "(" in name:  # the 7-bit ladder's kernel
            from pyaccel import _native

            name = f"{name.split(' (')[0]} ({_native.lib().int8_kernel_name(7)})"
        if name.startswith("cpu/avx2 ") and self._packed is not None:
            name = self._split_path(name)
        return name

    def _split_path(self, name: str) -> str:
        """backend() at the AVX2 level: whether the pair-safe (8-bit) or
        quad-safe (7-bit) path runs, from how many rows, or why not."""
        from pyaccel import _native

        C = _native.lib()
        n, k = self.out_features, self.in_features
        params = C.kernel_params()["int8" if self.act_bits == 8 else "int8_a7"]
        frac = params["pair_safe_max_entry_fraction" if self.act_bits == 8 else "quad_safe_max_entry_fraction"]
        if self._packed.numel() > C.int8_packed_nbytes(n, k):
            path = "pair_safe" if self.act_bits == 8 else "quad_safe"
            k_pad = -(-k // params["kr"]) * params["kr"]  # the kernels count n * k_pad weights
            huge = f"{path}_huge_weights" in params and n * k_pad >= params[f"{path}_huge_weights"]
            rows = params[f"{path}_from_rows_huge" if huge else f"{path}_from_rows"]
            kernel = "pair-safe qs8_gemm_4x16c4ps_avx2" if self.act_bits == 8 else "quad-safe qs8_gemm_4x16c4qs_avx2"
            return f"{name[:-1]}; {kernel} from {rows} rows)"
        if frac == 0:
            return name
        w = self.weight_int8.detach().contiguous()
        if C.int8_packed_nbytes_for(w.data_ptr(), k, n, k, self.act_bits) > C.int8_packed_nbytes(n, k):
            why = "packed at another ISA level; the next call repacks with the split weights"
        else:
            why = f"splitting these weights would leave more than {frac:.0%} residual entries"
        return f"{name[:-1]}; {'int16 tile' if self.act_bits == 8 else 'unsplit tile'}: {why})"

    def extra_repr(self) -> str:
        bits = ", act_bits=7" if self.act_bits == 7 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{bits}, backend={self.backend()}")
