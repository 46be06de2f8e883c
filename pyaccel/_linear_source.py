"""What a Linear-like module really computes with, read without changing it.

patch and prune read every weight through :func:`read_linear`, so a layer is
judged (2:4 or not) and converted from the weight its forward would use, not
from whatever tensor happens to sit in ``.weight``:

* ``torch.nn.utils.prune``: ``weight_orig * weight_mask`` (any pruning
  method, PruningContainer included), computed now: the ``.weight`` attribute
  the pre-hook wrote at the last forward is stale once weight_orig changed.
* ``torch.nn.utils.parametrize``: the parametrization evaluated now, bypassing
  any ``parametrize.cached()`` value.
* old-style ``torch.nn.utils.weight_norm`` (a WeightNorm pre-hook): g * v / |v|.
* transformers' ``Conv1D`` (weight [in, out], y = x @ W + b): W.T.
* a torch sparse weight (``to_sparse_bsr`` and the other sparse layouts):
  read densely; :class:`LinearSource` keeps its layout and (BSR / BSC) its
  block shape.

:func:`inference_forward` lends out the module to run its own forward as
inference does (what the layer costs as the user has it: patch's speed
check) and puts it back as it was.

Any other hook on the module (a swap would drop it) makes :func:`read_linear`
raise :class:`SourceSkip` naming the hook. Nothing here imports transformers.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils import prune as _prune

try:  # the old-style weight_norm hook class (torch.nn.utils.weight_norm is also a function name)
    from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm
except Exception:  # pragma: no cover
    _WeightNorm = None

# Where transformers has defined Conv1D (newest first); looked up in sys.modules
# only: a Conv1D instance cannot exist unless its module has been imported.
_CONV1D_MODULES = ("transformers.pytorch_utils", "transformers.modeling_utils")


class SourceSkip(ValueError):
    """The module's weights cannot be read as a plain Linear; str(exc) says why."""


@dataclasses.dataclass(frozen=True)
class LinearSource:
    """The weight and bias a Linear-like module computes y = x Wᵀ + b with.

    weight: [out_features, in_features], the module's dtype and device; a plain
        torch.Tensor, detached (never a Parameter, never the module's own
        tensor object, though it may share its storage: do not write to it).
    bias: [out_features] (same rules) or None.
    kind: "Linear" or "Conv1D" (the class under any parametrization wrapper).
    via: how the tensors were read, e.g. ("prune mask on weight",); empty for
        a plain module.
    layout: the layout of the module's weight tensor ("strided", or e.g.
        "sparse_bsr" for a weight from ``to_sparse_bsr``, which forward runs
        through torch's sparse kernels); `weight` is dense either way.
    blocksize: a sparse_bsr / sparse_bsc weight's block shape, as (rows,
        cols) of `weight` [out, in] (a Conv1D's transposed); else None.
    """

    weight: Tensor
    bias: Optional[Tensor]
    kind: str
    via: Tuple[str, ...] = ()
    layout: str = "strided"
    blocksize: Optional[Tuple[int, int]] = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def forward_steps(self) -> str:
        """What the module's forward computes each call, in words: "dense
        F.linear", "torch sparse_bsr F.linear", "prune mask on weight
        (CustomFromMask) + dense F.linear", "dense Conv1D addmm", ..."""
        op = "F.linear" if self.kind == "Linear" else "Conv1D addmm"
        core = f"dense {op}" if self.layout == "strided" else f"torch {self.layout} {op}"
        recomputed = [v for v in self.via if v.startswith(("prune mask", "parametrization", "weight_norm"))]
        return " + ".join(recomputed + [core])


def hf_conv1d_type() -> Optional[type]:
    """transformers' Conv1D class if transformers has been imported, else None."""
    for name in _CONV1D_MODULES:
        cls = getattr(sys.modules.get(name), "Conv1D", None)
        if isinstance(cls, type):
            return cls
    return None


def base_type(mod: nn.Module) -> type:
    """The module's class, under torch.nn.utils.parametrize's generated
    ``Parametrized<Class>`` wrapper class if there is one."""
    cls = type(mod)
    if _parametrize.is_parametrized(mod) and cls.__name__ == "Parametrized" + cls.__bases__[0].__name__:
        return cls.__bases__[0]
    return cls


def linear_kind(mod: nn.Module) -> Optional[str]:
    """"Linear" for an nn.Linear, "Conv1D" for a transformers Conv1D (exact
    classes, parametrized or not); None for anything else, subclasses included."""
    cls = base_type(mod)
    if cls is nn.Linear:
        return "Linear"
    conv1d = hf_conv1d_type()
    if conv1d is not None and cls is conv1d:
        return "Conv1D"
    return None


def linear_subclass_of(mod: nn.Module) -> Optional[str]:
    """"nn.Linear" / "Conv1D" when the module's class is a proper subclass of
    one of them (its forward may differ), else None."""
    if linear_kind(mod) is not None:
        return None
    if isinstance(mod, nn.Linear):
        return "nn.Linear"
    conv1d = hf_conv1d_type()
    return "Conv1D" if conv1d is not None and isinstance(mod, conv1d) else None


