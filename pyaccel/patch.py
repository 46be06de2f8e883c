"""``pyaccel.patch(model)``: swap pyaccel modules into a model and report.

patch walks the model's modules (every path, shared modules included); for
each one a small handler (registered with :func:`handler`) either offers a
replacement built from the original module or says why it leaves the module
alone; modules no handler takes but that hold a weight matrix, and float
convolutions outside every fused chain, are reported too. Handlers read weights through :mod:`pyaccel._linear_source` (the weight
a layer really computes with). By default patch is lossless: it only takes
modules that are already compressed (torch.ao int8, 2:4 zeros or prune
masks). Lossy steps, such as quantizing float layers (``quantize="int8"``),
happen only on request.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.parametrize import is_parametrized

from pyaccel import _native, ops
from pyaccel._linear_source import (
    LinearSource,
    SourceSkip,
    deepcopy_model,
    inference_forward,
    linear_kind,
    linear_subclass_of,
    module_hooks,
    own_weight_names,
    read_linear,
)
from pyaccel.formats import sparse24 as s24
from pyaccel.formats.int8 import from_torch_ao_dynamic_linear, quantize_weight_per_channel
from pyaccel import _sparse_choice
from pyaccel import _dws_pattern  # noqa: F401  (registers the depthwise -> pointwise chain)
from pyaccel.nn.block_sparse_linear import BlockSparseInt8Linear, BlockSparseLinear
from pyaccel.nn.int8_linear import Int8Linear
from pyaccel.nn.sparse24_linear import Sparse24Int8Linear, Sparse24Linear

try:  # torch.ao's dynamic Linear; absent in some builds
    from torch.ao.nn.quantized.dynamic import Linear as _AoDynamicLinear
except Exception:  # pragma: no cover
    _AoDynamicLinear = None
try:  # nn.MultiheadAttention's out_proj class
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _NonDynQLinear
except Exception:  # pragma: no cover
    _NonDynQLinear = None

FilterFn = Callable[[nn.Module, str], bool]
QUANTIZE_MODES = (None, "int8")
MIN_SPARSE24_K = 8  # narrower layers are left dense: nothing to gain


@dataclasses.dataclass
class PatchEntry:
    """One module patch looked at: swapped (new_type set) or skipped (reason set).

    Fields: ``path`` (the module's path in the model passed in; for a fused
    chain its head's), ``old_type`` (class name; for a chain the steps joined
    by "+"), ``new_type`` (the replacement's class name, None when skipped),
    ``backend`` (where and how the replacement runs: device, ISA, kernel, and
    notes), ``reason`` (why a module stays), ``lossy`` (the replacement
    quantized what was float), ``shared_with`` (the first path of the same
    module object, when this is another), ``span`` (a fused chain: every path
    it replaced, head first)."""

    path: str
    old_type: str
    new_type: Optional[str] = None
    backend: Optional[str] = None
    reason: Optional[str] = None
    lossy: bool = False
    shared_with: Optional[str] = None  # first path of the same module object, if not this one
    span: Optional[List[str]] = None  # a fused chain (pyaccel._pattern): every path it replaced, head first

    @property
    def swapped(self) -> bool:
        return self.new_type is not None


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did. ``print(report)`` shows a table.

    ``swapped``: the entries of what a pyaccel module replaced, one per module
    or chain (a binary layer -> BatchNorm -> activation, a depthwise ->
    pointwise block: one entry whose ``span`` lists every path it replaced);
    ``skipped``: the entries left as they are, with the reason; ``folded``: how
    many modules the chains replaced past their heads."""

    model: nn.Module
    entries: List[PatchEntry] = dataclasses.field(default_factory=list)

    @property
    def swapped(self) -> List[PatchEntry]:
        return [e for e in self.entries if e.swapped]

    @property
    def skipped(self) -> List[PatchEntry]:
        return [e for e in self.entries if not e.swapped]

    @property
    def folded(self) -> int:
        """How many modules past their chain's head the swapped chains replaced (each chain is
        one entry in ``swapped``; its ``span`` lists them)."""
        return sum(len(e.span) - 1 for e in self.swapped if e.span)

    def __str__(self) -> str:
        head = ("path", "old type", "new type", "backend / reason")
        def last(e: PatchEntry) -> str:
            text = (("lossy: " if e.lossy else "") + e.backend) if e.swapped else f"skipped: {e.reason}"
            return text + (f" [same module as {e.shared_with or '<root>'}]" if e.shared_with is not None else "")

        def where(e: PatchEntry) -> str:
            return f"{e.path} .. {e.span[-1]}" if e.span and len(e.span) > 1 else (e.path or "<root>")

        rows = [(where(e), e.old_type, e.new_type or "-", last(e)) for e in self.entries]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]  # noqa: E731
        lines = [fmt(head), "  ".join("-" * w for w in widths) + "  " + "-" * 16]
        lines += [fmt(r) for r in rows]
        lines.append(f"{len(self.swapped)} swapped, {len(self.skipped)} skipped" + (
            f" ({self.folded} more modules fused or folded into the swapped ones)" if self.folded else ""))
        return "\n".join(lines)

    __repr__ = __str__


