"""BlockSparseLinear: y = x Wᵀ + b with a block-sparse W in torch's BSR layout,
computed over the kept blocks only."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from pyaccel import _native, ops  # noqa: F401  (ops: registers torch.ops.pyaccel.*)
from pyaccel import ops_block_sparse as bops
from pyaccel.formats import _checks
from pyaccel.formats import block_sparse as bsf
from pyaccel.formats import sparse24 as s24
from pyaccel.nn._packed import PackedLinear, linear_weights
from pyaccel.reference import INT8_MAX_K

DEFAULT_BLOCK = (32, 32)


def _warn_if_dense(mod: "BlockSparseLinear", block: Tuple[int, int], w: Tensor) -> None:
    """UserWarning when from_float kept every block (density 1.0), saying what
    to do instead: a 2:4 module for a 2:4 weight, else another block shape."""
    if w.numel() and mod.density >= 1.0:
        bh, bw = block
        zeros = float((w == 0).float().mean())
        if zeros > 0 and s24.is_24(w):
            other = "Sparse24Int8Linear" if isinstance(mod, BlockSparseInt8Linear) else "Sparse24Linear"
            hint = (f"The weight is 2:4 sparse (at most 2 non-zeros in every 4 consecutive inputs), which leaves no "
                    f"{bh}x{bw} block all zero: pyaccel.nn.{other}.from_float computes it without the zeros")
        else:
            example = (1, 4) if (bh, bw) != (1, 4) else (32, 32)
            hint = (f"Pass the block shape the weight was pruned with (e.g. block={example}); pyaccel.patch finds it "
                    "by itself")
        warnings.warn(f"from_float: no all-zero {bh}x{bw} block in the weight ({zeros:.0%} of its entries are "
                      f"zero): the result is a dense layer in a block-sparse format. {hint}.",
                      UserWarning, stacklevel=3)


def _bsr_weight(weight, bias, shape) -> bsf.BlockSparseWeight:
    """from_torch_bsr, with a hint when a bias shows the weight is padded and `shape` is missing."""
    if (shape is None and isinstance(bias, Tensor) and bias.dim() == 1 and isinstance(weight, Tensor)
            and weight.dim() == 2 and bias.shape[0] < weight.shape[0]):
        raise ValueError(f"bias: {bias.shape[0]} entries for a BSR weight of {weight.shape[0]} rows: pass a bias of "
                         f"{weight.shape[0]} entries, or, if the weight is padded to whole blocks, "
                         f"shape=(out_features, in_features)")
    return bsf.from_torch_bsr(weight, shape)


class BlockSparseLinear(PackedLinear):
    """Linear layer whose weight is block-sparse (torch BSR layout, fp32 blocks).

    Buffers (state_dict; pyaccel.formats.block_sparse): values float32
    [nnzb, bh, bw], crow_indices int32 [ceil(out/bh) + 1], col_indices int32
    [nnzb], bias float32 [out] if any. Shapes that are not multiples of the
    block are padded, never rejected. The number of kept blocks and the block
    shape come from the weights: ``load_state_dict`` adopts those of the
    checkpoint (so a module built with any block loads any BSR checkpoint).
    ``weight``: read-only view of the dense weight (float32 [out, in]).

    Inputs [..., in_features] float32 or bfloat16; output in x's dtype.
    Raises ValueError naming the buffer for invalid indices (out of range,
    unsorted or duplicate block columns, bad row pointers) or shapes.
    """

    WEIGHT_NAMES = frozenset({"values", "crow_indices", "col_indices", "bias"})

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block: Tuple[int, int] = DEFAULT_BLOCK, device=None) -> None:
        super().__init__()
        self._init_features(in_features, out_features)
        bh, bw = bsf.check_block(block)
        self.register_buffer("values", torch.zeros(0, bh, bw, dtype=torch.float32, device=device))
        self.register_buffer("crow_indices", torch.zeros(-(-out_features // bh) + 1, dtype=torch.int32,
                                                         device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32, device=device))
        self._init_bias(bias, device)
        self._repack()

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_weight(cls, bsw: bsf.BlockSparseWeight, bias: Optional[Tensor] = None) -> "BlockSparseLinear":
        """From a canonical BSR weight (ValueError naming what is wrong)."""
        err = bsf.canonical_error(bsw)
        if err:
            raise ValueError(err)
        if not bsw.values.is_floating_point():
            raise ValueError(f"values: expected floating-point block values, got {bsw.values.dtype}: integer "
                             "values need their per-channel scales (BlockSparseInt8Linear.from_bsr(weight, "
                             "bias, weight_scale=...) or .from_weight)")
        n, k = bsw.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias: expected a tensor of shape ({n},) or None, got {ops._desc(bias)}")
        mod = cls(k, n, bias=bias is not None, block=bsw.block, device=bsw.values.device)
        mod._set_blocks(bsw.values.detach().float().clone(), bsw.crow_indices.clone(), bsw.col_indices.clone())
        if bias is not None:
            with torch.no_grad():
                mod.bias.copy_(bias.detach().float())
        mod._repack_or_raise()
        return mod

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None,
                   block: Tuple[int, int] = DEFAULT_BLOCK) -> "BlockSparseLinear":
        """From a dense [out, in] weight: every block holding a non-zero is kept
        (lossless)."""
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight: expected a 2-D floating-point tensor [out, in], got {ops._desc(weight)}")
        return cls.from_weight(bsf.compress(weight.detach().float(), block), bias)

    @classmethod
    def from_float(cls, linear: nn.Module, block: Tuple[int, int] = DEFAULT_BLOCK) -> "BlockSparseLinear":
        """From an nn.Linear (or transformers Conv1D) whose effective weight
        (prune masks, parametrizations applied) has zero blocks of shape
        `block` (lossless). Warns (UserWarning) when no block of that shape is
        all zero: the result would be a dense layer in a sparse format
        (``pyaccel.patch`` finds the block shape by itself)."""
        w, b = linear_weights(linear)
        mod = cls.from_dense(w, b, block)
        _warn_if_dense(mod, block, w)
        return mod

    @classmethod
    def from_bsr(cls, weight: Tensor, bias: Optional[Tensor] = None,
                 shape: Optional[Tuple[int, int]] = None) -> "BlockSparseLinear":
        """From a ``torch.sparse_bsr`` weight [out_pad, in_pad] of floating-point
        blocks (`shape`: the logical (out, in) when padded, two ints). ValueError naming
        the argument for a tensor of another layout, bad indices, integer values
        or a bias that does not match."""
        return cls.from_weight(_bsr_weight(weight, bias, shape), bias)

    def to_bsr(self) -> Tensor:
        """The weight as a ``torch.sparse_bsr`` tensor (padded shape), float32 blocks."""
        return bsf.to_torch_bsr(self._bsw())

    # ---- canonical buffers ------------------------------------------------------
    @property
    def block(self) -> Tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def density(self) -> float:
        """Fraction of the (padded) weight's blocks that are kept."""
        return self._bsw().density

    def _bsw(self, t=None) -> bsf.BlockSparseWeight:
        t = t if t is not None else self._canonical()
        return bsf.BlockSparseWeight(t["values"], t["crow_indices"], t["col_indices"],
                                     (self.out_features, self.in_features))

    def _set_blocks(self, values: Tensor, crow: Tensor, col: Tensor) -> None:
        """Replace the three BSR buffers at once (their shapes depend on the data)."""
        self._loading = True
        try:
            self.values, self.crow_indices, self.col_indices = values, crow, col
        finally:
            self._loading = False

    _VALUES_DTYPE = torch.float32

    def _canonical_error(self, t):
        v = t["values"]
        if not isinstance(v, Tensor) or v.dtype != self._VALUES_DTYPE:
            return f"values: expected {self._VALUES_DTYPE} [nnzb, bh, bw], got {ops._desc(v)}"
        return (bsf.canonical_error(self._bsw(t)) or self._bias_error(t["bias"])
                or _checks.same_device_error(t))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # adopt the checkpoint's number of kept blocks and block shape -- after
        # validating it, so a refused checkpoint leaves the module as it was
        full = self._canonical()
        for name in full:
            if prefix + name in state_dict:
                full[name] = state_dict[prefix + name]
        if all(isinstance(t, Tensor) or t is None for t in full.values()):
            err = self._canonical_error(full)
            if err is not None:
                error_msgs.append(f"{type(self).__name__} ({prefix or 'root'}): {err}")
                return
        incoming = [state_dict.get(prefix + name) for name in ("values", "crow_indices", "col_indices")]
        before = (self.values, self.crow_indices, self.col_indices)
        n_errors = len(error_msgs)
        if all(isinstance(t, Tensor) for t in incoming) and any(
                t.shape != getattr(self, name).shape
                for t, name in zip(incoming, ("values", "crow_indices", "col_indices"))):
            dev = self.values.device
            self._set_blocks(*(torch.empty(t.shape, dtype=getattr(self, name).dtype, device=dev)
                               for t, name in zip(incoming, ("values", "crow_indices", "col_indices"))))
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            failed = len(error_msgs) > n_errors
        except Exception:
            failed = True
            raise
        finally:
            if failed:  # a copy that failed after the shapes were adopted: put the old blocks back
                self._set_blocks(*before)
                self._repack()

    def _pack(self) -> None:
        if self.values.device.type == "cpu" and _native.available():
            self._packed = bsf.pack_block_sparse(self._bsw())
            self._plan = self._make_plan("block_sparse", self._packed)

    def dense_weight(self) -> Tensor:
        """The dense weight, float32 [out_features, in_features] (exact)."""
        return bsf.decompress(self._bsw()).float()

    _dense_weight = dense_weight

    # ---- forward (PackedModule.forward) ---------------------------------------------
    def _native_rows(self, x: Tensor) -> Tensor:
        return bops.block_sparse_linear_cpu(x, self.values, self.crow_indices, self.col_indices, self.out_features,
                                            self.in_features, self.bias, self._packed)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.pyaccel.block_sparse_linear(x, self.values, self.crow_indices, self.col_indices,
                                                     self.out_features, self.in_features, bias, self._packed)

    def backend(self) -> str:
        """Where forward runs: cpu/<isa> (<kernel>), cpu/reference, cuda/triton, ..."""
        return self._backend_name(self.values.device, "bsr_kernel_name")

    def extra_repr(self) -> str:
        bh, bw = self.block
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={bh}x{bw}, density={self.density:.3f}, backend={self.backend()}")