def _hook_name(hook: Any) -> str:
    fn = hook.func if isinstance(hook, functools.partial) else hook
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{mod}.{name}" if mod and mod != "builtins" else name


_HOOK_DICTS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def module_hooks(mod: nn.Module) -> Tuple[Dict[str, Any], List[str]]:
    """Split the module's own hooks into the ones :func:`read_linear` can
    evaluate (tensor name -> prune method or WeightNorm, forward pre-hooks
    only) and descriptions of all others ("forward hook pkg.fn"), which a swap
    would drop. Raises SourceSkip when two hooks recompute the same tensor."""
    known: Dict[str, Any] = {}
    foreign: List[str] = []
    for attr, what in _HOOK_DICTS:
        for hook in getattr(mod, attr, {}).values():
            name = None
            if attr == "_forward_pre_hooks":
                if isinstance(hook, _prune.BasePruningMethod):
                    name = hook._tensor_name
                elif _WeightNorm is not None and isinstance(hook, _WeightNorm):
                    name = hook.name
            if name is None:
                foreign.append(f"{what} {_hook_name(hook)}")
            elif name in known:
                raise SourceSkip(f"two forward pre-hooks recompute {name!r} "
                                 f"({type(known[name]).__name__}, {type(hook).__name__})")
            else:
                known[name] = hook
    return known, foreign


