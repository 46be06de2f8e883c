"""Multi-module patterns for :func:`pyaccel.patch`: chains such as
depthwise conv -> BatchNorm2d -> ReLU6 -> 1x1 conv -> BatchNorm2d, found in
nn.Sequential containers and through torch.fx, and the pieces fused modules
are built from (BatchNorm folding, activation descriptors).

**Patterns.** A :class:`ChainPattern` is a list of :class:`Slot` s (a name, a
predicate over one :class:`Elem`, optional or not) and a ``build`` function
that turns the matched elements into a replacement module (or a reason it
cannot). Patterns are registered with :func:`register` and tried in
registration order; the first slot's element is the *head*.

**Elements.** An :class:`Elem` is one step of a model's data flow: a module
(``Elem.module``, its path) or, through torch.fx, a function call such as
``F.relu6(x)`` (``Elem.fn`` with its extra args/kwargs). Predicates get Elems;
:func:`activation_of` reads an activation from either kind.

**Where chains are found.**

* :func:`sequential_chains`: every nn.Sequential (nested ones flattened: a
  Sequential -- or a subclass that keeps Sequential's forward, such as
  torchvision's Conv2dNormActivation -- inside another is a run of its
  children) is a run of leaf modules in execution order. A match starting at
  any position is applied in place: the head's path gets the fused module,
  every other path of the span an nn.Identity; the report has one entry
  for the span.
* :func:`fx_chains`: a model whose forward torch.fx can trace (pyaccel
  modules and every non-Sequential leaf module stay leaves). A chain follows
  values that have exactly one user each; the result is a new GraphModule
  (the patch is then *not* in place: use ``report.model``).

A module in a chain must not be shared with another path, and no module
of the chain may carry hooks (a swap would drop them).

**BatchNorm folding.** :func:`bn_scale_shift` gives the per-channel affine
form ``y = x * scale + shift`` of an eval-mode BatchNorm2d (for sign-based
binary layers a negative scale flips the sign: keep the form, do not fold
into weights); :func:`fold_bn` folds it into a preceding conv's weight and bias.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- activations ------------------------------------------------------------------------
class ActKind(enum.IntEnum):
    """Activation codes shared with the native kernels (keep in sync with csrc)."""

    NONE = 0
    RELU = 1
    RELU6 = 2
    HARDSWISH = 3
    SILU = 4
    HARDTANH = 5  # clamp(x, lo, hi); ReLU6 is HARDTANH(0, 6)
    PRELU = 6  # per-channel (or single) slope for x < 0


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation a fused kernel applies in its epilogue.

    kind: :class:`ActKind`. lo/hi: Hardtanh bounds. slope: PReLU slope
    (float32 tensor of 1 or C values), else None.
    """

    kind: ActKind = ActKind.NONE
    lo: float = -1.0
    hi: float = 1.0
    slope: Optional[Tensor] = dataclasses.field(default=None, compare=False)

    @property
    def name(self) -> str:
        if self.kind == ActKind.HARDTANH:
            return f"hardtanh({self.lo:g}, {self.hi:g})"
        return self.kind.name.lower()

    def __call__(self, x: Tensor) -> Tensor:
        """The activation in PyTorch (the reference)."""
        k = self.kind
        if k == ActKind.NONE:
            return x
        if k == ActKind.RELU:
            return torch.relu(x)
        if k == ActKind.RELU6:
            return F.relu6(x)
        if k == ActKind.HARDSWISH:
            return F.hardswish(x)
        if k == ActKind.SILU:
            return F.silu(x)
        if k == ActKind.HARDTANH:
            return F.hardtanh(x, self.lo, self.hi)
        slope = self.slope.to(x.device, x.dtype)
        if slope.numel() > 1 and x.dim() >= 2:
            slope = slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x >= 0, x, x * slope)

    @staticmethod
    def parse(spec: Union[str, "Activation", None], name: str = "activation") -> "Activation":
        """An Activation from a name ('none' / 'identity', 'relu', 'relu6', 'hardswish',
        'silu' / 'swish'; any case), an activation module (nn.ReLU, nn.ReLU6,
        nn.Hardswish, nn.SiLU, nn.Hardtanh, nn.Identity), None (none) or itself.
        ValueError naming `name` (the caller's argument) for anything else."""
        if isinstance(spec, Activation):
            return spec
        if spec is None:
            return Activation()
        if isinstance(spec, nn.Module):
            act = activation_of(spec) if type(spec) is not nn.Identity else Activation()
            if act is None:
                raise ValueError(f"{name}: expected one of nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, "
                                 f"nn.Hardtanh, nn.Identity or a name, got {spec!r}")
            return act
        names = {"none": ActKind.NONE, "identity": ActKind.NONE, "relu": ActKind.RELU, "relu6": ActKind.RELU6,
                 "hardswish": ActKind.HARDSWISH, "silu": ActKind.SILU, "swish": ActKind.SILU}
        if not isinstance(spec, str) or spec.lower() not in names:
            raise ValueError(f"{name}: expected one of {sorted(names)}, got {spec!r}")
        return Activation(names[spec.lower()])


