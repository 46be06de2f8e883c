"""``module.weight`` of pyaccel's Linear-kind modules: the effective dense
weight, as a tensor that holds no data.

Code written for nn.Linear reads ``layer.weight`` -- for its shape, dtype or
device (Hugging Face models, torch.nn.TransformerEncoderLayer's own checks), or
to compute with it (``F.linear(x, layer.weight, layer.bias)``). A pyaccel
module stores its weight compressed (int8 + scales, 2:4 values + positions),
so ``weight`` returns a :class:`DenseWeightView`:

- metadata (shape ``[out_features, in_features]``, dtype float32, the module's
  device, ``requires_grad=False``) is read without computing anything;
- ``F.linear(x, view, bias)`` runs the module's own kernel (with that bias), so
  code that computes with the weight does not bypass pyaccel;
- any other computation materializes the dense weight (dequantized /
  decompressed) for that one call, warning once per module class (at the
  caller's line) that the kernel does not run there; nothing is kept
  resident. ``tolist()``, ``copy.deepcopy`` and pickling give the dense
  weight (a plain tensor); ``numpy()`` / ``numpy.asarray`` a read-only array.

Being a tensor subclass (it has ``__torch_function__``), the view also turns
off fused paths that would read the dense weight behind the module's back:
TransformerEncoderLayer's inference fast path checks
``torch.overrides.has_torch_function`` over its weights and then calls
``linear1`` / ``linear2`` as modules, so pyaccel's kernels run.

The view is read-only, since a write could not reach the packed buffers:
assigning ``module.weight`` raises AttributeError; an in-place op on it
(``copy_``, ``add_``, ``nn.init.*``, ``w[0] = ...``), an ``out=`` into it, a
write through ``.data`` / ``.detach()`` (which return the view again) or
through a view of it (``.t()``, ``w[0]``, ... return read-only tensors), and
``requires_grad_()`` raise RuntimeError naming the buffers to change instead.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

_warned = set()

# frames skipped when the materialization warning looks for the caller's line
_INTERNAL_PREFIXES = (os.path.dirname(torch.__file__) + os.sep, __file__, copy.__file__)


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel, from the caller of this function, of the
    first frame outside torch, this file and the copy module (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame, level = frame.f_back, level + 1
    return level


def _warn_materialized(module, what) -> None:
    name = type(module).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name}.weight was materialized as a dense float32 tensor for {what}: pyaccel's kernel "
                      "does not run for this computation (F.linear(x, module.weight, bias) does)",
                      UserWarning, stacklevel=_caller_stacklevel())


def _buffers_of(module) -> str:
    return " / ".join(sorted(module.WEIGHT_NAMES - {"bias"}))


def _read_only_error(module, what: str) -> RuntimeError:
    name, bufs = type(module).__name__, _buffers_of(module)
    return RuntimeError(
        f"{name}.weight is read-only: it is computed from the packed buffers ({bufs}) each time it is used, so "
        f"{what} would change nothing. To change the weights, build a new module ({name}.from_float(linear), "
        f"...) or assign / load_state_dict new {bufs}")


class _ReadOnlyWeight(Tensor):
    """What DenseWeightView and the views taken of it share: writes raise,
    other ops compute on the dense weight."""

    _module = None

    def _dense(self, what) -> Tensor:  # pragma: no cover - abstract
        """The values as a plain tensor, for `what` (never storage the module holds)."""
        raise NotImplementedError

    # ---- Tensor methods that do not reach __torch_dispatch__ ----------------------------
    def _tolist(self):
        return self._dense("Tensor.tolist").tolist()

    def _numpy(self, *, force=False):
        a = self._dense("Tensor.numpy").numpy(force=force)
        a.flags.writeable = False  # a write would not reach the module
        return a

    def __array__(self, dtype=None, copy=None):  # numpy.asarray / numpy.array (numpy passes copy=)
        a = self._dense("numpy.asarray").numpy()
        if copy:  # numpy.array: the caller's own copy
            return a.astype(dtype or a.dtype, copy=True)
        a = a if dtype is None else a.astype(dtype, copy=False)
        a.flags.writeable = False
        return a

    def _deepcopy(self, memo):
        out = memo[id(self)] = self._dense("copy.deepcopy").clone()
        return out

    def _reduce_ex(self, proto):
        return self._dense("pickling").clone().__reduce_ex__(proto)

    def _requires_grad_(self, requires_grad=True):
        if requires_grad:
            m = self._module
            raise RuntimeError(f"{type(m).__name__}.weight cannot require grad: it is computed from the packed "
                               f"buffers ({_buffers_of(m)}), which are frozen (gradients flow to the input only)")
        return self

    def _set_requires_grad(self, value):
        if value:
            self._requires_grad_(True)

    def _set_data(self, value):
        raise _read_only_error(self._module, "assigning .data")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if type(w) is DenseWeightView and not isinstance(x, _ReadOnlyWeight) \
                    and not isinstance(b, _ReadOnlyWeight):
                return w._module._linear(x, b)
        special = _SPECIAL.get(func)
        if special is not None and args and isinstance(args[0], _ReadOnlyWeight):
            return special(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)  # metadata reads return here; ops reach __torch_dispatch__

    @classmethod
    @torch.compiler.disable  # runs eagerly; dynamo would try to compile these frames one by one
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written, viewed = _aliasing(func)
        for i, name, kw_only in written:
            v = _arg(args, kwargs, i, name, kw_only)
            for t in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(t, _ReadOnlyWeight):
                    raise _read_only_error(t._module, f"an in-place or out= operation on it ({func})")
        src = _arg(args, kwargs, *viewed) if viewed is not None else None
        if not isinstance(src, _ReadOnlyWeight):
            src = None
        elif type(src) is DenseWeightView and func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return DenseWeightView(src._module, src.device)  # .detach(), .data: the view again, nothing computed

        def unwrap(t):
            return t._dense(func) if isinstance(t, _ReadOnlyWeight) else t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if src is None:
            return out
        # a view of the weight (t(), w[0], split, ...): read-only like the weight itself
        return tree_map(lambda t: _DenseWeightAlias(t, src._module) if isinstance(t, Tensor) else t, out)


_SPECIAL = {
    Tensor.tolist: _ReadOnlyWeight._tolist,
    Tensor.numpy: _ReadOnlyWeight._numpy,
    Tensor.__deepcopy__: _ReadOnlyWeight._deepcopy,
    Tensor.__reduce_ex__: _ReadOnlyWeight._reduce_ex,
    Tensor.requires_grad_: _ReadOnlyWeight._requires_grad_,
    Tensor.requires_grad.__set__: _ReadOnlyWeight._set_requires_grad,
    Tensor.data.__set__: _ReadOnlyWeight._set_data,
}


@functools.lru_cache(maxsize=None)
def _aliasing(func):
    """(the arguments `func` writes, the argument its outputs are views of or
    None), each as (position, name, keyword-only), from its schema."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return (), None
    written = tuple((i, a.name, a.kwarg_only) for i, a in enumerate(schema.arguments)
                    if a.alias_info is not None and a.alias_info.is_write)
    viewed = None
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        viewed = next(((i, a.name, a.kwarg_only) for i, a in enumerate(schema.arguments)
                       if a.alias_info is not None and not a.alias_info.is_write), None)
    return written, viewed


