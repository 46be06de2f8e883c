"""pyaccel ops, registered with ``torch.library``.

Each op has a schema, a fake (meta) implementation for tracing/compiling, a
CPU kernel (pyaccel._C), a CUDA kernel (Triton, kernels/) and the pure-PyTorch
reference (pyaccel.reference) for every other device or when the native library
is missing. All of them validate their arguments the same way and raise
ValueError/TypeError naming the argument, what was expected and what came.

``packed`` arguments: the native packing of the canonical weight passed with
it (what the modules keep in step with their buffers). The CPU ops read its
header (and, where the op says so, its index tables) and raise ValueError
``packed: ...`` for a packing of another shape or format, or a truncated one;
its weight values are not compared with the canonical tensors, so a packing of
other weights of the same shape gives that packing's result.

Calling a Python-defined torch.library op costs ~10 µs, so inference modules
call :func:`int8_linear_cpu` directly in eager mode and go through
``torch.ops.pyaccel.*`` only when tracing or compiling.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyaccel import _native, reference
from pyaccel.formats._checks import require_int8_values, require_sparse24_format
from pyaccel.formats.int8 import pack_int8_weight

_FLOAT_IO = (torch.float32, torch.bfloat16)


def _desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_packed_device(packed, x, name: str = "packed") -> None:
    """ValueError unless a packing (host bytes) is on the CPU -- or on the meta
    device with a meta x (tracing). A meta packing with a CPU x sent the call to
    the fake kernel, which returned uninitialized memory."""
    if packed is None or not isinstance(packed, Tensor) or packed.device.type == "cpu":
        return
    if packed.device.type == "meta" and isinstance(x, Tensor) and x.device.type == "meta":
        return
    raise ValueError(f"{name}: expected a CPU tensor (the packing's bytes), got {_desc(packed)}")


def check_act_bits(act_bits) -> None:
    """ValueError unless act_bits is the integer 8 (activations in [-127, 127])
    or 7 ([-63, 63]): Python or NumPy ints; a bool, a float such as 7.0 or a
    string is refused. Callers store int(act_bits)."""
    if (not isinstance(act_bits, numbers.Integral) or isinstance(act_bits, bool)
            or int(act_bits) not in reference.ACT_QMAX):
        raise ValueError(f"act_bits: expected the integer 8 or 7, got {act_bits!r}")


def check_int8_linear_args(x, w_int8, w_scale, bias, packed=None, act_bits=8) -> None:
    """Raise TypeError/ValueError naming the bad argument of int8_linear."""
    check_act_bits(act_bits)
    for name, t in (("x", x), ("w_int8", w_int8), ("w_scale", w_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    require_strided(x)
    if x.dtype not in _FLOAT_IO:
        raise TypeError(f"x: expected float32 or bfloat16, got {_desc(x)}")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"w_int8: expected a 2-D int8 tensor [N, K], got {_desc(w_int8)}")
    n, k = w_int8.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension K={k} (w_int8 is [{n}, {k}]), got {_desc(x)}")
    if k > reference.INT8_MAX_K:
        raise ValueError(f"w_int8: K={k} exceeds {reference.INT8_MAX_K}, past which int32 accumulators "
                         "could overflow")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale: expected float32 of shape ({n},), got {_desc(w_scale)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != torch.float32 or tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected float32 of shape ({n},), got {_desc(bias)}")
    for name, t in (("w_int8", w_int8), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{name}: expected a tensor on x's device {x.device}, got {_desc(t)} "
                f"(move the module with .to({str(x.device)!r}))"
            )
    if packed is not None and (packed.dtype != torch.uint8 or packed.dim() != 1):
        raise TypeError(f"packed: expected a 1-D uint8 tensor from pack_int8_weight, got {_desc(packed)}")
    check_packed_device(packed, x)


def require_tensor(x, name: str = "x") -> None:
    """TypeError naming the argument (the dispatcher's own message is a RuntimeError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def require_strided(x, name: str = "x") -> None:
    """TypeError naming the argument for a sparse (COO, CSR, ...) input: the
    kernels read dense rows (torch's own message is about reshape or strides)."""
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a {x.layout} {_desc(x)} "
                        "(convert it with .to_dense())")