def _plain(t: Tensor, what: str) -> Tensor:
    """t detached, as a plain torch.Tensor; SourceSkip for tensor subclasses
    (torchao, DTensor, lazy parameters, ...)."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        raise SourceSkip(f"{what} is not initialized yet (lazy module): run a forward first")
    d = t.detach()
    if type(d) is not Tensor:
        raise SourceSkip(f"{what} is a {type(t).__name__} (a tensor subclass): no pyaccel kernel reads it")
    return d


def _eval_parametrization(plist: nn.Module) -> Tensor:
    """A ParametrizationList evaluated now (never the parametrize.cached()
    value), with its modules in eval mode for the call so that none updates
    its state (spectral_norm's power iteration writes its u, v buffers in
    training mode); their training flags are restored after."""
    flags = [(m, m.training) for m in plist.modules()]
    try:
        plist.eval()
        return plist()
    finally:
        for m, training in flags:
            m.training = training


def _read_tensor(mod: nn.Module, name: str, hooks: Dict[str, Any], via: List[str]) -> Optional[Tensor]:
    """The value `name` has inside the module's next forward, without running
    any hook (so without writing to the module)."""
    hook = hooks.get(name)
    with torch.no_grad():
        if hook is not None and isinstance(hook, _prune.BasePruningMethod):
            via.append(f"prune mask on {name} ({type(hook).__name__})")
            t = hook.apply_mask(mod)
        elif hook is not None:
            via.append(f"weight_norm hook on {name}")
            t = hook.compute_weight(mod)
        elif _parametrize.is_parametrized(mod, name):
            via.append(f"parametrization on {name}")
            t = _eval_parametrization(mod.parametrizations[name])
        else:
            t = getattr(mod, name)
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise SourceSkip(f"{name} is a {type(t).__name__}, not a tensor")
    return _plain(t, name)


def read_tensor(mod: nn.Module, name: str) -> Optional[Tensor]:
    """The value tensor attribute `name` of `mod` will have in its next forward
    (prune mask applied, parametrization or weight_norm hook evaluated now),
    detached, a plain tensor; None if the attribute is None. Hooks other than
    those are not run. Never writes to `mod`. SourceSkip if it is not a tensor."""
    hooks, _ = module_hooks(mod)
    return _read_tensor(mod, name, hooks, [])


def read_linear(mod: nn.Module, *, allow_foreign_hooks: bool = False) -> LinearSource:
    """The effective weight [out, in] and bias [out] of an nn.Linear or a
    transformers Conv1D (see the module docstring for what "effective" covers).

    Raises SourceSkip when the module is not one of those kinds, when it has a
    hook a swap would drop (unless allow_foreign_hooks: then such hooks are
    ignored and the tensors read as if they were absent), or when its weight
    is not a readable dense 2-D floating-point tensor. Never writes to `mod`.
    """
    kind = linear_kind(mod)
    if kind is None:
        raise SourceSkip(f"{type(mod).__name__} is not an nn.Linear or a transformers Conv1D")
    hooks, foreign = module_hooks(mod)
    if foreign and not allow_foreign_hooks:
        raise SourceSkip(f"{', '.join(foreign)} on the module would be lost by a swap")
    bad = sorted(set(hooks) - {"weight", "bias"})
    if bad:
        raise SourceSkip(f"a forward pre-hook recomputes {bad[0]!r}, which forward does not read as weight/bias")
    via: List[str] = []
    w = _read_tensor(mod, "weight", hooks, via)
    b = _read_tensor(mod, "bias", hooks, via)
    if w is None or w.dim() != 2:
        raise SourceSkip(f"weight: expected a 2-D tensor, got {None if w is None else tuple(w.shape)}")
    if w.device.type == "meta":
        raise SourceSkip("weights are on the meta device: materialize them first")
    layout, blocksize = "strided", None
    if w.layout != torch.strided:
        # a sparse weight (torch.sparse_bsr from to_sparse_bsr, CSR, COO, ...): F.linear runs it through
        # torch's sparse kernels, and the swap from the dense values (its zero blocks are found again)
        layout = str(w.layout).replace("torch.", "")
        if w.layout in (torch.sparse_bsr, torch.sparse_bsc):
            blocksize = (int(w.values().shape[1]), int(w.values().shape[2]))
        w = w.to_dense()
        via.append(f"{layout} weight read densely")
    if not w.is_floating_point():
        raise SourceSkip(f"weight dtype {w.dtype} is not floating point")
    if kind == "Conv1D":
        w = w.t()  # Conv1D stores [in, out] and computes x @ W + b
        via.append("Conv1D weight transposed")
        blocksize = None if blocksize is None else (blocksize[1], blocksize[0])
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise SourceSkip(f"bias: expected shape ({w.shape[0]},), got {tuple(b.shape)}")
    return LinearSource(w, b, kind, tuple(via), layout, blocksize)


@contextlib.contextmanager
def inference_forward(mod: nn.Module) -> Iterator[nn.Module]:
    """Yields `mod` set up to run its own forward as inference does, so that
    what it costs can be timed: the module and its submodules in eval mode (a
    parametrization such as spectral_norm updates its state in training
    mode); call it under torch.no_grad. On exit the module is as it was: the
    training flags are restored, and so are the tensors its
    torch.nn.utils.prune / weight_norm pre-hooks write into it each call."""
    written = list(module_hooks(mod)[0])
    saved = {name: mod.__dict__[name] for name in written if name in mod.__dict__}
    flags = [(m, m.training) for m in mod.modules()]
    try:
        mod.eval()
        yield mod
    finally:
        for m, training in flags:
            m.training = training
        for name in written:
            if name in saved:
                mod.__dict__[name] = saved[name]
            else:
                mod.__dict__.pop(name, None)


def own_weight_names(mod: nn.Module) -> List[str]:
    """Names of the floating-point 2-D parameters and persistent buffers the
    module holds itself (recurse=False), parametrized ones included; plus the
    3-D weight of nn.Bilinear, the one Linear-family layer without a 2-D one."""
    names = []
    persistent = [(k, v) for k, v in mod._buffers.items() if k not in mod._non_persistent_buffers_set]
    for name, t in list(mod._parameters.items()) + persistent:
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 2:
            names.append(name)
    if _parametrize.is_parametrized(mod):
        for name, plist in mod.parametrizations.items():
            if any(t.is_floating_point() and t.dim() == 2 for t in plist.parameters(recurse=False)):
                names.append(name)
    if isinstance(mod, nn.Bilinear) and "weight" not in names:
        names.append("weight")
    return names


# ---- copying a model (patch(inplace=False)) ----------------------------------------

def _sparse_clone(obj: Tensor) -> Tensor:
    """A clone of a sparse leaf tensor with its requires_grad; a Parameter is
    rebuilt with its own class as Parameter.__deepcopy__ does (nn.Parameter
    where that class's constructor does not take (data, requires_grad))."""
    clone = obj.detach().clone()
    if not isinstance(obj, nn.Parameter):
        return clone.requires_grad_(obj.requires_grad)
    try:
        new = type(obj)(clone, obj.requires_grad)
    except Exception:
        new = None
    if not isinstance(new, nn.Parameter):
        new = nn.Parameter(clone, obj.requires_grad)
    return new


def _seed_nonleaf(obj: Any, memo: Dict[int, Any], depth: int = 0) -> None:
    if isinstance(obj, Tensor):
        if id(obj) in memo:
            return
        if not obj.is_leaf:
            memo[id(obj)] = obj.detach().clone()
        elif obj.layout != torch.strided:  # torch's deepcopy refuses sparse tensors (to_sparse_bsr, ...)
            memo[id(obj)] = _sparse_clone(obj)
    elif depth < 3 and isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _seed_nonleaf(v, memo, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            _seed_nonleaf(v, memo, depth + 1)


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model), also for models holding non-leaf tensors in module
    attributes (the tensor a torch.nn.utils.prune or weight_norm pre-hook
    writes into .weight after a forward with autograd on, activations a module
    kept, ...), which deepcopy refuses: the copy gets detached clones of those
    (every such hook recomputes its tensor before the next forward anyway);
    and for sparse tensors (a ``to_sparse_bsr`` weight Parameter, ...), which
    it refuses too: the copy gets clones with their requires_grad
    (Parameters stay Parameters of their class where its constructor takes
    (data, requires_grad), as torch's own Parameter copy requires).
    The original is not changed. RuntimeError naming the cause otherwise."""
    memo: Dict[int, Any] = {}
    for mod in model.modules():
        _seed_nonleaf(vars(mod), memo)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise RuntimeError(f"inplace=False: could not deep-copy the model ({type(exc).__name__}: {exc}); "
                           "copy it yourself and pass inplace=True") from exc
