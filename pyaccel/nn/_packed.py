"""Base class of pyaccel's inference modules that keep a packed copy of their
weights for the native CPU kernels.

The packed copy (and any native call plan) is derived state: rebuilt by
``_repack()`` whenever the canonical weights change place or value through
the module API — construction, ``load_state_dict``, ``.to()``/``.cpu()``,
deepcopy, unpickling, or assigning one of ``WEIGHT_NAMES`` — and never saved.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

_is_compiling = torch.compiler.is_compiling
_get_default_dtype = torch.get_default_dtype
_get_num_threads = torch.get_num_threads
_F32, _BF16 = torch.float32, torch.bfloat16
_FLOAT_IO = (_F32, _BF16)

# The hook registries nn.Module._call_impl consults (dicts mutated in place).
_GLOBAL_HOOKS = tuple(getattr(_module_mod, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_always_called") if hasattr(_module_mod, name))


_GH = _GLOBAL_HOOKS + ({},) * (5 - len(_GLOBAL_HOOKS))


def _any_global_hook(g0=_GH[0], g1=_GH[1], g2=_GH[2], g3=_GH[3], g4=_GH[4]) -> bool:
    return bool(g0 or g1 or g2 or g3 or g4)  # any() over a generator costs ~3x this


_handed = []


def _hand_torch_to(C) -> None:
    """Give the native library the torch objects its eager fast path
    (LinearPlan.forward) uses; once per process."""
    if not _handed:
        C.set_torch_refs(Tensor, torch.empty, _F32, _BF16, _get_default_dtype, _get_num_threads)
        _handed.append(C)


class PackedModule(nn.Module):
    WEIGHT_NAMES: FrozenSet[str] = frozenset()
    _DERIVED = ("_packed", "_plan")

    def _repack(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _backend_name(self, device, kernel_fn: str) -> str:
        if device.type == "cpu":
            from pyaccel import _native

            C = _native.lib()
            if self._packed is None or C is None:
                return "cpu/reference"
            return f"cpu/{_native.selected_isa()} ({getattr(C, kernel_fn)()})"
        return "cuda/triton" if device.type == "cuda" else f"{device.type}/reference"

    def _init_features(self, in_features: int, out_features: int, max_in: Optional[int] = None) -> None:
        """Validate and set in/out_features (max_in: the int8 accumulator limit)."""
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features/out_features: expected >= 1, got {in_features}, {out_features}")
        if max_in is not None and in_features > max_in:
            raise ValueError(f"in_features: {in_features} exceeds {max_in}, past which int32 "
                             "accumulators could overflow")
        self.in_features, self.out_features = int(in_features), int(out_features)

    def _init_bias(self, bias: bool, device) -> None:
        """A float32 bias buffer, or bias = None."""
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    def _make_plan(self, kind: str, packed: Tensor, w_scale: Optional[Tensor] = None):
        """A native LinearPlan over `packed` with this module's bias (and
        w_scale); None when one of them is not a contiguous float32 CPU tensor
        (forward then takes the checked general path). The plan holds the
        storages it reads, so it never reads freed memory."""
        from pyaccel import _native

        b = self.bias
        ts = [t for t in (w_scale, b) if t is not None]
        if any(t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu for t in ts):
            return None
        keep = (packed.untyped_storage(),) + tuple(t.untyped_storage() for t in ts)
        C = _native.lib()
        _hand_torch_to(C)
        plan = C.LinearPlan(kind, packed.data_ptr(), packed.numel(), self.out_features, self.in_features,
                            0 if w_scale is None else w_scale.data_ptr(), 0 if b is None else b.data_ptr(), keep)
        plan.max_rows = self._switch_rows  # from there on _run_plan switches plans
        return plan

    # From this many rows on, _run_plan calls _switch_plan() instead (a subclass
    # whose kernel loses to another at many rows sets both).
    _switch_rows = 1 << 62

    def _switch_plan(self):  # pragma: no cover - only with _switch_rows set
        raise NotImplementedError

    def _run_plan(self, plan, x):
        """The eager fast path in Python: y = plan(x) for a plain CPU fp32/bf16
        tensor of rows -- 2-D with unit stride along in_features, or contiguous
        N-D -- into a fresh y of x's dtype; None when x needs the general path.
        The native LinearPlan.forward does the same at ~1.9 instead of ~2.7 µs
        (a 32x32 layer) and runs first; this one serves the rows it declines
        for the plan switch (_switch_rows)."""
        if type(x) is not Tensor or _is_compiling():
            return None
        shape = x.shape
        dt = x.dtype
        k = self.in_features
        if shape[-1] != k or not x.is_cpu or not (dt is _F32 or dt is _BF16):
            return None
        # torch.empty(ints) costs ~0.9 µs here, torch.empty(tuple) 1.4, torch.Size 1.9,
        # and the dtype keyword another 0.4: hence the spelled-out calls
        if len(shape) == 2 and (st := x.stride())[1] == 1:
            m, ldx = shape[0], st[0]
            if dt is _get_default_dtype():
                y = torch.empty(m, self.out_features)
            else:
                y = torch.empty(m, self.out_features, dtype=dt)
        elif len(shape) > 2 and x.is_contiguous():
            m, ldx = x.numel() // k, k
            y = torch.empty(*shape[:-1], self.out_features, dtype=dt)
        else:
            return None
        if m >= self._switch_rows:
            plan = self._switch_plan()
        plan(x.data_ptr(), ldx, dt is _BF16, m, y.data_ptr(), _get_num_threads())
        return y

    # ---- forward: the same three paths for every packed module ------------------
    def _native_rows(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The native CPU op on any float CPU x (arguments known good)."""
        raise NotImplementedError

    def _checked_op(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The torch.ops.pyaccel op: argument checks, then CPU / CUDA / fake kernels."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan
        if plan is not None and not _is_compiling():
            y = plan.forward(x)  # native: 2-D and contiguous N-D rows, below _switch_rows
            if y is None:
                y = self._run_plan(plan, x)  # the same in Python, and the plan switch
            if y is not None:
                return y
        return self._general(x)

    def _general(self, x) -> Tensor:
        """What the plan does not take (after _run_plan declined x)."""
        if (self._plan is not None and type(x) is Tensor and x.is_cpu and not _is_compiling()
                and x.dtype in _FLOAT_IO and x.dim() >= 1 and x.shape[-1] == self.in_features):
            return self._native_rows(x)  # other strides; a plan exists only over canonical (checked) buffers
        from pyaccel import ops

        ops.require_tensor(x)
        return self._checked_op(x)  # compile, CUDA, other dtypes, edited buffers, no native library

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.WEIGHT_NAMES and "_plan" in self.__dict__:
            self._repack()  # a replaced weight invalidates the packing and plan

    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ costs ~1.4 µs here even with no hooks, as much as
        # a small layer's kernel. With no hook of any kind registered, go
        # straight to the native plan (or to forward() for what it cannot take);
        # otherwise take the full path (hooks run as usual).
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _any_global_hook()):
            return super().__call__(*args, **kwargs)
        if len(args) == 1 and not kwargs:
            plan = self._plan
            if plan is not None and not _is_compiling():
                y = plan.forward(args[0])
                if y is None:
                    y = self._run_plan(plan, args[0])
                if y is not None:
                    return y
            return self._general(args[0])
        return self.forward(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # The stored format is fixed: .double() / .half() / .to(dtype) move the
        # buffers but never change their dtypes (no rounding of scales or
        # values); the compute dtype follows the input (fp32 or bf16).
        def same_dtype(t):
            r = fn(t)
            return t.to(device=r.device) if isinstance(r, Tensor) and r.dtype != t.dtype else r

        out = super()._apply(same_dtype, *args, **kwargs)
        self._repack()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._DERIVED:  # native handles do not pickle; __setstate__ rebuilds them
            state[name] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._repack()