_FN_ACTS = {
    F.relu: ActKind.RELU, torch.relu: ActKind.RELU, F.relu6: ActKind.RELU6, F.hardswish: ActKind.HARDSWISH,
    F.silu: ActKind.SILU,
}
_METHOD_ACTS = {"relu": ActKind.RELU}


def activation_of(elem: Union["Elem", nn.Module], prelu: bool = False) -> Optional[Activation]:
    """The Activation an element computes, or None when it is not one
    (nn.ReLU/ReLU6/Hardswish/SiLU/Hardtanh modules; F.relu, F.relu6,
    F.hardswish, F.silu, F.hardtanh, torch.relu, Tensor.relu calls; nn.PReLU
    only when `prelu`). In-place variants count (they compute the same)."""
    if isinstance(elem, nn.Module):
        elem = Elem(module=elem)
    m = elem.module
    if m is not None:
        if type(m) is nn.ReLU:
            return Activation(ActKind.RELU)
        if type(m) is nn.ReLU6:
            return Activation(ActKind.RELU6)
        if type(m) is nn.Hardswish:
            return Activation(ActKind.HARDSWISH)
        if type(m) is nn.SiLU:
            return Activation(ActKind.SILU)
        if type(m) is nn.Hardtanh:
            return Activation(ActKind.HARDTANH, float(m.min_val), float(m.max_val))
        if type(m) is nn.PReLU and prelu:
            return Activation(ActKind.PRELU, slope=m.weight.detach().float().reshape(-1))
        return None
    if elem.fn is None:
        return None
    if elem.fn in _FN_ACTS:
        return Activation(_FN_ACTS[elem.fn])
    if elem.fn is F.hardtanh:
        lo = elem.kwargs.get("min_val", elem.args[0] if len(elem.args) > 0 else -1.0)
        hi = elem.kwargs.get("max_val", elem.args[1] if len(elem.args) > 1 else 1.0)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return Activation(ActKind.HARDTANH, float(lo), float(hi))
        return None
    if isinstance(elem.fn, str) and elem.fn in _METHOD_ACTS:
        return Activation(_METHOD_ACTS[elem.fn])
    return None