@dataclasses.dataclass
class _Context:
    quantize: Optional[str]
    block_sparse: str = "measure"
    act_bits: int = 8  # of every Int8Linear the patch builds


BLOCK_SPARSE_MODES = ("measure", "always", "never")


@dataclasses.dataclass
class Build:
    """A replacement a handler offers: ``make()`` builds it (called only for
    modules the filters select, once per module object); lossy: whether the
    replacement computes something other than the original (quantization)."""

    make: Callable[[], nn.Module]
    lossy: bool = False


# A handler takes (module, context) and returns a Build (or a ready new
# module), a string saying why it leaves the module alone, or None if the
# module is not its kind.
_Handler = Callable[[nn.Module, _Context], Union[Build, nn.Module, str, None]]
_HANDLERS: List[_Handler] = []


def handler(fn: _Handler) -> _Handler:
    """Register a patch handler (tried in registration order)."""
    _HANDLERS.append(fn)
    return fn


def _cpu_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu/{_native.selected_isa()}" if _native.available() else "cpu/reference"
    return "cuda/triton" if device.type == "cuda" else f"{device.type}/reference"


def _lost_hooks(mod: nn.Module) -> Optional[str]:
    """The reason to leave `mod` when it has hooks a swap would drop."""
    _, foreign = module_hooks(mod)
    return f"{', '.join(foreign)} on the module would be lost by a swap" if foreign else None


@handler
def _binary_layer(mod, ctx):
    """pyaccel.nn.BinaryConv2d / BinaryLinear in eval mode -> XnorConv2d /
    XnorLinear (lossless; pyaccel._binary_patch). Chains with a BatchNorm /
    activation after them are folded before the walk (fold_sequences)."""
    from pyaccel import _binary_patch

    out = _binary_patch.handle(mod)
    if isinstance(out, nn.Module):
        lost = _lost_hooks(mod)
        if lost:
            return lost
    return out


@handler
def _torch_ao_dynamic_linear(mod, ctx):
    """torch.ao dynamic qint8 Linear: Int8Linear over the same int8 weights."""
    if _AoDynamicLinear is None or not isinstance(mod, _AoDynamicLinear):
        return None
    if type(mod) is not _AoDynamicLinear:
        return f"subclass {type(mod).__name__} of torch.ao's dynamic Linear may change forward(); not swapped"
    if getattr(mod._packed_params, "dtype", None) == torch.float16:
        return "torch.ao dynamic Linear with float16 weights: no pyaccel fp16 kernel; left as is"
    lost = _lost_hooks(mod)
    if lost:
        return lost
    try:
        w = from_torch_ao_dynamic_linear(mod)
    except ValueError as exc:
        return f"torch.ao weights not representable: {exc}"
    _, bias = mod._packed_params._weight_bias()
    bias = bias.detach() if bias is not None else None
    return Build(lambda: Int8Linear.from_weights(w, bias, act_bits=ctx.act_bits),
                 lossy=bool(w.notes) or ctx.act_bits != 8)


@handler
def _linear_like(mod, ctx):
    """nn.Linear / transformers Conv1D (pruned, parametrized, weight-normed or
    plain), from the weight it computes with (pyaccel._linear_source):
    already 2:4 along in_features: Sparse24Linear (lossless), or
    Sparse24Int8Linear with quantize="int8"; dense: Int8Linear with
    quantize="int8", else left as is."""
    kind = linear_kind(mod)
    if kind is None:
        sub = linear_subclass_of(mod)
        if sub is None:
            return None
        if isinstance(mod, LazyModuleMixin):
            return f"{type(mod).__name__} not initialized yet: run a forward first"
        if _NonDynQLinear is not None and type(mod) is _NonDynQLinear:
            return ("MultiheadAttention's out_proj: MultiheadAttention reads its weight and bias directly "
                    "(never its forward()), so a swap would not take effect; not swapped")
        return f"subclass {type(mod).__name__} of {sub} may change forward(); not swapped"
    try:
        src = read_linear(mod)
    except SourceSkip as exc:
        return str(exc)
    w, b = src.weight, src.bias
    if w.numel() == 0:
        return (f"empty {kind} (in_features {src.in_features}, out_features {src.out_features}): pyaccel "
                "modules need both >= 1; left as is")
    if w.dtype not in (torch.float32, torch.bfloat16):
        return (f"{w.dtype} weights: pyaccel modules take float32/bfloat16 inputs, and this layer "
                f"gets {w.dtype} ones; left as is")
    k = src.in_features
    is24 = k >= MIN_SPARSE24_K and s24.is_24(w)
    int8 = ctx.quantize == "int8"
    if is24:
        plan: Union[Build, str] = Build((lambda: Sparse24Int8Linear.from_dense(w, b)) if int8
                                        else (lambda: Sparse24Linear.from_dense(w, b)), lossy=int8)
    elif int8:
        plan = Build(lambda: Int8Linear.from_weights(quantize_weight_per_channel(w), b, act_bits=ctx.act_bits),
                     lossy=True)
    else:
        why = ("weights not 2:4 sparse" if k >= MIN_SPARSE24_K
               else f"in_features {k} < {MIN_SPARSE24_K}, too narrow for the 2:4 kernels")
        what = f"dense float {kind}" if src.layout == "strided" else f"float {kind} with a torch {src.layout} weight"
        plan = f"{what} ({why}): pass quantize='int8' to quantize it (lossy)"
    if w.device.type != "cpu" or ctx.block_sparse == "never":
        return plan
    # the shape of a BSR weight and the one the zeros tile (prune_blocks') are scored with the candidates
    hints = [src.blocksize, _sparse_choice.tiling_block(w)]
    # a layer left as it is keeps a sparse weight on torch's sparse kernels: measured whatever its zero blocks
    minimum = 0.0 if isinstance(plan, str) and src.layout != "strided" else _sparse_choice.MIN_ZERO_BLOCKS
    choices = _sparse_choice.block_choices(w, hints, minimum)
    if not choices:
        if isinstance(plan, str):
            few = _sparse_choice.most_zero_blocks(w, _sparse_choice.shapes_with(hints))
            if few is not None and few.zero_fraction > 0:
                plan += (f"; {few.zero_fraction:.0%} zero {few.block[0]}x{few.block[1]} blocks, under the "
                         f"{_sparse_choice.MIN_ZERO_BLOCKS:.0%} block-sparse minimum")
        return plan
    if ctx.block_sparse == "always":
        cls = BlockSparseInt8Linear if int8 else BlockSparseLinear
        choice = choices[0]
        return Build(lambda: _noted(cls.from_dense(w.float(), b, choice.block),
                                    f"{_found(choice)} (block_sparse='always': not measured)"), lossy=int8)
    # measured at build time (only for the layers the filters select)
    return Build(lambda: _block_sparse_or(plan, mod, src, choices, is24, int8), lossy=int8)


