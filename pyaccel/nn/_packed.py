"""Base classes of pyaccel's inference modules that keep a packed copy of
their weights for the native CPU kernels.

The packed copy (and any native call plan) is derived state: rebuilt by
``_repack()`` whenever the canonical weights change place or value --
construction, ``load_state_dict``, ``.to()``/``.cpu()``, deepcopy,
unpickling, assigning one of ``WEIGHT_NAMES``, and (detected at the next call)
an in-place edit of one of them or a ``.data`` swap -- and never saved.
Canonical values are validated wherever they enter: a bad assignment or
state_dict is refused with a ValueError / load error naming the buffer, and a
bad in-place edit makes the next call raise one.

The module contract every pyaccel module honours (tests/test_module_contract.py):
eager fast path == torch.ops path; strided, N-D and empty inputs;
torch.compile, torch.export, torch.jit.trace, torch.fx.symbolic_trace (a leaf
``call_module`` node); backward to the input; deepcopy, pickle, state_dict,
meta + ``load_state_dict(assign=True)``; one checkpoint, one answer on every ISA.
"""
from __future__ import annotations

import warnings
from typing import Dict, FrozenSet, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

_is_compiling = torch.compiler.is_compiling
_get_default_dtype = torch.get_default_dtype
_get_num_threads = torch.get_num_threads
_grad_enabled = torch.is_grad_enabled
_tracing_state = torch._C._get_tracing_state
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
        C.set_torch_refs(Tensor, torch.empty, _F32, _BF16, _get_default_dtype, _get_num_threads, _tracing_state,
                         torch.int64)
        _handed.append(C)


def _fx_proxy(x) -> bool:
    fx = torch.fx
    return isinstance(x, fx.Proxy)