# ---- BatchNorm folding ---------------------------------------------------------------------
def bn_scale_shift(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """(scale, shift), float32 [C]: what an eval-mode BatchNorm2d computes,
    ``bn(x) = x * scale + shift`` per channel, with
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale.
    A negative gamma gives a negative scale (it matters for sign-based layers).
    ValueError when the BatchNorm has no running statistics."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale.float(), shift.float()


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: Optional[nn.Module]) -> Tuple[Tensor, Tensor]:
    """(weight', bias') float32 of a conv followed by an eval-mode BatchNorm
    over its output channels (dim 0 of weight): weight' = weight * scale,
    bias' = (bias or 0) * scale + shift (computed in float64). bn None: the
    conv's own weight and bias (zeros when None)."""
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().double()
    if bn is not None:
        scale, shift = bn_scale_shift(bn)
        scale, shift = scale.double().to(w.device), shift.double().to(w.device)
        w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        b = b * scale + shift
    return w.float(), b.float()


def bn_usable(bn: nn.Module) -> Optional[str]:
    """Why a BatchNorm2d cannot be folded (None when it can)."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain BatchNorm2d"
    if bn.training:
        return "BatchNorm2d in training mode uses batch statistics: call model.eval() before patching"
    if bn.running_mean is None:
        return "BatchNorm2d without running statistics"
    return None


# ---- elements and patterns --------------------------------------------------------------
@dataclasses.dataclass
class Elem:
    """One step of a model's data flow: a module at `path`, or (fx) a function
    `fn` (a callable, or a method name for call_method) with its extra args."""

    module: Optional[nn.Module] = None
    path: str = ""
    fn: Any = None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    node: Any = None  # the fx node, if any

    def describe(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return getattr(self.fn, "__name__", str(self.fn))


# A predicate returns True when the element fits the slot, False when not,
# or a string: the element is of the slot's kind but cannot be taken (the reason).
Predicate = Callable[[Elem], Union[bool, str]]


@dataclasses.dataclass
class Slot:
    """One position of a chain."""

    name: str
    accepts: Predicate
    optional: bool = False


@dataclasses.dataclass
class ChainPattern:
    """A chain of slots and how to build its replacement.

    build(matched) gets {slot name: Elem} (optional slots absent) and returns
    a ``(module, lossy)`` pair, or a string saying why it is not replaced.
    fx_ok: whether the pattern may also be matched through torch.fx.
    standalone: whether a match of this pattern alone justifies rewriting a
    model with torch.fx (a new GraphModule); False for patterns worth taking
    only along with others (a lone 1x1 conv + BN: matched through fx only when
    the same rewrite fuses a standalone pattern too).
    """

    name: str
    slots: List[Slot]
    build: Callable[[Dict[str, Elem], Any], Union[Tuple[nn.Module, bool], str]]
    fx_ok: bool = True
    standalone: bool = True


_PATTERNS: List[ChainPattern] = []


def register(pattern: ChainPattern) -> ChainPattern:
    """Add a pattern (tried in registration order)."""
    _PATTERNS.append(pattern)
    return pattern


def patterns() -> List[ChainPattern]:
    return list(_PATTERNS)


@dataclasses.dataclass
class Match:
    """A matched chain: the pattern, the elements in order and by slot."""

    pattern: ChainPattern
    elems: List[Elem]
    by_slot: Dict[str, Elem]

    @property
    def head(self) -> Elem:
        return self.elems[0]


def match_at(pattern: ChainPattern, seq: Sequence[Elem], i: int) -> Union[Match, str, None]:
    """Match `pattern` on seq[i:]: a Match, None when seq[i] is not a head of
    this pattern, or a string (the head fits but the chain does not, and why)."""
    first = pattern.slots[0]
    ok = first.accepts(seq[i])
    if ok is False:
        return None
    if isinstance(ok, str):
        return ok
    elems, by_slot, j = [seq[i]], {first.name: seq[i]}, i + 1
    for slot in pattern.slots[1:]:
        if j < len(seq):
            ok = slot.accepts(seq[j])
            if ok is True:
                elems.append(seq[j])
                by_slot[slot.name] = seq[j]
                j += 1
                continue
            if isinstance(ok, str):  # of the slot's kind, but not usable: the chain stays, with the reason
                return ok
        if not slot.optional:
            nxt = seq[j].describe() if j < len(seq) else "the end of the chain"
            return f"{pattern.name}: expected {slot.name} after {elems[-1].describe()}, found {nxt}"
    return Match(pattern, elems, by_slot)


# ---- nn.Sequential containers ----------------------------------------------------------------
def _flattenable(mod: nn.Module) -> bool:
    """A Sequential (or subclass keeping Sequential.forward) with no hooks of its own."""
    return (isinstance(mod, nn.Sequential) and type(mod).forward is nn.Sequential.forward
            and not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                     or getattr(mod, "_backward_pre_hooks", None)))


def _leaves(seq: nn.Sequential, path: str) -> List[Elem]:
    out = []
    for name, child in seq._modules.items():
        if child is None:
            continue
        p = f"{path}.{name}" if path else name
        if _flattenable(child):
            out += _leaves(child, p)
        else:
            out.append(Elem(module=child, path=p))
    return out


def sequential_runs(model: nn.Module) -> List[List[Elem]]:
    """Every maximal run of leaf modules in nn.Sequential containers (nested
    flattenable Sequentials merged into their parent's run), in execution order."""
    runs = []
    inner = set()
    for path, mod in model.named_modules():
        if id(mod) in inner or not _flattenable(mod):
            continue
        stack = [c for c in mod._modules.values() if c is not None]
        while stack:  # Sequentials merged into this run (not those inside a custom module: their own runs)
            sub = stack.pop()
            if _flattenable(sub):
                inner.add(id(sub))
                stack += [c for c in sub._modules.values() if c is not None]
        run = _leaves(mod, path)
        if run:
            runs.append(run)
    return runs


def find_sequential_matches(model: nn.Module, pats: Optional[List[ChainPattern]] = None
                            ) -> Tuple[List[Match], Dict[str, str]]:
    """(matches, {head path: reason}) over every Sequential run of `model`,
    non-overlapping, leftmost first; the reasons are for heads whose chain did
    not match (the head fits a pattern, what follows does not)."""
    pats = _PATTERNS if pats is None else pats
    matches, reasons = [], {}
    for run in sequential_runs(model):
        i = 0
        while i < len(run):
            found = None
            for pat in pats:
                r = match_at(pat, run, i)
                if isinstance(r, Match):
                    found = r
                    break
                if isinstance(r, str):
                    reasons.setdefault(run[i].path, r)
            if found is not None:
                reasons.pop(run[i].path, None)
                matches.append(found)
                i += len(found.elems)
            else:
                i += 1
    return matches, reasons


def apply_sequential_match(model: nn.Module, match: Match, new: nn.Module) -> None:
    """Put `new` at the head's path and nn.Identity at every other path of the span."""
    for k, e in enumerate(match.elems):
        parent_path, _, name = e.path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new if k == 0 else nn.Identity())


# ---- torch.fx ----------------------------------------------------------------------------------
class _LeafTracer(torch.fx.Tracer):
    """Every module but nn.Sequential (and flattenable subclasses) is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__.split(".")[0] == "pyaccel":
            return True
        return not _flattenable(m) and (super().is_leaf_module(m, qualname) or len(list(m.children())) == 0
                                        or isinstance(m, nn.Conv2d))


def fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    """A GraphModule of `model` (leaf modules: see _LeafTracer); raises what fx raises."""
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def fx_lost_hooks(model: nn.Module) -> Optional[str]:
    """What a GraphModule of `model` would lose: hooks on the modules torch.fx
    traces through (the root and every non-leaf module; leaf modules stay
    module calls and keep theirs), or global module hooks; None when nothing."""
    gl = torch.nn.modules.module
    if any(getattr(gl, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                  "_global_backward_hooks", "_global_backward_pre_hooks")):
        return "global module hooks (torch.nn.modules.module.register_module_forward_hook & co.)"
    tracer = _LeafTracer()
    for path, m in model.named_modules():
        if path and tracer.is_leaf_module(m, path):
            continue
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)):
            return f"the hooks on {path or 'the model'} ({type(m).__name__})"
    return None


def _node_elem(gm: torch.fx.GraphModule, node) -> Optional[Elem]:
    if node.op == "call_module":
        return Elem(module=gm.get_submodule(node.target), path=str(node.target), node=node)
    if node.op in ("call_function", "call_method"):
        return Elem(fn=node.target, args=tuple(node.args[1:]), kwargs=dict(node.kwargs), node=node)
    return None


def _chain_from(gm, node, limit: int) -> List[Elem]:
    """The elements following `node` through values with exactly one user
    (the value of each element before the last is the next one's first argument)."""
    out = []
    cur = node
    while len(out) < limit:
        e = _node_elem(gm, cur)
        if e is None:
            break
        out.append(e)
        users = list(cur.users)
        if len(users) != 1:
            break
        nxt = users[0]
        others = list(nxt.args[1:]) + list(nxt.kwargs.values())
        if not nxt.args or nxt.args[0] is not cur or any(a is cur for a in others):
            break
        if nxt.op == "call_module" and (len(nxt.args) != 1 or nxt.kwargs):
            break  # a module called with more than its input: a fused module would drop the rest
        cur = nxt
    return out


def _call_args_reason(node) -> str:
    """Why a module call with other arguments than its input alone cannot head an fx fusion."""
    if node.kwargs:
        how = f"a keyword-argument call ({', '.join(f'{k}=...' for k in node.kwargs)})"
    else:
        how = f"a call with {len(node.args)} positional arguments"
    return (f"{how}: fusion through torch.fx needs the input as the only positional argument "
            "(call the module as module(x))")


def find_fx_matches(gm: torch.fx.GraphModule, pats: Optional[List[ChainPattern]] = None
                    ) -> Tuple[List[Match], Dict[str, str]]:
    """(matches, {head path: reason}) in a traced model; each intermediate
    value of a match has exactly one user."""
    pats = [p for p in (_PATTERNS if pats is None else pats) if p.fx_ok]
    matches, reasons, used = [], {}, set()
    for node in gm.graph.nodes:
        if node in used or node.op != "call_module":
            continue
        e = _node_elem(gm, node)
        for pat in pats:
            if pat.slots[0].accepts(e) is False:
                continue
            if len(node.args) != 1 or node.kwargs:
                reasons.setdefault(e.path, _call_args_reason(node))
                break
            chain = _chain_from(gm, node, len(pat.slots))
            r = match_at(pat, chain, 0)
            if isinstance(r, Match):
                matches.append(r)
                used.update(el.node for el in r.elems)
                reasons.pop(e.path, None)
                break
            if isinstance(r, str):
                if len(list(node.users)) > 1 or (len(chain) < len(pat.slots) and len(chain) >= 1
                                                  and len(list(chain[-1].node.users)) > 1):
                    r += " (an intermediate value has more than one user, e.g. a squeeze-excitation branch)"
                reasons.setdefault(e.path, r)
    return matches, reasons


def apply_fx_match(gm: torch.fx.GraphModule, match: Match, new: nn.Module, name: str) -> None:
    """Replace the match's nodes by one call_module of `new` (added as `name`)."""
    gm.add_submodule(name, new)
    first, last = match.elems[0].node, match.elems[-1].node
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_module(name, (first.args[0],))
    last.replace_all_uses_with(fused)
    for e in reversed(match.elems):
        gm.graph.erase_node(e.node)


def fx_finish(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Lint, drop modules no node calls any more, recompile."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def module_paths_used_elsewhere(model: nn.Module) -> Dict[int, int]:
    """id(module) -> how many paths reach it (shared modules have > 1)."""
    count: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    return count


__all__ = [
    "ActKind", "Activation", "activation_of", "bn_scale_shift", "fold_bn", "bn_usable", "Elem", "Slot",
    "ChainPattern", "Match", "register", "patterns", "match_at", "sequential_runs", "find_sequential_matches",
    "apply_sequential_match", "fx_trace", "find_fx_matches", "apply_fx_match", "fx_finish",
]
