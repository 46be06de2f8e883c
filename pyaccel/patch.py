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
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from pyaccel import ops
from pyaccel._linear_source import deepcopy_model
from pyaccel import _dws_pattern  # noqa: F401  (registers the depthwise -> pointwise chain)
from pyaccel._patch_handlers import (  # noqa: F401  (handler, Build: registering a handler)
    BLOCK_SPARSE_MODES,
    Build,
    Declined,
    _Context,
    _cpu_backend,
    _lost_hooks,
    _plan,
    handler,
)
from pyaccel._patch_report import PatchEntry, PatchReport
from pyaccel.nn.int8_linear import Int8Linear
from pyaccel._patch_select import (
    _inside,
    _is_pyaccel_module,
    _param_owners,
    _tied_reason,
    _warn_unmatched_include,
    check_selection_args,
    selection_reason,
    tied_owner,
)

FilterFn = Callable[[nn.Module, str], bool]
QUANTIZE_MODES = (None, "int8")


@dataclasses.dataclass
class _Seen:
    """What patch decided for one module object (at its first path)."""

    path: str
    plan: Union[Build, str]
    new: Optional[nn.Module] = None  # built replacement (once, shared by every path)
    error: Optional[str] = None  # why building it failed


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
        include / exclude: fnmatch patterns on module paths ("encoder.*.dense");
            UserWarning for an include pattern that matches no path.
        inplace: False deep-copies the model first; ``report.model`` is the copy.
        block_sparse: for Linear layers with >= 30 % zero blocks (and, not
            quantized and not 2:4, those whose weight is a torch sparse tensor,
            e.g. from ``to_sparse_bsr``, whatever its zero blocks): "measure"
            (default: swap to BlockSparseLinear only where, on the real
            shape at M = 1 and 64, it measures >= 1.15x faster than the
            layer's own forward -- torch's sparse F.linear for a sparse
            weight, a prune mask recomputed each call -- and at least as
            fast as dense F.linear, or >= 1.15x faster than dense Int8Linear
            with quantize="int8"; whatever its speed where the layer's own
            forward raises; pyaccel._sparse_choice; timing-dependent on a
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
