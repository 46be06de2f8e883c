"""Pruning: make models whose weights follow patterns pyaccel accelerates.

    import pyaccel.prune
    pruned = pyaccel.prune.prune_24(model)          # 2:4 masks on every Linear / Conv1D
    pruned = pyaccel.prune.prune_blocks(model, 0.9, block=(32, 32))  # or: zero 90 % of 32x32 blocks
    ... fine-tune: the masks stay fixed ...
    report = pyaccel.patch(model)                    # swaps in Sparse24Linear / BlockSparseLinear

The masks are torch.nn.utils.prune reparametrizations (weight = weight_orig *
weight_mask, recomputed before every forward), so a training loop keeps the
2:4 pattern without any help, and the model stays a plain PyTorch model that
torch's own prune utilities understand (prune.remove makes it permanent).
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import nn
from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils import prune as _torch_prune

from pyaccel._linear_source import hf_conv1d_type, module_hooks, read_tensor
from pyaccel.formats.sparse24 import mask_24
from pyaccel._patch_select import (_param_owners, _warn_unmatched_include, check_selection_args, selection_reason,
                                   tied_owner)

MIN_IN_FEATURES = 8

try:  # nn.MultiheadAttention's out_proj class: MHA reads its weight directly
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _NonDynQLinear
except Exception:  # pragma: no cover
    _NonDynQLinear = None


def _layer_kind(mod: nn.Module) -> Optional[str]:
    """"Linear" for nn.Linear and its subclasses (except MultiheadAttention's
    out_proj: its forward, hence a prune hook, never runs), "Conv1D" for
    transformers' Conv1D (weight [in, out]) and its subclasses, else None."""
    if isinstance(mod, nn.Linear):
        return None if _NonDynQLinear is not None and type(mod) is _NonDynQLinear else "Linear"
    conv1d = hf_conv1d_type()
    return "Conv1D" if conv1d is not None and isinstance(mod, conv1d) else None


def _check_prunable(mod: nn.Module, path: str, what_call: str = "prune_24") -> None:
    """ValueError unless torch.nn.utils.prune can (re)prune mod.weight."""
    hook = module_hooks(mod)[0].get("weight")
    if isinstance(hook, _torch_prune.BasePruningMethod):
        return
    if hook is not None:
        what = f"recomputed by a {type(hook).__name__} hook"
    elif _parametrize.is_parametrized(mod, "weight"):
        what = "parametrized (torch.nn.utils.parametrize)"
    elif not isinstance(mod._parameters.get("weight"), nn.Parameter):
        what = "not a registered parameter"
    else:
        return
    raise ValueError(f"{what_call}: {path or '<root>'} ({type(mod).__name__}): its weight is {what}, which "
                     "torch.nn.utils.prune cannot prune; exclude the layer or remove that first")