def _as_rows(x: Tensor, k: int) -> Tensor:
    """x as a [M, K] view with unit stride along K (copies only when it must)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    if x2.shape[0] > 1 and (x2.stride(1) != 1 or x2.stride(0) < k):
        x2 = x2.contiguous()
    elif x2.stride(1) != 1 and k > 1:
        x2 = x2.contiguous()
    return x2


def _on_rows(x: Tensor, k: int, n: int, kernel) -> Tensor:
    """Run kernel(x2, m, bf16, y) over x as [M, K] rows into a fresh [M, N]
    output of x's dtype (skipped for M = 0); return it as [..., N]."""
    x2 = _as_rows(x, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        kernel(x2, m, x.dtype == torch.bfloat16, y)
    return y.view(*x.shape[:-1], n)


def _native_linear(kind: str, x: Tensor, k: int, n: int, packed: Tensor, w_scale: Optional[Tensor],
                   bias: Optional[Tensor]) -> Tensor:
    """The native kernel of `kind` over x's rows (one validated LinearPlan call).
    The contiguous copies of w_scale / bias stay referenced until the call ends."""
    if n == 0:  # no output channels (an empty w_scale has no data pointer for the plan)
        return x.new_empty((*x.shape[:-1], 0))
    C = _native.lib()
    ws = w_scale.contiguous() if w_scale is not None else None
    b = bias.contiguous() if bias is not None else None
    return _on_rows(x, k, n, lambda x2, m, bf16, y: C.linear(
        kind, x2.data_ptr(), x2.stride(0), bf16, m, k, packed.data_ptr(), packed.numel(), n,
        0 if ws is None else ws.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), torch.get_num_threads()))


def int8_linear_cpu(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    packed: Optional[Tensor], act_bits: int = 8) -> Tensor:
    """The native CPU int8 linear (arguments already checked). Falls back to the
    reference when the native library is missing, which refuses -128 in w_int8
    as the native packer does (ValueError naming w_int8)."""
    C = _native.lib()
    if C is None:
        require_int8_values("w_int8", w_int8)
        return reference.int8_linear(x, w_int8, w_scale, bias, reference.ACT_QMAX[act_bits])
    if packed is None:
        packed = pack_int8_weight(w_int8, name="w_int8", act_bits=act_bits)
    n, k = w_int8.shape
    return _native_linear("int8_a7" if act_bits == 7 else "int8", x, k, n, packed, w_scale, bias)


def _int8_linear_cuda(x, w_int8, w_scale, bias, act_bits=8):
    try:
        from pyaccel.kernels import int8_gemm as tk
    except ImportError as exc:  # no triton
        raise ValueError(f"x: a CUDA tensor needs pyaccel's Triton kernels, which cannot load here ({exc})") from exc
    n, k = w_int8.shape
    x2 = _as_rows(x, k)
    y = tk.int8_linear(x2, w_int8.contiguous(), w_scale.contiguous(),
                       None if bias is None else bias.contiguous(), out_dtype=x.dtype,
                       qmax=reference.ACT_QMAX[act_bits])
    return y.view(*x.shape[:-1], n)