def _found(choice) -> str:
    return f"{choice.zero_fraction:.0%} zero {choice.block[0]}x{choice.block[1]} blocks"


def _noted(mod: nn.Module, note: str) -> nn.Module:
    mod.notes = list(getattr(mod, "notes", [])) + [note]
    return mod


class Declined(Exception):
    """A Build's make() found the swap not worth making; str(exc) is the reason."""


def _block_sparse_or(fallback: Union[Build, str], mod: nn.Module, src: LinearSource, choices, is24: bool,
                     int8: bool) -> nn.Module:
    """BlockSparseLinear (BlockSparseInt8Linear when quantizing), with the
    faster of the `choices` block shapes, where it measures faster than what
    the layer runs otherwise -- its own forward (`mod`, e.g. torch's sparse
    F.linear for a sparse_bsr weight), or the dense Int8Linear when
    quantizing -- and than the 2:4 module for a 2:4 weight, on the real
    shape (pyaccel._sparse_choice); else the fallback's module, or Declined
    with the fallback's reason and the measurement."""
    w, b = src.weight, src.bias
    wf = w.float()
    cls = BlockSparseInt8Linear if int8 else BlockSparseLinear
    cands: Dict[str, nn.Module] = {}
    found: Dict[str, str] = {}
    for i, c in enumerate(choices):  # the rule's pick first: "block-sparse"
        name = "block-sparse" if i == 0 else f"block-sparse {c.block[0]}x{c.block[1]}"
        cands[name], found[name] = cls.from_dense(wf, b, c.block), _found(c)
    shapes = list(cands)
    if is24:
        cands["2:4"] = Sparse24Int8Linear.from_dense(w, b) if int8 else Sparse24Linear.from_dense(w, b)
    with inference_forward(mod) as own:
        if int8:
            baseline, what = Int8Linear.from_weights(quantize_weight_per_channel(wf), b), "dense int8"
        else:
            baseline, what = own, f"the layer's own forward ({src.forward_steps})"
            try:
                with torch.no_grad():
                    own(torch.zeros(1, src.in_features, dtype=w.dtype))
            except Exception as exc:  # e.g. torch has no bfloat16 sparse_bsr kernel on CPU
                baseline, what = None, (f"dense F.linear (the layer's own forward, {src.forward_steps}, raises "
                                        f"{type(exc).__name__})")
        speed = _sparse_choice.measured_speedups(w, b, cands, baseline=baseline)
    worst = {name: min(s.values()) for name, s in speed.items()}
    best = max(shapes, key=lambda n: worst[n])  # ties: the rule's pick

    def measured(name: str) -> str:
        others = [f"{found[o]}: {_sparse_choice.describe(speed[o])}" for o in shapes if o != name]
        return (f"measured {_sparse_choice.describe(speed[name])} over {what}"
                + (f" (also measured {', '.join(others)})" if others else ""))

    if worst[best] >= _sparse_choice.MIN_SPEEDUP and not (is24 and worst["2:4"] >= worst[best]):
        new = cands[best]
        new.notes = [f"{found[best]}, {measured(best)}"]
        return new
    why = f"{found[best]}, block-sparse {measured(best)}: not taken"
    if isinstance(fallback, str):
        # the block-sparse finding first: it is why this layer was considered at all
        raise Declined(f"{why} (it needs x{_sparse_choice.MIN_SPEEDUP} at every measured M); otherwise {fallback}")
    new = cands["2:4"] if is24 else fallback.make()
    new.notes = list(getattr(new, "notes", [])) + [why]
    return new


