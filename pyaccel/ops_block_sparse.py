"""Block-sparse (BSR) ops, registered with ``torch.library`` (the block-sparse
family's half of :mod:`pyaccel.ops`): schema, argument checks naming the
argument, CPU kernels (pyaccel._C), CUDA kernels (Triton, kernels/block_sparse.py),
fake implementations and autograd to x.

Weights are in the canonical BSR form of :mod:`pyaccel.formats.block_sparse`:
values [nnzb, bh, bw], int32 crow_indices [ceil(n/bh) + 1] and col_indices [nnzb].

``packed`` (optional) is the native packing of that weight (pack_block_sparse /
pack_block_sparse_int8). With the native library loaded, every CPU call
reads its header and block pattern (row pointers and column entries,
O(nbr + nnzb)): a packing of another shape, block shape, number of kept
blocks, block pattern or value dtype, or a truncated one, raises ValueError
``packed: ...`` saying what the call expected and what the buffer holds. The
values are not compared: a packing of another weight with the same block
pattern goes undetected. Without the native library the CPU kernel is the
reference, which ignores ``packed``. The packings do not depend on the ISA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyaccel import _native, reference
from pyaccel.formats._checks import require_int8_values
from pyaccel.ops import _as_rows, _desc, _FLOAT_IO, _grad_x, _native_linear, check_packed_device, require_strided


def check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed=None,
                            values_dtype=torch.float32, w_scale=None) -> None:
    """Raise TypeError/ValueError naming the bad argument of block_sparse_linear
    (and, with values_dtype=torch.int8, of block_sparse_int8_linear). Index
    ranges and order are checked when a module is built or loaded, not per call."""
    for name, t in (("x", x), ("values", values), ("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    require_strided(x)
    if x.dtype not in _FLOAT_IO:
        raise TypeError(f"x: expected float32 or bfloat16, got {_desc(x)}")
    if values.dtype != values_dtype or values.dim() != 3:
        raise TypeError(f"values: expected a 3-D {values_dtype} tensor [nnzb, bh, bw], got {_desc(values)}")
    if n < 1 or k < 1:
        raise ValueError(f"n, k: expected >= 1, got {n}, {k}")
    if values.shape[1] < 1 or values.shape[2] < 1:
        raise ValueError(f"values: blocks must be at least 1 x 1, got {_desc(values)}")
    bh = values.shape[1]
    nbr = -(-n // bh)
    if crow_indices.dtype != torch.int32 or tuple(crow_indices.shape) != (nbr + 1,):
        raise ValueError(f"crow_indices: expected int32 of shape ({nbr + 1},), got {_desc(crow_indices)}")
    if col_indices.dtype != torch.int32 or tuple(col_indices.shape) != (values.shape[0],):
        raise ValueError(f"col_indices: expected int32 of shape ({values.shape[0]},), got {_desc(col_indices)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension K={k}, got {_desc(x)}")
    if values_dtype == torch.int8:
        if k > reference.INT8_MAX_K:
            raise ValueError(f"k: {k} exceeds {reference.INT8_MAX_K}, past which int32 accumulators could overflow")
        if not isinstance(w_scale, Tensor) or w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
            raise ValueError(f"w_scale: expected float32 of shape ({n},), got {_desc(w_scale)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias: expected float32 of shape ({n},), got {_desc(bias)}")
    for name, t in (("values", values), ("crow_indices", crow_indices), ("col_indices", col_indices),
                    ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {_desc(t)}")
    if packed is not None and (packed.dtype != torch.uint8 or packed.dim() != 1):
        packer = "pack_block_sparse_int8" if values_dtype == torch.int8 else "pack_block_sparse"
        raise TypeError(f"packed: expected a 1-D uint8 tensor from {packer}, got {_desc(packed)}")
    check_packed_device(packed, x)


def check_bsr_packing(check, packed: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, n: int,
                      k: int) -> None:
    """ValueError ``packed: ...`` unless `packed` is a packing (the format of
    `check`: _C.bsr_check_packed or _C.bsr_int8_check_packed) of an [n, k]
    weight with values' block shape and number of kept blocks, in the block
    pattern crow_indices / col_indices (header, row pointers and column
    entries: O(nbr + nnzb); the values are not compared)."""
    if not packed.is_cpu or not packed.is_contiguous():
        raise ValueError(f"packed: expected a contiguous CPU tensor (the packing's bytes), got {_desc(packed)}")
    nnzb, bh, bw = values.shape
    crow, col = crow_indices.contiguous(), col_indices.contiguous()
    err = check(packed.data_ptr(), packed.numel(), n, k, bh, bw, nnzb, crow.data_ptr(), col.data_ptr())
    if err:
        raise ValueError(f"packed: {err}")


def check_reference_indices(values: Tensor, crow_indices: Tensor, col_indices: Tensor, n: int, k: int) -> None:
    """ValueError naming crow_indices / col_indices where the native packer
    refuses them (a row pointer that does not start at 0, end at nnzb or
    increase; a column out of range, unsorted or repeated within a block row),
    for the reference CPU path, which would otherwise compute with them (a
    repeated column counts its blocks twice). O(nbr + nnzb)."""
    from pyaccel.formats.block_sparse import BlockSparseWeight, canonical_error

    # values as a meta tensor: the index checks only (the native path, too,
    # ignores non-zero weights past n / k in the last block row / column)
    err = canonical_error(BlockSparseWeight(values.to("meta"), crow_indices, col_indices, (n, k)))
    if err:
        raise ValueError(err)


def block_sparse_linear_cpu(x, values, crow_indices, col_indices, n, k, bias, packed):
    """The native CPU BSR linear (arguments already checked; `packed` here)."""
    from pyaccel.formats.block_sparse import BlockSparseWeight, pack_block_sparse

    C = _native.lib()
    if C is None:
        check_reference_indices(values, crow_indices, col_indices, n, k)
        return reference.block_sparse_linear(x, values, crow_indices, col_indices, n, k, bias)
    if packed is None:
        packed = pack_block_sparse(BlockSparseWeight(values, crow_indices, col_indices, (n, k)))
    else:
        check_bsr_packing(C.bsr_check_packed, packed, values, crow_indices, col_indices, n, k)
    return _native_linear("block_sparse", x, k, n, packed, None, bias)


def _triton():
    try:
        from pyaccel.kernels import block_sparse as tk
    except ImportError as exc:
        raise ValueError(f"x: a CUDA tensor needs pyaccel's Triton kernels, which cannot load here ({exc})") from exc
    return tk


@torch.library.custom_op("pyaccel::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, n: int, k: int,
                        bias: Optional[Tensor], packed: Optional[Tensor]) -> Tensor:
    """y = x @ W.T + bias, W [n, k] block-sparse in canonical BSR form (values
    fp32 [nnzb, bh, bw]); x [..., k] fp32/bf16, output in x's dtype.
    TypeError/ValueError naming the bad argument; on the CPU, ValueError
    ``packed: ...`` when `packed` is not the fp32 packing of an [n, k] weight
    of nnzb bh x bw blocks in this block pattern (or is truncated); the
    packing's values are not compared with `values`."""
    check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed)
    return reference.block_sparse_linear(x, values, crow_indices, col_indices, n, k, bias)


