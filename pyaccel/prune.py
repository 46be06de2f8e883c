"""Pruning: make models whose weights follow patterns pyaccel accelerates.

    import pyaccel.prune
    pruned = pyaccel.prune.prune_24(model)          # 2:4 masks on every nn.Linear
    ... fine-tune: the masks stay fixed ...
    report = pyaccel.patch(model)                    # swaps in Sparse24Linear

The masks are torch.nn.utils.prune reparametrizations (weight = weight_orig *
weight_mask, recomputed before every forward), so a training loop keeps the
2:4 pattern without any help, and the model stays a plain PyTorch model that
torch's own prune utilities understand (prune.remove makes it permanent).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

from torch import nn
from torch.nn.utils import prune as _torch_prune

from pyaccel.formats.sparse24 import mask_24
from pyaccel.patch import selection_reason

MIN_IN_FEATURES = 8


def prune_24(model: nn.Module, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
             include: Optional[Union[str, Sequence[str]]] = None,
             exclude: Optional[Union[str, Sequence[str]]] = None) -> List[str]:
    """2:4 magnitude pruning of the chosen nn.Linear layers, in place.

    In every group of 4 consecutive input weights of a row the 2 largest |w|
    are kept (ties: the lower position wins; K not divisible by 4: the last
    group is padded with zeros). Layers narrower than 8 inputs are skipped.
    Layers already pruned with torch.nn.utils.prune get the 2:4 mask combined
    with their existing one. Returns the paths of the pruned layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    done = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod.in_features < MIN_IN_FEATURES:
            continue
        if selection_reason(mod, path, include, exclude, filter_fn) is not None:
            continue
        w = mod.weight_orig * mod.weight_mask if hasattr(mod, "weight_mask") else mod.weight
        _torch_prune.custom_from_mask(mod, "weight", mask_24(w.detach()))
        done.append(path)
    return done


def make_permanent(model: nn.Module) -> List[str]:
    """Fold every torch.nn.utils.prune mask into its weight (prune.remove)."""
    done = []
    for path, mod in model.named_modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, _torch_prune.BasePruningMethod):
                _torch_prune.remove(mod, hook._tensor_name)
                done.append(path)
    return done