def _unhandled(mod: nn.Module) -> Optional[str]:
    """The reason for a module no handler takes that holds a weight matrix
    itself (Embedding, MultiheadAttention, custom modules, ...) or is a float
    convolution outside every fused chain; else None."""
    w = getattr(mod, "weight", None)
    where = type(mod).__module__
    if where.startswith("torch.ao.nn.") and ".quantized" in where and callable(w):
        # torch.ao's static quantized modules (prepare / convert): quantized tensors flow between
        # them; their weight is a method
        return (f"torch.ao static quantized {type(mod).__name__} (prepare / convert): no pyaccel path for "
                "quantized-tensor activations; pyaccel takes torch.ao dynamic Linear (quantize_dynamic), or "
                "the float model with quantize='int8'")
    if isinstance(mod, nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor) and w.is_floating_point():
        if not isinstance(mod, nn.Conv2d) or mod.transposed:
            return f"no pyaccel kernel for {type(mod).__name__}"
        window = "x".join(str(k) for k in mod.kernel_size)
        return (f"no pyaccel kernel for this {type(mod).__name__} ({window}, groups {mod.groups}) on its own: "
                "pyaccel takes convolutions in the fused chains it matches, or binarized")
    names = own_weight_names(mod)
    if not names:
        return None
    held = f" (holds {', '.join(names)})" if names != ["weight"] else ""
    return f"no pyaccel kernel for {type(mod).__name__}{held}"


