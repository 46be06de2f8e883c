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
  decompressed) for that one call, warning once per module class that the
  kernel does not run there; nothing is kept resident.

Being a tensor subclass (it has ``__torch_function__``), the view also turns
off fused paths that would read the dense weight behind the module's back:
TransformerEncoderLayer's inference fast path checks
``torch.overrides.has_torch_function`` over its weights and then calls
``linear1`` / ``linear2`` as modules, so pyaccel's kernels run.

The view is read-only: assigning ``module.weight`` raises AttributeError.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

_warned = set()


class DenseWeightView(Tensor):
    """The effective dense weight of a pyaccel Linear-kind module (float32
    ``[out_features, in_features]`` on the module's device), computed only
    when used. See the module docstring of ``pyaccel.nn._weight``."""

    _module = None

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

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, DenseWeightView) and not isinstance(x, DenseWeightView) \
                    and not isinstance(b, DenseWeightView):
                return w._module._linear(x, b)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)  # metadata reads return here; ops reach __torch_dispatch__

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            if isinstance(t, DenseWeightView):
                name = type(t._module).__name__
                if name not in _warned:
                    _warned.add(name)
                    warnings.warn(
                        f"{name}.weight was materialized as a dense float32 tensor for {func}: pyaccel's kernel "
                        "does not run for this computation (F.linear(x, module.weight, bias) does)",
                        UserWarning, stacklevel=3)
                return t.materialize()
            return t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