class PackedModule(nn.Module):
    """Lifecycle of a module with packed weights: validation, repacking, the
    eager fast path and the checked torch.ops path (see the module docstring).

    Subclasses set WEIGHT_NAMES (the canonical buffers) and define _canonical_error,
    _pack, _native_rows and _op.
    """

    WEIGHT_NAMES: FrozenSet[str] = frozenset()
    _DERIVED = ("_packed", "_plan")
    _packed: Optional[Tensor] = None
    _plan = None
    _invalid: Optional[str] = None  # why the canonical buffers cannot be used, if they cannot
    _sig: tuple = ()  # _signature() when last packed
    _READ_IN_PLACE = frozenset({"weight_scale", "bias"})  # what the kernels read where it is, not from the packing
    _loading = False

    # ---- canonical buffers: validation and packing ----------------------------
    def _canonical_error(self, t: Dict[str, Optional[Tensor]]) -> Optional[str]:  # pragma: no cover - abstract
        """Why the canonical tensors `t` (name -> tensor) are not a valid
        state of this module, naming the buffer; None when they are."""
        raise NotImplementedError

    def _pack(self) -> None:  # pragma: no cover - abstract
        """Build self._packed and self._plan from valid canonical buffers."""
        raise NotImplementedError

    def _canonical(self) -> Dict[str, Optional[Tensor]]:
        return {name: getattr(self, name) for name in self.WEIGHT_NAMES}

    def _repack(self) -> None:
        """Rebuild the packed weight and the native call plan (after any change
        of weights, device or state; done automatically)."""
        for name in self._DERIVED:
            setattr(self, name, None)
        self._track_versions()
        self._sig = self._signature()
        self._invalid = self._canonical_error(self._canonical())
        if self._invalid is None:
            # normal tensors even under torch.inference_mode: an inference tensor
            # in the packing could not be saved for a later grad-enabled call
            with torch.inference_mode(False):
                self._pack()

    def _track_versions(self) -> None:
        """Replace each canonical buffer that is an inference tensor (made under
        torch.inference_mode: no version counter) by a normal copy, whose
        in-place edits -- inside inference mode too -- bump its counter, so
        that the next call sees them (repacks, or refuses an invalid value)."""
        for name in self.WEIGHT_NAMES:
            t = self._buffers.get(name)
            if t is not None and t.is_inference():
                with torch.inference_mode(False):
                    self._buffers[name] = t.clone()

    def _signature(self) -> tuple:
        """Identity, data pointer, version counter and shape of every canonical
        buffer: differs from the one recorded at packing time after any
        assignment, .data swap (a same-pointer view included) or in-place edit
        (_track_versions keeps inference tensors out of the canonical buffers:
        they have no counter)."""
        sig = []
        for name in sorted(self.WEIGHT_NAMES):
            t = self._buffers.get(name)
            if t is None:
                sig.append(None)
                continue
            v = None  # scales and bias are read in place by every path: their in-place edits need no repack
            if name not in self._READ_IN_PLACE:
                try:
                    v = t._version
                except RuntimeError:
                    v = -1
            sig.append((id(t), t.data_ptr(), v, t.shape))  # shape: a .data swap for a same-pointer view
        return tuple(sig)

    def _stale(self) -> bool:
        """Whether the canonical buffers changed since packing. Under torch.jit.trace
        the buffers' sizes are traced values, yet the answer is a constant of the trace
        (the packed buffers are its constants too): its TracerWarning would be noise."""
        if _tracing_state() is None:
            return self._signature() != self._sig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return bool(self._signature() != self._sig)

    def _refresh(self) -> None:
        """Repack if the canonical buffers changed since packing (every path
        but the native plan's, which checks the same in C); raise if they are
        invalid."""
        if not _is_compiling() and self._stale():
            self._repack()
        if self._invalid is not None:
            raise ValueError(f"{type(self).__name__}: {self._invalid}")

    def _repack_or_raise(self) -> None:
        """_repack, raising ValueError when the canonical buffers are invalid (constructors)."""
        self._repack()
        if self._invalid is not None:
            raise ValueError(self._invalid)

    def _backend_name(self, device, kernel_fn: str) -> str:
        if device.type == "cpu":
            from pyaccel import _native

            C = _native.lib()
            if self._packed is None or C is None:
                return "cpu/reference"
            return f"cpu/{_native.selected_isa()} ({getattr(C, kernel_fn)()})"
        return "cuda/triton" if device.type == "cuda" else f"{device.type}/reference"

    def _make_plan(self, kind: str, packed: Tensor, w_scale: Optional[Tensor] = None):
        """A native LinearPlan over `packed` with this module's bias (and
        w_scale); None when one of them is not a contiguous float32 CPU tensor
        (forward then takes the checked general path). The plan holds the
        storages it reads, so it never reads freed memory, and watches the
        canonical buffers: once one gets other .data, or one the packing was
        built from is edited in place, plan.stale() is True and the next call
        repacks (in-place edits of w_scale and bias are read where they are)."""
        from pyaccel import _native

        b = self.bias
        ts = [t for t in (w_scale, b) if t is not None]
        if any(t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu for t in ts):
            return None
        keep = (packed.untyped_storage(),) + tuple(t.untyped_storage() for t in ts)
        C = _native.lib()
        _hand_torch_to(C)
        watch = tuple((name, t, t is not None and all(t is not r for r in ts))
                      for name, t in sorted(self._canonical().items()))
        plan = C.LinearPlan(kind, packed.data_ptr(), packed.numel(), self.out_features, self.in_features,
                            0 if w_scale is None else w_scale.data_ptr(), 0 if b is None else b.data_ptr(), keep,
                            watch, self._buffers)
        plan.max_rows = self._switch_rows  # from there on _run_plan switches plans
        return plan

    # From this many rows on, _run_plan calls _switch_plan() instead (a subclass
    # whose kernel loses to another at many rows sets both, or overrides
    # _switches for a window of row counts).
    _switch_rows = 1 << 62

    def _switches(self, m: int) -> bool:
        """True when _run_plan runs m rows with _switch_plan()."""
        return m >= self._switch_rows

    def _switch_plan(self):  # pragma: no cover - only where _switches can be true
        raise NotImplementedError

    def _run_plan(self, plan, x):
        """The eager fast path in Python: y = plan(x) for a plain CPU fp32/bf16
        tensor of rows -- 2-D with unit stride along in_features, or contiguous
        N-D -- into a fresh y of x's dtype; None when x needs the general path.
        The native LinearPlan.forward does the same at ~1.9 instead of ~2.7 µs
        (a 32x32 layer) and runs first; this one serves the rows it declines
        for the plan switch (_switches: until a 2:4 int8 module attaches
        its dense plan to the native one, which then switches itself).
        Callers have checked that x is a plain tensor that needs no autograd
        or tracing and that the plan is not stale."""
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
        if not y.is_cpu:  # a default-device context (torch.device("meta"), ...)
            return None
        if self._switches(m):
            plan = self._switch_plan()
        plan(x.data_ptr(), ldx, dt is _BF16, m, y.data_ptr(), _get_num_threads())
        return y

    # ---- forward: the same paths for every packed module ----------------------
    def _native_rows(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The native CPU op on any float CPU x (arguments known good)."""
        raise NotImplementedError

    def _op(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """The torch.ops.pyaccel op with this module's weights and `bias`:
        argument checks, then CPU / CUDA / fake kernels, autograd to x."""
        raise NotImplementedError

    def _checked_op(self, x: Tensor) -> Tensor:
        return self._op(x, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan
        if plan is not None and not _is_compiling():
            y = plan.forward(x)  # native: 2-D and contiguous N-D rows (unless _switches(m), or any with a dense plan)
            if y is not None:
                return y
        return self._general(x)

    def _general(self, x) -> Tensor:
        """Every call the native plan declined: other strides and row counts,
        autograd, tracing, compile, CUDA, other dtypes, a stale plan, bad input."""
        if type(x) is not Tensor:
            if _fx_proxy(x):  # torch.fx: a leaf call_module node
                tracer = x.tracer
                return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
            if not isinstance(x, Tensor):
                from pyaccel import ops

                ops.require_tensor(x)
            self._refresh()
            return self._checked_op(x)  # tensor subclasses (FakeTensor, Parameter, ...)
        if x.layout != torch.strided:
            from pyaccel import ops

            ops.require_strided(x)
        self._refresh()  # an assignment, in-place edit or .data swap since packing
        plan = self._plan
        compiling = _is_compiling()
        if (plan is not None and not compiling and x.dim() >= 1 and not (x.requires_grad and _grad_enabled())
                and _tracing_state() is None):
            y = self._run_plan(plan, x)  # the plan switch, and anything plan.forward declined for a stale plan
            if y is not None:
                return y
            if x.is_cpu and x.dtype in _FLOAT_IO and x.shape[-1] == self.in_features:
                return self._native_rows(x)  # other strides; a plan exists only over valid buffers
        return self._checked_op(x)

    def __setattr__(self, name, value):
        if name in self.WEIGHT_NAMES and isinstance(value, nn.Parameter):
            value = value.detach()  # the canonical tensors are frozen buffers, whatever is assigned
        if name in self.WEIGHT_NAMES and "_plan" in self.__dict__ and not self._loading:
            old = getattr(self, name)
            super().__setattr__(name, value)
            err = self._canonical_error(self._canonical())
            if err is not None:  # refuse: put the old tensor back
                super().__setattr__(name, old)
                raise ValueError(f"{type(self).__name__}.{name}: {err}")
            self._repack()  # a replaced weight invalidates the packing and plan
            return
        super().__setattr__(name, value)

    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ costs ~1.4 µs here even with no hooks, as much as
        # a small layer's kernel. With no hook of any kind registered, go
        # straight to the native plan (or to _general() for what it declines);
        # otherwise, and for torch.fx proxies, take the full path.
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _any_global_hook()):
            return super().__call__(*args, **kwargs)
        if len(args) == 1 and not kwargs:
            x = args[0]
            plan = self._plan
            if plan is not None and not _is_compiling():
                y = plan.forward(x)
                if y is not None:
                    return y
            if type(x) is not Tensor and _fx_proxy(x):
                return super().__call__(x)  # torch.fx patches nn.Module.__call__ to record the module
            return self._general(x)
        return super().__call__(*args, **kwargs)

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        incoming = self._canonical()
        for name in incoming:
            if prefix + name in state_dict:
                incoming[name] = state_dict[prefix + name]
        err = None
        if all(isinstance(t, Tensor) or t is None for t in incoming.values()):
            err = self._canonical_error(incoming)
        if err is not None:  # refuse before anything is copied
            error_msgs.append(f"{type(self).__name__} ({prefix or 'root'}): {err}")
            return
        self._loading = True  # assign=True sets buffers one by one: repack once, at the end
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._loading = False
        self._repack()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._DERIVED:  # native handles do not pickle; __setstate__ rebuilds them
            state[name] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._repack()

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: say that scripting is not
        supported (it failed inside TorchScript's annotation parser)."""
        raise RuntimeError(f"{type(self).__name__}: torch.jit.script is not supported by pyaccel modules (their "
                           "forward checks arguments in Python and calls custom ops); use torch.jit.trace, "
                           "torch.compile or torch.export")


class PackedLinear(PackedModule):
    """A Linear-kind pyaccel module: ``y = x Wᵀ + b`` with W stored compressed.

    Exposes what code reads from the nn.Linear it replaced: ``in_features``,
    ``out_features``, ``bias`` (float32 [out_features] buffer or None) and
    ``weight``, a read-only :class:`~pyaccel.nn._weight.DenseWeightView` of
    the effective dense weight (float32 [out_features, in_features], on the
    module's device; computed only when used, never kept resident). Compiled
    code that reads ``weight`` gets the same view, across a graph break.

    Autograd: gradients flow to the input (the gradient of the effective dense
    weight, ``grad_x = grad_y @ W``; the weights are frozen buffers).
    """

    def _init_features(self, in_features: int, out_features: int, max_in: Optional[int] = None) -> None:
        """Validate and set in/out_features (max_in: the int8 accumulator limit)."""
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features/out_features: expected >= 1, got {in_features}, {out_features}")
        if max_in is not None and in_features > max_in:
            raise ValueError(f"in_features: {in_features} exceeds {max_in}, past which int32 "
                             "accumulators could overflow")
        self.in_features, self.out_features = int(in_features), int(out_features)

    def _init_bias(self, bias: bool, device) -> None:
        """A float32 bias buffer, or a None buffer (a bias assigned later is a buffer too)."""
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32, device=device)
                             if bias else None)

    def _bias_error(self, b) -> Optional[str]:
        n = self.out_features
        if b is not None and (not isinstance(b, Tensor) or b.dtype != torch.float32 or tuple(b.shape) != (n,)):
            return f"bias: expected float32 of shape ({n},) or None, got {_desc(b)}"
        return None

    def _dense_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The effective dense weight, float32 [out_features, in_features]."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    @property
    @torch.compiler.disable  # a graph break: compiled code that reads .weight sees the view too
    def weight(self) -> Tensor:
        """Read-only view of the effective dense weight (see the class docstring)."""
        from pyaccel.nn._weight import DenseWeightView

        return DenseWeightView(self, self._device())

    def __setattr__(self, name, value):
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is read-only (a view of the compressed weight); assign "
                f"{' / '.join(sorted(self.WEIGHT_NAMES - {'bias'}))}, or build a new module with from_float")
        super().__setattr__(name, value)

    def _linear(self, x: Tensor, bias) -> Tensor:
        """F.linear(x, self.weight, bias) with this module's kernel (a bias that
        needs a gradient is added outside the kernel, so it gets one)."""
        if bias is self.bias:
            return self(x)
        self._refresh()
        if isinstance(bias, Tensor) and (bias.requires_grad and torch.is_grad_enabled() or bias.dtype != torch.float32):
            y = self._op(x, None)
            return y + bias.to(y.dtype)  # outside the kernel: a bias that needs a gradient gets one
        return self._op(x, bias)


def linear_weights(linear: nn.Module):
    """(weight [out, in], bias [out] or None) that `linear` computes with: an
    nn.Linear (prune masks, parametrizations, weight_norm applied) or a
    transformers Conv1D (weight transposed); detached. TypeError for other
    modules, ValueError when the weights cannot be read (meta device, ...)."""
    from pyaccel._linear_source import linear_kind, read_linear

    if linear_kind(linear) is not None:
        src = read_linear(linear, allow_foreign_hooks=True)
        return src.weight, src.bias
    if isinstance(linear, nn.Linear):  # a subclass, converted on the caller's say-so
        return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    raise TypeError(f"linear: expected torch.nn.Linear or a transformers Conv1D, got {type(linear).__name__}")


def _desc(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