@block_sparse_linear.register_kernel("cpu")
def _block_sparse_linear_cpu_op(x, values, crow_indices, col_indices, n, k, bias, packed):
    check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed)
    return block_sparse_linear_cpu(x, values, crow_indices, col_indices, n, k, bias, packed)


@block_sparse_linear.register_kernel("cuda")
def _block_sparse_linear_cuda_op(x, values, crow_indices, col_indices, n, k, bias, packed):
    check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed)
    y = _triton().block_sparse_linear(_as_rows(x, k), values.contiguous(), crow_indices.contiguous(),
                                      col_indices.contiguous(), n, k, None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], n)


@block_sparse_linear.register_fake
def _block_sparse_linear_fake(x, values, crow_indices, col_indices, n, k, bias, packed):
    check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed)
    return x.new_empty((*x.shape[:-1], n))


def _dense(values, crow_indices, col_indices, n, k) -> Tensor:
    from pyaccel.formats.block_sparse import BlockSparseWeight, decompress

    return decompress(BlockSparseWeight(values, crow_indices, col_indices, (n, k))).float()


def _setup_ctx(ctx, inputs, output) -> None:
    x, values, crow, col, n, k = inputs[:6]
    ctx.x_dtype, ctx.n, ctx.k = x.dtype, n, k
    ctx.save_for_backward(values, crow, col, inputs[6] if len(inputs) == 9 else None)