def _choose(model, filter_fn, include, exclude, min_in: int, what: str) -> List[Tuple[str, nn.Module, str]]:
    """The layers a pruning call takes (first path of each; ValueError, before
    anything is pruned, for a chosen layer torch's prune cannot take)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    include, exclude = check_selection_args(filter_fn, include, exclude)
    _warn_unmatched_include(model, include, what, stacklevel=4)
    chosen: List[Tuple[str, nn.Module, str]] = []
    seen = set()
    owners = _param_owners(model)
    for path, mod in model.named_modules():
        kind = _layer_kind(mod)
        if kind is None or id(mod) in seen:
            continue
        n_in = mod.weight_orig.shape[0 if kind == "Conv1D" else 1] if hasattr(mod, "weight_orig") else (
            mod.weight.shape[0 if kind == "Conv1D" else 1])
        if n_in < min_in or selection_reason(mod, path, include, exclude, filter_fn) is not None:
            continue
        other = tied_owner(mod, path, owners)
        if other is not None:  # GPT-2's lm_head and wte: the mask would reach the embedding once folded
            warnings.warn(f"{what}: {path or '<root>'}'s weight is tied to {other}'s (the same Parameter): "
                          f"make_permanent would zero {other}'s entries too; left unpruned (untie it first, "
                          f"e.g. layer.weight = nn.Parameter(layer.weight.detach().clone()))", UserWarning,
                          stacklevel=3)
            continue
        _check_prunable(mod, path, what)
        seen.add(id(mod))
        chosen.append((path, mod, kind))
    if not chosen:
        warnings.warn(f"{what}: no layer to prune (no nn.Linear / transformers Conv1D layer with at least {min_in} "
                      "inputs passed the selection; pyaccel modules of an earlier patch are not pruned)",
                      UserWarning, stacklevel=3)
    return chosen


def _apply_masks(chosen, mask_of: Callable, check: Optional[Callable] = None) -> List[str]:
    """mask_of(effective weight [out, in]) -> bool mask [out, in], applied as a
    torch prune mask (Conv1D: transposed to its [in, out] weight); check(path,
    weight [out, in]), if given, sees each weight first."""
    for path, mod, kind in chosen:
        w = read_tensor(mod, "weight")
        if kind == "Conv1D":
            w = w.t()
        if check is not None:
            check(path, w)
        mask = mask_of(w)
        if kind == "Conv1D":
            mask = mask.t().contiguous()
        _torch_prune.custom_from_mask(mod, "weight", mask)
    return [path for path, _, _ in chosen]


def prune_24(model: nn.Module, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
             include: Optional[Union[str, Sequence[str]]] = None,
             exclude: Optional[Union[str, Sequence[str]]] = None) -> List[str]:
    """2:4 magnitude pruning of the chosen nn.Linear / transformers Conv1D
    layers, in place (2:4 along in_features: Conv1D's weight [in, out] is
    masked along its first dim).

    In every group of 4 consecutive input weights of an output the 2 largest |w|
    are kept (ties: the lower position wins; in_features not divisible by 4: the
    last group is padded with zeros). Layers narrower than 8 inputs are skipped.
    Magnitudes are those of the weight the layer computes with now (an
    existing torch.nn.utils.prune mask applied; the new mask is combined with
    it). A module found at several paths is pruned once. Returns the paths of
    the pruned layers (first path of each). ValueError, before anything is
    pruned, if a chosen layer's weight cannot be pruned (parametrized, ...).
    UserWarning for a weight tied to another module's (left unpruned: the
    mask would change the other module too), an include pattern that matches
    no module path, and a call that prunes nothing.
    """
    return _apply_masks(_choose(model, filter_fn, include, exclude, MIN_IN_FEATURES, "prune_24"), mask_24)


def prune_blocks(model: nn.Module, sparsity: float, *, block: Tuple[int, int] = (32, 32),
                 filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 include: Optional[Union[str, Sequence[str]]] = None,
                 exclude: Optional[Union[str, Sequence[str]]] = None) -> List[str]:
    """Block magnitude pruning of the chosen nn.Linear / transformers Conv1D
    layers, in place: the weight [out, in] is cut into blocks of
    ``block = (rows, cols)`` (edge blocks padded) and the round(sparsity x
    blocks) blocks of lowest L2 (Frobenius) norm are zeroed, per layer (ties:
    the first block in row-major order goes first). Norms are those of the
    weight the layer computes with now; the mask is a torch.nn.utils.prune
    mask combined with any existing one, so fine-tuning keeps the pattern and
    :func:`make_permanent` folds it. ``pyaccel.patch`` then swaps the layers
    where the block-sparse kernel beats both the layer as it runs (x1.15,
    mask multiply included) and dense F.linear for BlockSparseLinear; it
    finds `block` again from the zeros (the shape they tile, through a few
    kept weights that are exactly 0:
    ``pyaccel._sparse_choice.tiling_block``), also after make_permanent or
    a state_dict round trip, and measures it next to its own candidate
    shapes, so a shape such as (3, 3) is not read as less sparse 1x4
    blocks.

    Args:
        sparsity: fraction of blocks to zero, in [0, 1].
        block: block shape (output rows, input columns), e.g. (32, 32), (16, 16), (1, 4).
    Returns the paths of the pruned layers. ValueError for a bad sparsity or
    block, or (before anything is pruned) a chosen layer torch's prune cannot take;
    UserWarning for a layer with too few blocks to come within 5 points of
    `sparsity` (e.g. 2 blocks at 0.25: none zeroed).
    """
    from pyaccel.formats.block_sparse import block_mask, check_block

    block = check_block(block)
    try:
        frac = float(sparsity)
    except (TypeError, ValueError):
        frac = float("nan")
    if isinstance(sparsity, bool) or not 0.0 <= frac <= 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1], got {sparsity!r}")
    sparsity = frac
    chosen = _choose(model, filter_fn, include, exclude, 1, "prune_blocks")

    def check(path, w):
        blocks = -(-w.shape[0] // block[0]) * -(-w.shape[1] // block[1])
        drop = int(round(sparsity * blocks))
        if abs(drop / blocks - sparsity) > 0.05:
            warnings.warn(f"prune_blocks: {path or 'the model'} has {blocks} blocks of {block[0]}x{block[1]}: "
                          f"sparsity {sparsity:g} zeroes {drop} of them ({drop / blocks:.0%})", UserWarning,
                          stacklevel=4)

    return _apply_masks(chosen, lambda w: block_mask(w, block, sparsity), check)


def make_permanent(model: nn.Module) -> List[str]:
    """Fold every torch.nn.utils.prune mask into its weight (prune.remove).
    Returns the paths folded. A mask on a weight another module holds too
    (tied, e.g. by torch.nn.utils.prune on GPT-2's lm_head) stays a mask, with
    a UserWarning: folding it would write the zeros into that module's weight."""
    done = []
    owners = _param_owners(model)
    for path, mod in model.named_modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, _torch_prune.BasePruningMethod):
                other = tied_owner(mod, path, owners) if hook._tensor_name == "weight" else None
                if other is not None:
                    warnings.warn(f"make_permanent: {path or '<root>'}'s pruned weight is tied to {other}'s (the "
                                  f"same Parameter): folding the mask would zero {other}'s entries too; left as a "
                                  "mask", UserWarning, stacklevel=2)
                    continue
                _torch_prune.remove(mod, hook._tensor_name)
                done.append(path)
    return done