def _matches(path: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _patterns(p: Optional[Union[str, Sequence[str]]]) -> Optional[Sequence[str]]:
    return [p] if isinstance(p, str) else p


def _warn_unmatched_include(model: nn.Module, include, what: str = "patch", stacklevel: int = 3) -> None:
    """UserWarning naming each include pattern that matches no module path of
    `model` (`what` -- patch, prune_24, ... -- would then take nothing it
    selects), with a sample path."""
    if not include:
        return
    paths = [p for p, _ in model.named_modules(remove_duplicate=False)]
    for pattern in _patterns(include):
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            sample = next((p for p in paths if p.count(".") >= 2), paths[-1] if paths else "")
            warnings.warn(f"{what}: include pattern {pattern!r} matches no module path of the model (its paths "
                          f"look like {sample!r}; a SentenceTransformer's start with '0.model.')",
                          UserWarning, stacklevel=stacklevel)


def check_selection_args(filter_fn, include, exclude):
    """(include, exclude) as None, a pattern string or a tuple of them (any
    iterable of strings is taken once); TypeError naming the argument unless
    filter_fn is None or a callable and include / exclude are None, a pattern
    string or an iterable of pattern strings."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, path) -> bool, got {type(filter_fn).__name__}")
    out = []
    for name, p in (("include", include), ("exclude", exclude)):
        if p is not None and not isinstance(p, str):
            if isinstance(p, (bytes, bytearray)) or not isinstance(p, Iterable):
                raise TypeError(f"{name}: expected None, an fnmatch pattern string or a list of them, got {p!r}")
            p = tuple(p)
            if not all(isinstance(q, str) for q in p):
                raise TypeError(f"{name}: expected None, an fnmatch pattern string or a list of them, got {p!r}")
        out.append(p)
    return tuple(out)


def selection_reason(mod: nn.Module, path: str, include, exclude, filter_fn) -> Optional[str]:
    """Why the user's filters leave `mod` out, or None when it is selected."""
    inc, exc = _patterns(include), _patterns(exclude)
    if (inc is not None and not _matches(path, inc)) or (exc is not None and _matches(path, exc)):
        return "excluded by include/exclude patterns"
    if filter_fn is not None and not filter_fn(mod, path):
        return "filtered out by filter_fn"
    return None


def _is_pyaccel_module(mod: nn.Module) -> bool:
    """A module pyaccel swapped in (not a pyaccel training module such as BinaryConv2d)."""
    return type(mod).__module__.split(".")[0] == "pyaccel" and not getattr(mod, "_pyaccel_trainable", False)


def _inside(path: str, roots: set) -> bool:
    """Whether `path` lies strictly inside a module at one of the `roots` paths."""
    if "" in roots:
        return path != ""
    i = path.rfind(".")
    while i > 0:
        if path[:i] in roots:
            return True
        i = path.rfind(".", 0, i)
    return False


@dataclasses.dataclass
class _Seen:
    """What patch decided for one module object (at its first path)."""

    path: str
    plan: Union[Build, str]
    new: Optional[nn.Module] = None  # built replacement (once, shared by every path)
    error: Optional[str] = None  # why building it failed


def _plan(mod: nn.Module, ctx: _Context) -> Union[Build, str, None]:
    for h in _HANDLERS:
        try:
            result = h(mod, ctx)
        except Exception as exc:  # a bad layer never stops the others
            return f"could not read the module ({type(exc).__name__}): {exc}"
        if isinstance(result, nn.Module):  # binary swaps compute what the layer computes: never lossy
            return Build(lambda r=result: r, lossy=ctx.quantize is not None and h is not _binary_layer)
        if result is not None:
            return result
    return _unhandled(mod)


def _param_owners(model: nn.Module) -> Dict[int, List[Tuple[str, int]]]:
    """id(parameter) -> [(path, id(module)), ...] of the modules holding it directly."""
    owners: Dict[int, List[Tuple[str, int]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((path, id(mod)))
    return owners


def tied_owner(mod: nn.Module, path: str, owners) -> Optional[str]:
    """The path of another module (outside mod's subtree) holding mod's weight
    Parameter -- its plain weight, a torch.nn.utils.prune weight_orig or a
    parametrization's original -- as tied embeddings and output layers do;
    None when there is none. owners: _param_owners(model)."""
    params = getattr(mod, "_parameters", {})
    ws = [w for w in (params.get("weight"), params.get("weight_orig")) if w is not None][:1]
    if not ws and hasattr(mod, "parametrizations") and "weight" in getattr(mod, "parametrizations", {}):
        plist = mod.parametrizations.weight
        # one original, or original0, original1, ... (a parametrization whose right_inverse
        # returns several tensors: weight_norm's g and v)
        ws = [t for name, t in plist.named_parameters(recurse=False) if name.startswith("original")]
    inside = f"{path}." if path else ""
    others = [p for w in ws for p, i in owners.get(id(w), []) if i != id(mod) and not p.startswith(inside)]
    return (others[0] or "<root>") if others else None


def _tied_reason(mod: nn.Module, path: str, owners) -> Optional[str]:
    """Why a layer whose weight Parameter another module also holds (tied
    embeddings and output layers) stays: a swap would untie them."""
    other = tied_owner(mod, path, owners)
    if other is not None:
        return f"weight is tied to {other}'s (the same Parameter): a swap would untie them; left as is"
    return None


def _build(seen: _Seen, mod: nn.Module) -> None:
    try:
        new = seen.plan.make()
        new.train(mod.training)
        seen.new = new
    except Declined as exc:
        seen.error = str(exc)
    except Exception as exc:  # e.g. in_features past the int8 kernels' limit
        seen.error = f"not convertible ({type(exc).__name__}): {exc}"


def _fold_binary_chains(model, report, include, exclude, filter_fn) -> None:
    """Binary layer -> BatchNorm -> activation chains in nn.Sequential: one
    XnorConv2d / XnorLinear with the BN and activation in its epilogue."""
    from pyaccel import _binary_patch

    def selected(mod, path):
        try:
            return selection_reason(mod, path, include, exclude, filter_fn)
        except Exception as exc:
            return f"filter_fn raised {type(exc).__name__}: {exc}"

    from pyaccel import _pattern

    counts, owners = _pattern.module_paths_used_elsewhere(model), _param_owners(model)

    def blocked(mod):  # what the per-module walk would refuse, found before folding
        if counts.get(id(mod), 1) > 1:
            return "shared with another path"
        path = next((p for p, m in model.named_modules() if m is mod), "")
        return _lost_hooks(mod) or _tied_reason(mod, path, owners)

    for path, old, new, folded in _binary_patch.fold_sequences(model, selected, blocked):
        # one entry for the chain, as for the other fused chains: one swap, its span naming the folded modules
        what = ", ".join(f"{p} ({t})" for p, t in folded)
        report.entries.append(PatchEntry(path=path, old_type="+".join([old] + [t for _, t in folded]),
                                         new_type=type(new).__name__, backend=f"{new.backend()}; folded {what}",
                                         span=[path] + [p for p, _ in folded]))


def patch(
    model: nn.Module,
    *,
    quantize: Optional[str] = None,
    filter_fn: Optional[FilterFn] = None,
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    inplace: bool = True,
    block_sparse: str = "measure",
    act_bits: int = 8,
    binary_handoff: bool = False,
) -> PatchReport:
    """Swap pyaccel kernels into `model`; return a :class:`PatchReport`.

    Args:
        model: any nn.Module.
        quantize: None (lossless swaps only) or "int8" (also quantize float
            nn.Linear / Conv1D layers: per-channel weights, per-token activations;
            and fused depthwise -> 1x1 chains get an int8 pointwise stage,
            FusedDWSeparableInt8Conv2d: x1.6 - 3.3 the fp32 fused blocks, with
            an error that compounds through a network: see bench/RESULTS.md).
        filter_fn: ``filter_fn(module, path) -> bool``; modules for which it is
            False are left alone (reported as filtered out). A fused chain is
            asked about every module of its span (convs, BatchNorms,
            activations) and stays unless all pass: a filter meant for convs
            should pass other modules (``not isinstance(m, nn.Conv2d) or ...``).
        include / exclude: fnmatch patterns on module paths ("encoder.*.dense").
        inplace: False deep-copies the model first; ``report.model`` is the copy.
        block_sparse: for Linear layers with >= 30 % zero blocks (and, not
            quantized and not 2:4, those whose weight is a torch sparse tensor,
            e.g. from ``to_sparse_bsr``, whatever its zero blocks): "measure"
            (default: swap to BlockSparseLinear only where it measures faster
            than what the layer runs now -- its own forward, torch's sparse
            F.linear for a sparse weight -- on the real shape,
            pyaccel._sparse_choice; timing-dependent on a
            busy machine), "always" (swap without measuring: the same module
            structure on every machine for a model whose weights have the zero
            blocks; a fresh unpruned model has none, so to load a saved
            block-sparse state_dict build the modules directly, e.g.
            ``BlockSparseLinear.from_dense(torch.zeros(out, in), None, block)``
            or on the meta device), or "never".
        act_bits: 8 (default) or 7, the activation mode of every dense
            Int8Linear the patch builds (quantized float layers and torch.ao
            ones; 2:4 and block-sparse int8 layers keep 8-bit activations).
            7 is the opt-in faster mode on AVX2-only CPUs (1.4 - 1.6x at 32+
            rows there) at ~5.5 dB lower SQNR (Int8Linear's docstring, README).
            ValueError for other values (7.0 included); a UserWarning when no
            such Int8Linear was built (act_bits then changed nothing).
        binary_handoff: False (default) keeps float activations between binary
            layers. True: adjacent XnorConv2d layers in an nn.Sequential (a
            BatchNorm / activation between them folded) hand packed signs to
            each other for float32 channels_last inputs in eager mode without
            autograd (the same results, dtype and format; 0 - 6 % faster per
            chain measured on Zen 4). The first one's output is then int64
            packed signs, which code that runs it alone or slices the
            Sequential sees; other inputs (NCHW, bf16, unbatched, autograd,
            tracing) keep float activations.

    The report has one entry per path of every module a handler looks at, of
    every other module holding a weight matrix and of every float convolution
    no chain took (with the reason it stays).
    A module object found at several paths is converted once: every selected
    path gets the same replacement (entries after the first say
    ``shared_with``). A replacement sits on its original's device; if the
    model itself is a single replaceable module, ``report.model`` is the
    replacement. pyaccel modules already in the model (an earlier patch) are
    left as they are, each with a report entry saying so; modules inside them
    and inside a replaced one are not looked at.

    Multi-module chains (binary layer -> BatchNorm -> activation, folded into
    XnorConv2d / XnorLinear by pyaccel._binary_patch; pyaccel._pattern's, e.g.
    depthwise conv -> BatchNorm2d -> activation -> 1x1 conv -> BatchNorm2d ->
    activation) are matched first: inside nn.Sequential containers (nested ones
    included) the head's path gets the fused module and the rest of the span
    nn.Identity, with one report entry for the span (``entry.span``); a
    pyaccel._pattern chain in a custom forward is matched through torch.fx, and
    then ``report.model`` is a new torch.fx.GraphModule (that patch is *not* in
    place: use ``report.model``; with ``inplace=True`` patch then warns). A
    chain that cannot be fused stays as it is, with the reason on its head's
    entry.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize: expected one of {QUANTIZE_MODES}, got {quantize!r}")
    if block_sparse not in BLOCK_SPARSE_MODES:
        raise ValueError(f"block_sparse: expected one of {BLOCK_SPARSE_MODES}, got {block_sparse!r}")
    include, exclude = check_selection_args(filter_fn, include, exclude)
    _warn_unmatched_include(model, include)
    given = model
    if not inplace:
        model = deepcopy_model(model)
    ops.check_act_bits(act_bits)
    act_bits = int(act_bits)
    ctx = _Context(quantize=quantize, block_sparse=block_sparse, act_bits=act_bits)
    report = PatchReport(model=model)
    # modules an earlier patch put in (reported as such; not those this call swaps in)
    earlier = {id(m) for m in model.modules() if _is_pyaccel_module(m)}
    # binary layers first: BinaryConv2d is an nn.Conv2d subclass the conv chain patterns must not see
    _fold_binary_chains(model, report, include, exclude, filter_fn)
    chain_reasons = _pattern_pass(report, ctx, include, exclude, filter_fn)
    # a fused chain's entry covers its head's path, also where the original head stays
    # (a forward that uses it elsewhere too: the fused module then has a path of its own)
    fused_heads = {e.path for e in report.entries if e.span and e.swapped}
    model = report.model
    seen: Dict[int, _Seen] = {}
    skip_inside: set = set()  # paths whose descendants are not looked at
    replacements: List[Tuple[str, nn.Module]] = []
    trainable: List[str] = []  # swapped layers that were in training mode with trainable weights
    owners = _param_owners(model)
    for path, mod in list(model.named_modules(remove_duplicate=False)):
        if _inside(path, skip_inside):
            continue
        if path in fused_heads and not _is_pyaccel_module(mod):
            skip_inside.add(path)
            continue
        if _is_pyaccel_module(mod):
            skip_inside.add(path)
            if id(mod) in earlier:
                report.entries.append(PatchEntry(path=path, old_type=mod._get_name(),
                                                 reason="already a pyaccel module: left as is (to patch with "
                                                        "other options, patch the original model)"))
            continue
        if is_parametrized(mod):
            # a parametrized module's ParametrizationLists hold its own tensors
            skip_inside.add(f"{path}.parametrizations" if path else "parametrizations")
        first = seen.get(id(mod))
        if first is None and path in chain_reasons:
            first = seen[id(mod)] = _Seen(path, chain_reasons[path])
        if first is None:
            plan = _plan(mod, ctx)
            if plan is None:
                continue
            first = seen[id(mod)] = _Seen(path, plan)
        entry = PatchEntry(path=path, old_type=mod._get_name(),
                           shared_with=first.path if first.path != path else None)
        report.entries.append(entry)
        if isinstance(first.plan, str):
            # advice to quantize does not hold for a tied weight (it stays as is whatever
            # the options): say that instead
            tied = _tied_reason(mod, path, owners) if "quantize='int8'" in first.plan else None
            entry.reason = tied or first.plan
            continue
        try:
            why = selection_reason(mod, path, include, exclude, filter_fn)
        except Exception as exc:  # a filter written for nn.Linear meeting another kind of layer
            why = f"filter_fn raised {type(exc).__name__}: {exc}; left as is"
        if why is None:
            why = _tied_reason(mod, path, owners)
        if why is not None:
            entry.reason = why
            continue
        if first.new is None and first.error is None:
            _build(first, mod)
        if first.error is not None:
            entry.reason = first.error
            continue
        new = first.new
        entry.new_type = type(new).__name__
        entry.backend = new.backend() if hasattr(new, "backend") else _cpu_backend(
            next((t.device for t in new.state_dict().values()), torch.device("cpu")))
        notes = getattr(new, "notes", None)
        entry.lossy = first.plan.lossy
        if notes:
            entry.backend += "; " + "; ".join(notes)
        replacements.append((path, new))
        skip_inside.add(path)
        if mod.training and any(p.requires_grad for p in mod.parameters()):
            trainable.append(path or "<root>")
    for path, new in replacements:
        if path == "":
            report.model = new
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
    if binary_handoff:
        from pyaccel import _binary_patch, _pattern

        root = report.model
        by_path = {e.path: e for e in report.entries}
        for src, dst in _binary_patch.link_handoffs(root, _pattern.module_paths_used_elsewhere(root)):
            for p, text in ((src, f"hands packed signs to {dst}"), (dst, f"takes packed signs from {src}")):
                if p in by_path and by_path[p].swapped:
                    by_path[p].backend += "; " + text
    raised = [e for e in report.entries if e.reason and "filter_fn raised" in e.reason]
    if raised:
        warnings.warn(f"patch: filter_fn raised for {len(raised)} module(s), left as they were "
                      f"(first: {raised[0].path or '<root>'}: {raised[0].reason}); filter_fn gets every module a "
                      "handler looks at (nn.Linear, transformers Conv1D, convs, BatchNorms, activations)",
                      UserWarning, stacklevel=2)
    if inplace and report.model is not given and not isinstance(report.model, torch.fx.GraphModule):
        warnings.warn(f"patch: the model is itself a single replaceable module ({given._get_name()}), which "
                      f"cannot be replaced in place: the {type(report.model).__name__} is report.model",
                      UserWarning, stacklevel=2)
    if inplace and isinstance(report.model, torch.fx.GraphModule) and report.model is not given:
        warnings.warn("patch: chains in the model's own forward were fused through torch.fx into a new "
                      "GraphModule; the model passed in has none of those (only fusions inside nn.Sequential "
                      "and single-module swaps happen in place): use report.model", UserWarning, stacklevel=2)
    if trainable:
        warnings.warn(f"patch: {len(trainable)} layer(s) in training mode with trainable weights were swapped "
                      f"({', '.join(trainable[:3])}{', ...' if len(trainable) > 3 else ''}): the inference "
                      "modules hold their weights as buffers (gradients reach the inputs, not the weights); "
                      "train first, then patch", UserWarning, stacklevel=2)
    if act_bits != 8 and not any(isinstance(m, Int8Linear) and m.act_bits == act_bits
                                 for m in report.model.modules()):
        warnings.warn(f"patch: act_bits={act_bits} had no effect: no dense Int8Linear was built (it applies to "
                      "float layers quantized with quantize='int8' and to torch.ao quantized Linear layers)",
                      UserWarning, stacklevel=2)
    return report


# ---- multi-module chains (pyaccel._pattern) --------------------------------------------------
def _chain_plan(match, ctx, counts, include, exclude, filter_fn):
    """(module, lossy) replacing a matched chain, or the reason it stays."""
    for e in match.elems:  # the fused module replaces every module of the span: each must be selected
        if e.module is None:
            continue
        try:
            why = selection_reason(e.module, e.path, include, exclude, filter_fn)
        except Exception as exc:
            why = f"filter_fn raised {type(exc).__name__}: {exc}; left as is"
        if why is not None:
            return why if e is match.head else f"{e.path} ({type(e.module).__name__}) in the chain: {why}"
        if e.module.training:
            return (f"{e.path} ({type(e.module).__name__}) is in training mode: the fused module has no "
                    "trainable parameters; call model.eval() before patching")
    for e in match.elems:
        if e.module is None:
            continue
        if counts.get(id(e.module), 1) > 1:
            return f"{e.path} ({type(e.module).__name__}) is shared with another path: not fused"
        lost = _lost_hooks(e.module)
        if lost:
            return f"{e.path}: {lost}"
    try:
        return match.pattern.build(match.by_slot, ctx)
    except Exception as exc:  # a bad layer never stops the others
        return f"not convertible ({type(exc).__name__}): {exc}"


def _chain_entry(match, new, lossy) -> PatchEntry:
    paths = [e.path for e in match.elems if e.module is not None]  # functional steps (fx) have no path
    entry = PatchEntry(path=match.head.path, old_type="+".join(e.describe() for e in match.elems),
                       new_type=type(new).__name__, lossy=lossy, span=paths)
    entry.backend = new.backend() if hasattr(new, "backend") else _cpu_backend(torch.device("cpu"))
    notes = getattr(new, "notes", None)
    if notes:
        entry.backend += "; " + "; ".join(notes)
    return entry


def _fuse_matches(report, matches, sel, reasons, apply, note="") -> List[str]:
    """Build and apply each match's replacement (apply(k, match, new)); add a
    report entry per fused chain, the reason for the others; return the fused heads' paths."""
    ctx, counts, include, exclude, filter_fn = sel
    fused = []
    for k, m in enumerate(matches):
        plan = _chain_plan(m, ctx, counts, include, exclude, filter_fn)
        if isinstance(plan, str):
            reasons[m.head.path] = plan
            continue
        new, lossy = plan
        new.train(m.head.module.training)
        apply(k, m, new)
        entry = _chain_entry(m, new, lossy)
        entry.backend += note
        report.entries.append(entry)
        fused.append(m.head.path)
    return fused


def _pattern_pass(report: PatchReport, ctx: _Context, include, exclude, filter_fn) -> Dict[str, str]:
    """Fuse registered chains in report.model: Sequential runs in place, then
    torch.fx for heads left (report.model becomes the GraphModule if fx fused
    any). Returns {head path: reason} for heads that stay."""
    from pyaccel import _pattern

    if not _pattern.patterns():
        return {}
    model = report.model
    counts = _pattern.module_paths_used_elsewhere(model)
    matches, reasons = _pattern.find_sequential_matches(model)
    sel = (ctx, counts, include, exclude, filter_fn)
    done = set(_fuse_matches(report, matches, sel, reasons,
                             lambda k, m, new: _pattern.apply_sequential_match(model, m, new)))
    # heads not inside a Sequential chain: try torch.fx on the whole model
    heads = [(p, mod) for p, mod in model.named_modules() if p not in done and p not in reasons and any(
        pat.fx_ok and pat.standalone and pat.slots[0].accepts(_pattern.Elem(module=mod, path=p)) is True
        for pat in _pattern.patterns())]
    if not heads:
        return reasons
    lost = _pattern.fx_lost_hooks(model)
    if lost:
        for p, _ in heads:
            reasons[p] = f"not in an nn.Sequential chain, and fusing through torch.fx would drop {lost}"
        return reasons
    try:
        gm = _pattern.fx_trace(model)
    except Exception as exc:
        for p, _ in heads:
            reasons[p] = (f"not in an nn.Sequential chain, and torch.fx cannot trace the model "
                          f"({type(exc).__name__}: {exc})")
        return reasons
    fx_matches, fx_reasons = _pattern.find_fx_matches(gm)
    fx_matches = [m for m in fx_matches if m.head.path not in done]
    if not any(m.pattern.standalone for m in fx_matches):
        fx_matches = []  # nothing that alone justifies a new GraphModule
    calls: Dict[str, int] = {}  # how often the graph calls each module path
    read = set()  # module paths whose attributes the graph reads (get_attr: self.dw.bias)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            parts = node.target.split(".")
            read.update(".".join(parts[:i]) for i in range(1, len(parts)))

    renamed: Dict[str, str] = {}

    def where(k, m):
        # The fused module takes its head's path in the GraphModule (so report paths resolve
        # there, and its state_dict keys start with the head's path), unless the forward also
        # calls the head from another place or reads its attributes: the original module
        # stays at its path for those.
        if calls.get(m.head.path) == 1 and m.head.path not in read:
            return m.head.path
        renamed[m.head.path] = f"pyaccel_fused_{k}_" + m.head.path.replace(".", "_")
        return renamed[m.head.path]

    n_entries = len(report.entries)
    fused = _fuse_matches(report, fx_matches, sel, reasons,
                          lambda k, m, new: _pattern.apply_fx_match(gm, m, new, where(k, m)),
                          note="; via torch.fx (report.model is a new GraphModule)")
    for entry in report.entries[n_entries:]:
        if entry.swapped and entry.path in renamed:
            entry.backend += (f"; in report.model at {renamed[entry.path]} (the forward also uses "
                              f"{entry.path} elsewhere, which keeps the original there)")
    for p, _ in heads:
        if p not in done and not any(m.head.path == p for m in fx_matches):
            reasons.setdefault(p, fx_reasons.get(p, "not followed by a matching chain"))
    if fused:
        report.model = _pattern.fx_finish(gm)
    return reasons
