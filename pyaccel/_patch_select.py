"""Which modules pyaccel.patch (and the pruning calls) take: the user's
filters (filter_fn, include / exclude fnmatch patterns over module paths)
and weights tied to another module's."""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn


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