# ---- pyaccel::quantize_per_row ------------------------------------------------
@torch.library.custom_op("pyaccel::quantize_per_row", mutates_args=())
def quantize_per_row(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 quantization per row: (q int8 [..., K], scale fp32 [...])."""
    _check_quant_arg(x)
    return reference.quantize_per_row(x)


def _check_quant_arg(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    require_strided(x)
    if x.dtype not in _FLOAT_IO or x.dim() < 1:
        raise TypeError(f"x: expected a float32 or bfloat16 tensor with >= 1 dim, got {_desc(x)}")


@quantize_per_row.register_kernel("cpu")
def _quantize_per_row_cpu(x: Tensor) -> Tuple[Tensor, Tensor]:
    _check_quant_arg(x)
    C = _native.lib()
    if C is None:
        return reference.quantize_per_row(x)
    k = x.shape[-1]
    x2 = _as_rows(x, k)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty((m,), dtype=torch.float32)
    if m and k:
        C.quantize_rows(x2.data_ptr(), x2.stride(0), x.dtype == torch.bfloat16, m, k,
                        q.data_ptr(), k, s.data_ptr(), torch.get_num_threads())
    elif m:
        s.zero_()
    return q.view(x.shape), s.view(x.shape[:-1])


@quantize_per_row.register_kernel("cuda")
def _quantize_per_row_cuda(x: Tensor) -> Tuple[Tensor, Tensor]:
    _check_quant_arg(x)
    from pyaccel.kernels import int8_gemm as tk

    k = x.shape[-1]
    q, s = tk.quantize_per_row(_as_rows(x, k))
    return q.view(x.shape), s.view(x.shape[:-1])


@quantize_per_row.register_fake
def _quantize_per_row_fake(x: Tensor) -> Tuple[Tensor, Tensor]:
    _check_quant_arg(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---- pyaccel::int8_linear -----------------------------------------------------
@torch.library.custom_op("pyaccel::int8_linear", mutates_args=())
def int8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                packed: Optional[Tensor], act_bits: int = 8) -> Tensor:
    """y = dequant(quantize_per_row(x) @ w_int8.T) + bias, in x's dtype.

    x: [..., K] float32/bfloat16; w_int8: [N, K] int8 in [-127, 127];
    w_scale: [N] float32; bias: [N] float32 or None; packed: the CPU packing of
    w_int8 (pack_int8_weight, which refuses -128) or None (CPU packs per call
    then: slow, and ValueError when w_int8 holds -128);
    act_bits: 8 (activations in [-127, 127]) or 7 (the opt-in mode, [-63, 63];
    see Int8Linear). ValueError for any other act_bits.
    """
    check_int8_linear_args(x, w_int8, w_scale, bias, packed, act_bits)
    return reference.int8_linear(x, w_int8, w_scale, bias, reference.ACT_QMAX[act_bits])


@int8_linear.register_kernel("cpu")
def _int8_linear_cpu_op(x, w_int8, w_scale, bias, packed, act_bits=8):
    check_int8_linear_args(x, w_int8, w_scale, bias, packed, act_bits)
    return int8_linear_cpu(x, w_int8, w_scale, bias, packed, act_bits)


@int8_linear.register_kernel("cuda")
def _int8_linear_cuda_op(x, w_int8, w_scale, bias, packed, act_bits=8):
    check_int8_linear_args(x, w_int8, w_scale, bias, packed, act_bits)
    return _int8_linear_cuda(x, w_int8, w_scale, bias, act_bits)


@int8_linear.register_fake
def _int8_linear_fake(x, w_int8, w_scale, bias, packed, act_bits=8):
    check_int8_linear_args(x, w_int8, w_scale, bias, packed, act_bits)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


# ---- pyaccel::sparse24_linear -----------------------------------------------------
def check_sparse24_args(x, values, meta, k, bias, packed=None, values_dtype=torch.float32) -> None:
    """Raise TypeError/ValueError naming the bad argument of sparse24_linear
    (and, with values_dtype=torch.int8, of sparse24_int8_linear)."""
    for name, t in (("x", x), ("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    require_strided(x)
    if x.dtype not in _FLOAT_IO:
        raise TypeError(f"x: expected float32 or bfloat16, got {_desc(x)}")
    groups = (k + 3) // 4
    if values.dtype != values_dtype:
        raise TypeError(f"values: expected a {values_dtype} tensor, got {_desc(values)}")
    if values.dim() != 2 or values.shape[1] != 2 * groups:
        raise ValueError(f"values: expected {values_dtype} [N, {2 * groups}] for k={k}, got {_desc(values)}")
    n = values.shape[0]
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, (groups + 1) // 2):
        raise ValueError(f"meta: expected uint8 of shape ({n}, {(groups + 1) // 2}), got {_desc(meta)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension K={k}, got {_desc(x)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias: expected float32 of shape ({n},), got {_desc(bias)}")
    for name, t in (("values", values), ("meta", meta), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {_desc(t)}")
    if packed is not None and (packed.dtype != torch.uint8 or packed.dim() != 1):
        raise TypeError(f"packed: expected a 1-D uint8 tensor from pack_sparse24, got {_desc(packed)}")
    check_packed_device(packed, x)


def sparse24_linear_cpu(x: Tensor, values: Tensor, meta: Tensor, k: int, bias: Optional[Tensor],
                        packed: Optional[Tensor]) -> Tensor:
    """The native CPU 2:4 linear (arguments already checked)."""
    from pyaccel.formats.sparse24 import Sparse24Weight, pack_sparse24

    C = _native.lib()
    if C is None:
        require_sparse24_format(values, meta, k)  # (pack_sparse24 checks the same)
        return reference.sparse24_linear(x, values, meta, k, bias)
    if packed is None:
        packed = pack_sparse24(Sparse24Weight(values, meta, k))
    return _native_linear("sparse24", x, k, values.shape[0], packed, None, bias)


@torch.library.custom_op("pyaccel::sparse24_linear", mutates_args=())
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, k: int, bias: Optional[Tensor],
                    packed: Optional[Tensor]) -> Tensor:
    """y = x @ W.T + bias, W 2:4-sparse in canonical form (values fp32 [N, 2G],
    meta uint8 [N, ceil(G/2)], G = ceil(k/4)); output in x's dtype. packed:
    pack_sparse24's buffer of these values and meta (trusted), or None: then
    the CPU op packs and raises ValueError when a group of meta lacks two
    distinct positions or values holds a non-zero weight past k (CUDA and the
    fake kernel check shapes only: no device sync, no data-dependent guard)."""
    check_sparse24_args(x, values, meta, k, bias, packed)
    return reference.sparse24_linear(x, values, meta, k, bias)


@sparse24_linear.register_kernel("cpu")
def _sparse24_linear_cpu_op(x, values, meta, k, bias, packed):
    check_sparse24_args(x, values, meta, k, bias, packed)
    return sparse24_linear_cpu(x, values, meta, k, bias, packed)


@sparse24_linear.register_kernel("cuda")
def _sparse24_linear_cuda_op(x, values, meta, k, bias, packed):
    check_sparse24_args(x, values, meta, k, bias, packed)
    x2 = _as_rows(x, k)
    y = _triton_sparse24().sparse24_linear(x2, values.contiguous(), meta.contiguous(), k,
                                           None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], values.shape[0])


def _triton_sparse24():
    try:
        from pyaccel.kernels import sparse24 as tk
    except ImportError as exc:
        raise ValueError(f"x: a CUDA tensor needs pyaccel's Triton kernels, which cannot load here ({exc})") from exc
    return tk


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, values, meta, k, bias, packed):
    check_sparse24_args(x, values, meta, k, bias, packed)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# ---- pyaccel::sparse24_int8_linear --------------------------------------------------
def check_sparse24_int8_args(x, values, meta, k, w_scale, bias, packed=None) -> None:
    check_sparse24_args(x, values, meta, k, bias, packed, values_dtype=torch.int8)
    if k > reference.INT8_MAX_K:
        raise ValueError(f"k: {k} exceeds {reference.INT8_MAX_K}, past which int32 accumulators could overflow")
    n = values.shape[0]
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale: expected float32 of shape ({n},), got {_desc(w_scale)}")
    if w_scale.device != x.device:
        raise ValueError(f"w_scale: expected a tensor on x's device {x.device}, got {_desc(w_scale)}")


def sparse24_int8_linear_cpu(x, values, meta, k, w_scale, bias, packed):
    from pyaccel.formats.sparse24 import pack_sparse24_int8

    C = _native.lib()
    if C is None:
        require_sparse24_format(values, meta, k)  # (pack_sparse24_int8 checks the same)
        return reference.sparse24_int8_linear(x, values, meta, k, w_scale, bias)
    if packed is None:
        packed = pack_sparse24_int8(values, meta, k)
    return _native_linear("sparse24_int8", x, k, values.shape[0], packed, w_scale, bias)


@torch.library.custom_op("pyaccel::sparse24_int8_linear", mutates_args=())
def sparse24_int8_linear(x: Tensor, values: Tensor, meta: Tensor, k: int, w_scale: Tensor,
                         bias: Optional[Tensor], packed: Optional[Tensor]) -> Tensor:
    """int8 linear (per-row dynamic activations) with a 2:4 int8 weight:
    values int8 [N, 2G] in [-127, 127], meta uint8 [N, ceil(G/2)], w_scale
    fp32 [N]; packed: pack_sparse24_int8's buffer of these values and meta
    (trusted), or None: then the CPU op packs and raises ValueError when values
    holds -128 or a non-zero weight past k, or a group of meta lacks two
    distinct positions (CUDA and the fake kernel check shapes only)."""
    check_sparse24_int8_args(x, values, meta, k, w_scale, bias, packed)
    return reference.sparse24_int8_linear(x, values, meta, k, w_scale, bias)


@sparse24_int8_linear.register_kernel("cpu")
def _sparse24_int8_linear_cpu_op(x, values, meta, k, w_scale, bias, packed):
    check_sparse24_int8_args(x, values, meta, k, w_scale, bias, packed)
    return sparse24_int8_linear_cpu(x, values, meta, k, w_scale, bias, packed)


@sparse24_int8_linear.register_kernel("cuda")
def _sparse24_int8_linear_cuda_op(x, values, meta, k, w_scale, bias, packed):
    check_sparse24_int8_args(x, values, meta, k, w_scale, bias, packed)
    x2 = _as_rows(x, k)
    y = _triton_sparse24().sparse24_int8_linear(x2, values.contiguous(), meta.contiguous(), k,
                                                w_scale.contiguous(), None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], values.shape[0])


@sparse24_int8_linear.register_fake
def _sparse24_int8_linear_fake(x, values, meta, k, w_scale, bias, packed):
    check_sparse24_int8_args(x, values, meta, k, w_scale, bias, packed)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# ---- autograd: gradients to x through the effective dense weight ---------------------
# The weights are frozen (canonical buffers); the quantization of activations is
# treated as the identity (straight-through), so every linear op's backward is
# grad_x = grad_y @ W_eff, W_eff the dense weight the op computes with.
def _grad_x(grad_y: Tensor, w_eff: Tensor, x_dtype: torch.dtype) -> Tensor:
    return (grad_y.to(w_eff.dtype) @ w_eff).to(x_dtype)


def _setup_linear_ctx(ctx, inputs, output) -> None:
    ctx.x_dtype = inputs[0].dtype
    ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs[1:]])
    ctx.k = next((v for v in inputs[1:] if isinstance(v, int)), None)


def _int8_linear_backward(ctx, grad_y):
    w_int8, w_scale = ctx.saved_tensors[0], ctx.saved_tensors[1]
    w = w_int8.float() * w_scale.float()[:, None]
    return _grad_x(grad_y, w, ctx.x_dtype), None, None, None, None, None


def _sparse24_dense(values, meta, k) -> Tensor:
    from pyaccel.formats.sparse24 import Sparse24Weight, decompress

    return decompress(Sparse24Weight(values, meta, k)).float()


def _sparse24_linear_backward(ctx, grad_y):
    values, meta = ctx.saved_tensors[0], ctx.saved_tensors[1]
    return _grad_x(grad_y, _sparse24_dense(values, meta, ctx.k), ctx.x_dtype), None, None, None, None, None


def _sparse24_int8_linear_backward(ctx, grad_y):
    values, meta, _, w_scale = ctx.saved_tensors[:4]
    w = _sparse24_dense(values, meta, ctx.k) * w_scale.float()[:, None]
    return _grad_x(grad_y, w, ctx.x_dtype), None, None, None, None, None, None


torch.library.register_autograd("pyaccel::int8_linear", _int8_linear_backward, setup_context=_setup_linear_ctx)
torch.library.register_autograd("pyaccel::sparse24_linear", _sparse24_linear_backward,
                                setup_context=_setup_linear_ctx)
torch.library.register_autograd("pyaccel::sparse24_int8_linear", _sparse24_int8_linear_backward,
                                setup_context=_setup_linear_ctx)