def _backward(ctx, grad_y):
    values, crow, col, w_scale = ctx.saved_tensors
    w = _dense(values, crow, col, ctx.n, ctx.k)
    if w_scale is not None:
        w = w * w_scale.float()[:, None]
    return (_grad_x(grad_y, w, ctx.x_dtype),) + (None,) * (7 if w_scale is None else 8)


torch.library.register_autograd("pyaccel::block_sparse_linear", _backward, setup_context=_setup_ctx)


# ---- pyaccel::block_sparse_int8_linear --------------------------------------------------
def check_block_sparse_int8_args(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed=None) -> None:
    check_block_sparse_args(x, values, crow_indices, col_indices, n, k, bias, packed, values_dtype=torch.int8,
                            w_scale=w_scale)


def block_sparse_int8_linear_cpu(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed):
    """The native CPU BSR int8 linear (arguments already checked; `packed` here)."""
    from pyaccel.formats.block_sparse import BlockSparseWeight, pack_block_sparse_int8

    C = _native.lib()
    if C is None:
        check_reference_indices(values, crow_indices, col_indices, n, k)
        require_int8_values("values", values)
        return reference.block_sparse_int8_linear(x, values, crow_indices, col_indices, n, k, w_scale, bias)
    if packed is None:
        packed = pack_block_sparse_int8(BlockSparseWeight(values, crow_indices, col_indices, (n, k)))
    else:
        check_bsr_packing(C.bsr_int8_check_packed, packed, values, crow_indices, col_indices, n, k)
    return _native_linear("block_sparse_int8", x, k, n, packed, w_scale, bias)


@torch.library.custom_op("pyaccel::block_sparse_int8_linear", mutates_args=())
def block_sparse_int8_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, n: int, k: int,
                             w_scale: Tensor, bias: Optional[Tensor], packed: Optional[Tensor]) -> Tensor:
    """int8 linear (activations quantized per row at run time) with a
    block-sparse int8 weight: values int8 [nnzb, bh, bw] in [-127, 127],
    w_scale fp32 [n]; x [..., k] fp32/bf16, output in x's dtype.
    TypeError/ValueError naming the bad argument; on the CPU, ValueError
    ``packed: ...`` when `packed` is not the int8 packing of an [n, k] weight
    of nnzb bh x bw blocks in this block pattern (or is truncated); the
    packing's values are not compared with `values`."""
    check_block_sparse_int8_args(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed)
    return reference.block_sparse_int8_linear(x, values, crow_indices, col_indices, n, k, w_scale, bias)


@block_sparse_int8_linear.register_kernel("cpu")
def _block_sparse_int8_linear_cpu_op(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed):
    check_block_sparse_int8_args(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed)
    return block_sparse_int8_linear_cpu(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed)


@block_sparse_int8_linear.register_kernel("cuda")
def _block_sparse_int8_linear_cuda_op(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed):
    check_block_sparse_int8_args(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed)
    y = _triton().block_sparse_int8_linear(_as_rows(x, k), values.contiguous(), crow_indices.contiguous(),
                                           col_indices.contiguous(), n, k, w_scale.contiguous(),
                                           None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], n)


@block_sparse_int8_linear.register_fake
def _block_sparse_int8_linear_fake(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed):
    check_block_sparse_int8_args(x, values, crow_indices, col_indices, n, k, w_scale, bias, packed)
    return x.new_empty((*x.shape[:-1], n))


torch.library.register_autograd("pyaccel::block_sparse_int8_linear", _backward, setup_context=_setup_ctx)
