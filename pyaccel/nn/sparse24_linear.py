"""Sparse24Linear: y = x Wᵀ + b with a 2:4 semi-structured sparse W (fp32
values + 2-bit positions), computed without the zeros."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pyaccel import _native, ops
from pyaccel.formats import sparse24 as s24
from pyaccel.formats import _checks
from pyaccel.nn._packed import PackedLinear, linear_weights
from pyaccel.reference import INT8_MAX_K



def _init_24_buffers(mod: nn.Module, values_dtype: torch.dtype, device) -> None:
    """values [out, 2G] and metadata [out, ceil(G/2)] buffers (positions (0, 1) in every group)."""
    groups = (mod.in_features + 3) // 4
    mod.register_buffer("values", torch.zeros(mod.out_features, 2 * groups, dtype=values_dtype, device=device))
    mod.register_buffer("metadata", torch.full((mod.out_features, (groups + 1) // 2), 0x44, dtype=torch.uint8,
                                           device=device))


def _require_rows_and_columns(weight) -> None:
    """ValueError naming `weight` for a 2-D weight without rows or columns
    (the modules need in_features and out_features >= 1)."""
    if isinstance(weight, Tensor) and weight.dim() == 2 and 0 in weight.shape:
        raise ValueError(f"weight: expected [out_features, in_features] with both >= 1, got shape "
                         f"{tuple(weight.shape)}")


class _Sparse24Buffers:
    """State-dict versions of the 2:4 modules: version 1 named the position
    buffer "meta" (a name torch.export's unlifted GraphModule reserves); loading
    such a checkpoint renames the key."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if (local_metadata or {}).get("version", 1) < 2 and prefix + "meta" in state_dict:
            state_dict[prefix + "metadata"] = state_dict.pop(prefix + "meta")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def _sparse24_error(mod, t, values_dtype):
    """Shapes, dtypes and positions of the 2:4 buffers (values, metadata, bias)."""
    n, groups = mod.out_features, (mod.in_features + 3) // 4
    return (_checks.tensor_error("values", t["values"], values_dtype, (n, 2 * groups))
            or _checks.tensor_error("metadata", t["metadata"], torch.uint8, (n, (groups + 1) // 2))
            or mod._bias_error(t["bias"]) or _checks.same_device_error(t)
            or _checks.sparse24_meta_error("metadata", t["metadata"], groups)
            or _checks.sparse24_padding_error("values", t["values"], t["metadata"], mod.in_features))


class Sparse24Linear(_Sparse24Buffers, PackedLinear):
    """Linear layer whose weight is 2:4 sparse along in_features.

    Buffers (state_dict): values float32 [out, 2G], metadata uint8 [out, ceil(G/2)]
    (see pyaccel.formats.sparse24), bias float32 [out] if any; G = ceil(in/4).
    ``weight``: read-only view of the dense weight (float32 [out, in]; see PackedLinear).
    Inputs [..., in_features] float32 or bfloat16; output in x's dtype.
    Raises ValueError naming the buffer for invalid canonical values (a group
    whose two positions are not distinct, wrong shapes or dtypes).
    """

    WEIGHT_NAMES = frozenset({"values", "metadata", "bias"})

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self._init_features(in_features, out_features)
        _init_24_buffers(self, torch.float32, device)
        self._init_bias(bias, device)
        self._repack()

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "Sparse24Linear":
        """From a dense [N, K] weight that already follows 2:4 (ValueError if not)."""
        _require_rows_and_columns(weight)
        sw = s24.compress(weight)  # names the first offending group
        n, k = weight.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias: expected a tensor of shape ({n},) or None, got {ops._desc(bias)}")
        mod = cls(k, n, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            mod.values.copy_(sw.values.float())
            mod.metadata.copy_(sw.meta)
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        mod._repack_or_raise()
        return mod

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Sparse24Linear":
        """From an nn.Linear (or transformers Conv1D) whose effective weight
        (prune masks, parametrizations applied) is 2:4 along in_features."""
        return cls.from_dense(*linear_weights(linear))

    def dense_weight(self) -> Tensor:
        """The dense weight, float32 [out_features, in_features] (exact)."""
        return s24.decompress(s24.Sparse24Weight(self.values, self.metadata, self.in_features))

    _dense_weight = dense_weight

    def _canonical_error(self, t):
        return _sparse24_error(self, t, torch.float32)

    def _pack(self) -> None:
        if self.values.device.type == "cpu" and _native.available():
            self._packed = s24.pack_sparse24(s24.Sparse24Weight(self.values, self.metadata, self.in_features))
            self._plan = self._make_plan("sparse24", self._packed)

    def _native_rows(self, x: Tensor) -> Tensor:
        return ops.sparse24_linear_cpu(x, self.values, self.metadata, self.in_features, self.bias, self._packed)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.pyaccel.sparse24_linear(x, self.values, self.metadata, self.in_features, bias, self._packed)

    def backend(self) -> str:
        """Where forward runs: cpu/<isa> (<kernel>), cpu/reference, cuda/triton, ..."""
        return self._backend_name(self.values.device, "s24_kernel_name")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity=2:4, backend={self.backend()}")


class Sparse24Int8Linear(_Sparse24Buffers, PackedLinear):
    """2:4 sparse weights quantized to int8 (symmetric per output channel),
    activations quantized per row at run time.

    Buffers (state_dict): values int8 [out, 2G] in [-127, 127], metadata uint8
    [out, ceil(G/2)], weight_scale float32 [out], bias float32 [out] if any.
    ``weight``: read-only view of the dequantized dense weight (float32 [out, in]).
    Raises ValueError naming the buffer for invalid canonical values (-128,
    non-finite scales, positions that are not distinct, shapes, dtypes).
    """

    WEIGHT_NAMES = frozenset({"values", "metadata", "weight_scale", "bias"})
    _DERIVED = ("_packed", "_plan", "_dense")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self._init_features(in_features, out_features, max_in=INT8_MAX_K)
        _init_24_buffers(self, torch.int8, device)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_bias(bias, device)
        self._dense = None
        self._repack()

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "Sparse24Int8Linear":
        """Quantize a dense [N, K] weight that follows 2:4 (ValueError naming the
        first offending group if not): int8 symmetric per output channel (lossy)."""
        from pyaccel.formats.int8 import quantize_weight_per_channel

        _require_rows_and_columns(weight)
        s24.compress(weight)  # raises, naming the group, if the weight is not 2:4
        n, k = weight.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias: expected a tensor of shape ({n},) or None, got {ops._desc(bias)}")
        q = quantize_weight_per_channel(weight)  # zeros stay zeros
        sw = s24.compress(q.values.float())
        mod = cls(k, n, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            mod.values.copy_(sw.values.to(torch.int8))
            mod.metadata.copy_(sw.meta)
            mod.weight_scale.copy_(q.scale)
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        mod._repack_or_raise()
        return mod

    @classmethod
    def from_float(cls, linear: nn.Module) -> "Sparse24Int8Linear":
        """Quantize a 2:4 nn.Linear (or transformers Conv1D; zeros, prune mask
        or parametrization): int8 per output channel (lossy)."""
        return cls.from_dense(*linear_weights(linear))

    def dense_int8_weight(self) -> Tensor:
        """The dense int8 weight [out_features, in_features] (zeros included)."""
        return s24.decompress(s24.Sparse24Weight(self.values, self.metadata, self.in_features))

    def _dense_weight(self) -> Tensor:
        return self.dense_int8_weight().float() * self.weight_scale[:, None]

    def _canonical_error(self, t):
        return (_sparse24_error(self, t, torch.int8)
                or _checks.tensor_error("weight_scale", t["weight_scale"], torch.float32, (self.out_features,))
                or _checks.int8_values_error("values", t["values"])
                or _checks.scale_error("weight_scale", t["weight_scale"]))

    def _signature(self) -> tuple:
        """PackedModule's, plus which optional parts the level in use reads
        (the AVX-VNNI / AVX2 kernels' control table, the AVX2 one's pair-safe
        section): an ISA-cap change that changes them repacks."""
        sig = super()._signature()
        if _native.available():
            sig += (_native.lib().pair_safe_levels()[1],)
        return sig

    def _pack(self) -> None:
        if self.values.device.type == "cpu" and _native.available():
            self._packed = s24.pack_sparse24_int8(self.values, self.metadata, self.in_features)
            self._plan = self._make_plan("sparse24_int8", self._packed, self.weight_scale)
            if self._plan is not None:  # the native plan reads the kernel's switch point per call itself
                self._plan.max_rows = PackedLinear._switch_rows

    def _switches(self, m: int) -> bool:
        """True where the 2:4 int8 kernel selected now loses to the dense int8
        kernel at m rows of this layer (the AVX-512 VNNI one without VBMI: from
        8 rows; the AVX-VNNI one: 2 - 7 rows on layers under 4 Mi weights,
        never on bigger ones; the ICL one against the AMX dense kernel: from
        9), so the module runs that one, on a dense packing built on first use
        (about 1.6x the sparse weight memory). Asked per call: the ISA cap
        (PYACCEL_CPU_ISA, pyaccel._native.isa_cap) may change after packing."""
        C = _native.lib()
        return C is not None and C.s24i8_dense_wins(m, self.out_features, self.in_features)

    def _switch_plan(self):
        """Native plan of the dense int8 kernel over a dense packing (built once)."""
        if self._dense is None:
            from pyaccel.formats.int8 import pack_int8_weight

            plan0 = self._plan
            packed = pack_int8_weight(self.dense_int8_weight())
            plan = self._make_plan("int8", packed, self.weight_scale)
            # packing released the GIL: another thread may have built and attached one
            # meanwhile, or edited the weights and repacked (then this packing is of the
            # old weights: use it for this call only, keep and attach nothing)
            current = self._plan is plan0 and (plan0 is None or not plan0.stale())
            if not current:
                return plan
            if self._dense is None:
                self._dense = (plan, packed)
                if self._plan is not None and plan is not None:
                    plan.max_rows = PackedLinear._switch_rows  # it takes any row count
                    self._plan.dense = plan  # from now on the native forward switches too
        return self._dense[0]

    def _native_rows(self, x: Tensor) -> Tensor:
        return ops.sparse24_int8_linear_cpu(x, self.values, self.metadata, self.in_features, self.weight_scale,
                                            self.bias, self._packed)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.pyaccel.sparse24_int8_linear(x, self.values, self.metadata, self.in_features,
                                                      self.weight_scale, bias, self._packed)

    def backend(self) -> str:
        name = self._backend_name(self.values.device, "s24i8_kernel_name")
        if name.startswith("cpu/") and name != "cpu/reference":
            p = _native.lib().kernel_params()["sparse24_int8"]
            big = self.out_features * self.in_features >= p["big_layer_weights"]
            again, start = p["sparse_from_rows_big" if big else "sparse_from_rows_small"], p["dense_from_rows"]
            if start > 0 and not 0 < again <= start:  # again <= start: an empty window (never dense here)
                rows = f"{start} - {again - 1} rows" if again > 0 else f"{start} rows on"
                name = f"{name[:-1]}; dense {_native.lib().int8_kernel_name()} at {rows})"
            elif name.startswith("cpu/avx2 ") and self._packed is not None:
                C, n, k = _native.lib(), self.out_features, self.in_features
                if C.s24i8_packing_parts(self._packed.data_ptr(), self._packed.numel(), n, k)[1]:
                    rows = p["pair_safe_from_rows_big" if n * k >= p["big_layer_weights"] else "pair_safe_from_rows_small"]
                    name = f"{name[:-1]}; pair-safe values from {rows} rows)"
                else:
                    v = self.values.detach().contiguous()
                    pb = s24.position_bytes(s24.Sparse24Weight(v, self.metadata.detach(), k))
                    if C.s24i8_packed_nbytes_for(v.data_ptr(), v.stride(0), pb.data_ptr(), pb.stride(0), n, k) > \
                            C.s24i8_packed_nbytes_ctrl(n, k):
                        why = "packed at another ISA level; the next call repacks with the split values"
                    else:
                        why = "splitting these values would leave more than 8% residual entries"
                    name = f"{name[:-1]}; sign-trick tile: {why})"
        return name

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity=2:4, dtype=int8, backend={self.backend()}")