def _arg(args, kwargs, i, name, kw_only):
    return args[i] if not kw_only and i < len(args) else kwargs.get(name)


class DenseWeightView(_ReadOnlyWeight):
    """The effective dense weight of a pyaccel Linear-kind module (float32
    ``[out_features, in_features]`` on the module's device), computed only
    when used; read-only. See the module docstring of ``pyaccel.nn._weight``."""

    @staticmethod
    def __new__(cls, module, device):
        v = Tensor._make_wrapper_subclass(cls, (module.out_features, module.in_features), dtype=torch.float32,
                                          device=device, requires_grad=False)
        v._module = module
        return v

    def __init__(self, module, device):  # the work is done in __new__
        super().__init__()

    def __repr__(self, *, tensor_contents=None):
        m = self._module
        return (f"DenseWeightView(of {type(m).__name__}, shape=({m.out_features}, {m.in_features}), "
                f"dtype=torch.float32, device={self.device})")

    def materialize(self) -> Tensor:
        """The dense weight as a plain float32 tensor (a fresh copy)."""
        return self._module._dense_weight()

    def _dense(self, what) -> Tensor:
        _warn_materialized(self._module, what)
        return self.materialize()


class _DenseWeightAlias(_ReadOnlyWeight):
    """A view (``t()``, indexing, ``split``, ...) of a DenseWeightView: the
    materialized values, read-only as the weight is."""

    @staticmethod
    def __new__(cls, elem: Tensor, module):
        v = Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                          storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                          device=elem.device, requires_grad=False)
        v._elem, v._module = elem, module
        return v

    def __init__(self, elem, module):  # the work is done in __new__
        super().__init__()

    def __repr__(self, *, tensor_contents=None):
        return f"{self._elem!r} (a read-only view of {type(self._module).__name__}.weight)"

    def materialize(self) -> Tensor:
        """The values as a plain tensor (a fresh copy)."""
        return self._elem.clone()

    def _dense(self, what) -> Tensor:
        return self._elem