class BlockSparseInt8Linear(BlockSparseLinear):
    """Block-sparse weights quantized to int8 (symmetric per output channel),
    activations quantized per row at run time (as Int8Linear), int32
    accumulation over the kept blocks only.

    Buffers (state_dict): values int8 [nnzb, bh, bw] in [-127, 127],
    crow_indices / col_indices int32 (BSR), weight_scale float32 [out], bias
    float32 [out] if any. ``weight``: read-only view of the dequantized dense
    weight. ``from_dense`` / ``from_float`` / ``from_bsr`` quantize (lossy).
    Raises ValueError naming the buffer for -128, non-finite scales or bad indices.
    """

    WEIGHT_NAMES = frozenset({"values", "crow_indices", "col_indices", "weight_scale", "bias"})
    _VALUES_DTYPE = torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block: Tuple[int, int] = DEFAULT_BLOCK, device=None) -> None:
        nn.Module.__init__(self)
        self._init_features(in_features, out_features, max_in=INT8_MAX_K)
        bh, bw = bsf.check_block(block)
        self.register_buffer("values", torch.zeros(0, bh, bw, dtype=torch.int8, device=device))
        self.register_buffer("crow_indices", torch.zeros(-(-out_features // bh) + 1, dtype=torch.int32,
                                                         device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_bias(bias, device)
        self._repack()

    @classmethod
    def from_weight(cls, bsw: bsf.BlockSparseWeight, bias: Optional[Tensor] = None,
                    weight_scale: Optional[Tensor] = None) -> "BlockSparseInt8Linear":
        """From a canonical BSR weight: float values (any dtype but int8) are
        quantized per output channel (lossy; ValueError naming `weight_scale`
        if one is given, as it would be ignored); int8 values are taken as
        they are, with `weight_scale`."""
        err = bsf.canonical_error(bsw)
        if err:
            raise ValueError(err)
        n, k = bsw.shape
        if bsw.values.dtype != torch.int8:
            if weight_scale is not None:
                dt = bsw.values.dtype
                what = f"{dt} blocks" + ("" if dt.is_floating_point else " (booleans, taken as 0 / 1)"
                                         if dt == torch.bool else " (complex: the real part is taken)"
                                         if dt.is_complex else " (an integer dtype, but not int8)")
                raise ValueError(f"weight_scale: given with {what}, which are quantized here with scales computed "
                                 "per output channel, so it would be ignored: pass int8 blocks with their "
                                 "weight_scale, or leave weight_scale out to quantize these")
            bsw, weight_scale = bsf.quantize_blocks(bsw)
        elif weight_scale is None:
            raise ValueError("weight_scale: int8 values need their per-channel scales: pass weight_scale= "
                             "(float32 [out], e.g. the source module's weight_scale)")
        elif (not isinstance(weight_scale, Tensor) or not weight_scale.is_floating_point()
              or tuple(weight_scale.shape) != (n,)):
            raise ValueError(f"weight_scale: expected a floating-point tensor of shape ({n},) (one scale per output "
                             f"channel), got {ops._desc(weight_scale)}")
        else:
            err = _checks.scale_error("weight_scale", weight_scale.detach().float())
            if err:
                raise ValueError(err)
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias: expected a tensor of shape ({n},) or None, got {ops._desc(bias)}")
        mod = cls(k, n, bias=bias is not None, block=bsw.block, device=bsw.values.device)
        mod._set_blocks(bsw.values.detach().clone(), bsw.crow_indices.clone(), bsw.col_indices.clone())
        with torch.no_grad():
            mod.weight_scale.copy_(weight_scale.float())
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        mod._repack_or_raise()
        return mod

    @classmethod
    def from_bsr(cls, weight: Tensor, bias: Optional[Tensor] = None, shape: Optional[Tuple[int, int]] = None,
                 weight_scale: Optional[Tensor] = None) -> "BlockSparseInt8Linear":
        """From a ``torch.sparse_bsr`` weight [out_pad, in_pad] (`shape`: the
        logical (out, in) when padded, two ints): floating-point blocks are
        quantized per output channel (lossy; a `weight_scale` given with them
        is refused, as it would be ignored); int8 blocks (``to_bsr()`` of this
        class) are taken as they are, with their `weight_scale` (float32
        [out]), so ``from_bsr(m.to_bsr(), m.bias, weight_scale=m.weight_scale)``
        gives the same layer back. ValueError naming the argument otherwise."""
        return cls.from_weight(_bsr_weight(weight, bias, shape), bias, weight_scale)

    def to_bsr(self) -> Tensor:
        """The weight as a ``torch.sparse_bsr`` tensor (padded shape) of int8
        blocks; the per-channel scales are ``weight_scale`` (dequantized:
        values * weight_scale[row])."""
        return bsf.to_torch_bsr(self._bsw())

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None,
                   block: Tuple[int, int] = DEFAULT_BLOCK) -> "BlockSparseInt8Linear":
        """Quantize a dense [out, in] weight with zero blocks (lossy): the blocks
        holding a non-zero are kept, int8 per output channel."""
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight: expected a 2-D floating-point tensor [out, in], got {ops._desc(weight)}")
        return cls.from_weight(bsf.compress(weight.detach().float(), block), bias)

    def _canonical_error(self, t):
        return (super()._canonical_error(t)
                or _checks.tensor_error("weight_scale", t["weight_scale"], torch.float32, (self.out_features,))
                or _checks.int8_values_error("values", t["values"])
                or _checks.scale_error("weight_scale", t["weight_scale"]))

    def _pack(self) -> None:
        if self.values.device.type == "cpu" and _native.available():
            self._packed = bsf.pack_block_sparse_int8(self._bsw())
            self._plan = self._make_plan("block_sparse_int8", self._packed, self.weight_scale)

    def dense_weight(self) -> Tensor:
        """The dequantized dense weight, float32 [out_features, in_features]."""
        return bsf.decompress(self._bsw()).float() * self.weight_scale[:, None]

    _dense_weight = dense_weight

    def _native_rows(self, x: Tensor) -> Tensor:
        return bops.block_sparse_int8_linear_cpu(x, self.values, self.crow_indices, self.col_indices,
                                                 self.out_features, self.in_features, self.weight_scale, self.bias,
                                                 self._packed)

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.pyaccel.block_sparse_int8_linear(x, self.values, self.crow_indices, self.col_indices,
                                                          self.out_features, self.in_features, self.weight_scale,
                                                          bias, self._packed)

    def backend(self) -> str:
        return self._backend_name(self.values.device, "bsr_int8_kernel_name")

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", backend=", ", dtype=int8, backend=")
