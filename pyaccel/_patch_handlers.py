"""pyaccel.patch's handlers: each takes a module and offers a replacement
(a :class:`Build`) or says why it leaves the module alone; the registry
(:func:`handler`, tried in registration order) and the handlers for
Linear-shaped layers (nn.Linear and transformers Conv1D -- pruned,
parametrized or plain --, torch.ao dynamic Linear, pyaccel's binary layers),
with the block-sparse measurement (:mod:`pyaccel._sparse_choice`)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from pyaccel import _native
from pyaccel._linear_source import (
    LinearSource,
    SourceSkip,
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
from pyaccel._sparse_choice import DENSE, DENSE_INT8, OWN, Baseline
from pyaccel.nn.block_sparse_linear import BlockSparseInt8Linear, BlockSparseLinear
from pyaccel.nn.int8_linear import Int8Linear, _AoDynamicLinear  # (torch.ao's dynamic Linear, or None)
from pyaccel.nn.sparse24_linear import Sparse24Int8Linear, Sparse24Linear

try:  # nn.MultiheadAttention's out_proj class
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _NonDynQLinear
except Exception:  # pragma: no cover
    _NonDynQLinear = None

MIN_SPARSE24_K = 8  # narrower layers are left dense: nothing to gain


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
    quantize="int8", else left as is. On CPU, with enough zero blocks (or a
    torch sparse weight): BlockSparseLinear / BlockSparseInt8Linear instead
    where the speed check takes it (:func:`_block_sparse_or`), or unmeasured
    with block_sparse="always"."""
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
    kept = int(torch.count_nonzero(w))
    # 2:4 keeps at most KEEP of every GROUP inputs: a weight with more non-zeros cannot be 2:4 (is_24 not run)
    is24 = (k >= MIN_SPARSE24_K and kept <= s24.KEEP * -(-k // s24.GROUP) * src.out_features
            and s24.is_24(w))
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
    choices, note = _block_shapes(w, w.numel() - kept, src, plan)
    if not choices:
        if isinstance(plan, str) and src.layout != "strided":
            note += _raises_note(mod, src)
        return plan + note if isinstance(plan, str) else plan
    if ctx.block_sparse == "always":
        cls = BlockSparseInt8Linear if int8 else BlockSparseLinear
        choice = choices[0]
        return Build(lambda: _noted(cls.from_dense(w.float(), b, choice.block),
                                    f"{_found(choice)} (block_sparse='always': not measured)"), lossy=int8)
    # measured at build time (only for the layers the filters select)
    return Build(lambda: _block_sparse_or(plan, mod, src, choices, is24, int8), lossy=int8)


def _own_forward_raises(own: nn.Module, src: LinearSource) -> Optional[str]:
    """The name of the exception the layer's forward (`own`, run as inference)
    raises on one row of zeros, or None: torch has no CPU kernel for some
    sparse layouts and dtypes (bfloat16 or non-square-block BSR, COO)."""
    try:
        with torch.no_grad():
            own(torch.zeros(1, src.in_features, dtype=src.weight.dtype))
    except Exception as exc:
        return type(exc).__name__
    return None


def _raises_note(mod: nn.Module, src: LinearSource) -> str:
    """For a layer with a torch sparse weight that patch leaves as is: a note
    when its own forward raises, else ''."""
    with inference_forward(mod) as own:
        raised = _own_forward_raises(own, src)
    return ("" if raised is None else f"; its own forward raises {raised} (torch has no CPU kernel for this "
            f"{src.layout} weight): make the weight dense (.to_dense()) to run it")


def _block_shapes(w: torch.Tensor, zeros: int, src: LinearSource, plan: Union[Build, str]):
    """(the block shapes to measure -- rule steps 1-2 of pyaccel._sparse_choice
    --, a note for a layer left as is when there are none: its most zero
    blocks, under the minimum); zeros: w's zero entries."""
    # a layer left as it is keeps a sparse weight on torch's sparse kernels: measured whatever its zero blocks
    minimum = 0.0 if isinstance(plan, str) and src.layout != "strided" else _sparse_choice.MIN_ZERO_BLOCKS
    if not _sparse_choice.any_could_reach(w.shape, zeros, minimum):
        return [], ""  # a dense weight, or one with a few stray zeros: not scored
    nz = _sparse_choice.nonzero_map(w)
    # the shape of a BSR weight and the one the zeros tile (prune_blocks') are scored with the candidates
    tiling = (_sparse_choice.tiling_block(w, nonzero=nz)
              if _sparse_choice.tiling_could_reach(w.shape, zeros, minimum) else None)
    hints = [_sparse_choice.usable_hint(src.blocksize), tiling]
    fracs = _sparse_choice.block_fractions(w, _sparse_choice.shapes_with(hints), nonzero=nz)
    choices = _sparse_choice.block_choices(fracs, minimum)
    few = _sparse_choice.most_zero_blocks(fracs)
    if choices or few is None or few.zero_fraction == 0:
        return choices, ""
    return [], (f"; {_found(few)}, under the {_sparse_choice.MIN_ZERO_BLOCKS:.0%} block-sparse minimum")


def _found(choice) -> str:
    return f"{choice.zero_fraction:.0%} zero {choice.block[0]}x{choice.block[1]} blocks"


def _noted(mod: nn.Module, note: str) -> nn.Module:
    mod.notes = list(getattr(mod, "notes", [])) + [note]
    return mod


class Declined(Exception):
    """A Build's make() found the swap not worth making; str(exc) is the reason."""


def _float_baselines(own: nn.Module, src: LinearSource, left_as_is: bool):
    """(runners, Baselines, the exception's name if the layer's own forward
    raises, else None) of a float layer's speed check: dense F.linear on the
    effective weight, and `own`, the layer's forward run as inference, where
    that is something else (rule step 3 of pyaccel._sparse_choice)."""
    w, b = src.weight, None if src.bias is None else src.bias.to(src.weight.dtype)
    runners: Dict[str, Callable] = {DENSE: lambda x: F.linear(x, w, b)}
    if src.forward_steps == "dense F.linear":  # a plain Linear: its own forward is the dense baseline
        return runners, [Baseline(DENSE, "the layer's own forward (dense F.linear)", _sparse_choice.MIN_SPEEDUP)], None
    raised = _own_forward_raises(own, src)
    if raised is not None:
        label = DENSE if left_as_is else f"{DENSE} (the layer's own forward, {src.forward_steps}, raises {raised})"
        return runners, [Baseline(DENSE, label, _sparse_choice.MIN_SPEEDUP)], raised
    runners[OWN] = own
    return runners, [Baseline(OWN, f"{OWN} ({src.forward_steps})", _sparse_choice.MIN_SPEEDUP),
                     Baseline(DENSE, DENSE, 1.0)], None


def _block_sparse_or(fallback: Union[Build, str], mod: nn.Module, src: LinearSource, choices, is24: bool,
                     int8: bool) -> nn.Module:
    """BlockSparseLinear (BlockSparseInt8Linear when quantizing), with the
    faster of the `choices` block shapes, where rule step 3 of
    pyaccel._sparse_choice takes it: at every probe M, x MIN_SPEEDUP over the
    layer's own forward (`mod` run as inference: e.g. torch's sparse F.linear
    for a sparse_bsr weight, a prune mask recomputed each call) and at least
    as fast as dense F.linear -- or x MIN_SPEEDUP over the dense Int8Linear
    when quantizing --, and faster than the 2:4 module for a 2:4 weight;
    whatever the speed where the layer's own forward raises and the layer
    would stay as it is. Else the fallback's module, or Declined with the
    block-sparse finding, which condition failed and the fallback's reason."""
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
            runners = {DENSE_INT8: Int8Linear.from_weights(quantize_weight_per_channel(wf), b)}
            bases, raised = [Baseline(DENSE_INT8, DENSE_INT8, _sparse_choice.MIN_SPEEDUP)], None
        else:
            runners, bases, raised = _float_baselines(own, src, left_as_is=isinstance(fallback, str))
        times = _sparse_choice.measured_times(w, {**runners, **cands})
    rank = bases[-1]  # dense F.linear (dense Int8Linear): the block shapes are ranked by their slower speed-up over it

    def worst(name: str) -> float:
        return min(_sparse_choice.speedups(times, name, rank).values())

    def short(name: str) -> List[str]:
        return _sparse_choice.shortfall(times, name, bases)

    best = max(shapes, key=lambda n: (not short(n), worst(n)))  # ties: the rule's pick

    def measured(name: str) -> str:
        others = [f"{found[o]}: {_sparse_choice.describe_over(times, o, bases, labels=False)}"
                  for o in shapes if o != name]
        return (f"measured {_sparse_choice.describe_over(times, name, bases)}"
                + (f" (also measured {', '.join(others)})" if others else ""))

    if raised is not None and isinstance(fallback, str):
        # a module that computes the layer's function beats one that fails
        new = cands[best]
        new.notes = [f"{found[best]}, the layer's own forward ({src.forward_steps}) raises {raised}: swapped "
                     f"whatever the speed; {measured(best)}"]
        return new
    failed = short(best)
    if not failed and not (is24 and worst("2:4") >= worst(best)):
        new = cands[best]
        new.notes = [f"{found[best]}, {measured(best)}"]
        return new
    needs = " and ".join(f"x{base.need:.2f} over {base.key}" for base in bases)
    why = (f"{found[best]}, block-sparse {measured(best)}: not taken ("
           + (f"{'; '.join(failed)}: it needs {needs} at every measured M)" if failed else
              f"2:4 measured {_sparse_choice.describe(_sparse_choice.speedups(times, '2:4', rank))} over "
              f"{rank.key}, as fast or faster)"))
    if isinstance(fallback, str):
        # the block-sparse finding first: it is why this layer was considered at all
        raise Declined(f"{why}; otherwise {fallback}")
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
