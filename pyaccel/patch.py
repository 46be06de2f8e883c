"""``pyaccel.patch(model)``: swap pyaccel modules into a model and report.

patch walks the model's modules; for each one a small handler (registered with
:func:`handler`) either builds the replacement from the original module or
says why it leaves the module alone. By default patch is lossless: it only
takes modules that are already compressed (torch.ao int8, ...). Lossy steps,
such as quantizing float layers (``quantize="int8"``), happen only on request.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from pyaccel import _native
from pyaccel.formats import sparse24 as s24
from pyaccel.nn.int8_linear import Int8Linear, _AoDynamicLinear
from pyaccel.nn.sparse24_linear import Sparse24Int8Linear, Sparse24Linear, effective_weight

FilterFn = Callable[[nn.Module, str], bool]
QUANTIZE_MODES = (None, "int8")
MIN_SPARSE24_K = 8  # narrower layers are left dense: nothing to gain


@dataclasses.dataclass
class PatchEntry:
    """One module patch looked at: swapped (new_type set) or skipped (reason set)."""

    path: str
    old_type: str
    new_type: Optional[str] = None
    backend: Optional[str] = None
    reason: Optional[str] = None
    lossy: bool = False

    @property
    def swapped(self) -> bool:
        return self.new_type is not None


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did. ``print(report)`` shows a table."""

    model: nn.Module
    entries: List[PatchEntry] = dataclasses.field(default_factory=list)

    @property
    def swapped(self) -> List[PatchEntry]:
        return [e for e in self.entries if e.swapped]

    @property
    def skipped(self) -> List[PatchEntry]:
        return [e for e in self.entries if not e.swapped]

    def __str__(self) -> str:
        head = ("path", "old type", "new type", "backend / reason")
        rows = [(e.path or "<root>", e.old_type, e.new_type or "-",
                 (e.backend + (" (lossy)" if e.lossy else "")) if e.swapped else f"skipped: {e.reason}")
                for e in self.entries]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]  # noqa: E731
        lines = [fmt(head), "  ".join("-" * w for w in widths) + "  " + "-" * 16]
        lines += [fmt(r) for r in rows]
        lines.append(f"{len(self.swapped)} swapped, {len(self.skipped)} skipped")
        return "\n".join(lines)

    __repr__ = __str__


@dataclasses.dataclass
class _Context:
    quantize: Optional[str]


# A handler takes (module, context) and returns a new module, or a string
# saying why it skips the module, or None if the module is not its kind.
_Handler = Callable[[nn.Module, _Context], Union[nn.Module, str, None]]
_HANDLERS: List[_Handler] = []


def handler(fn: _Handler) -> _Handler:
    """Register a patch handler (tried in registration order)."""
    _HANDLERS.append(fn)
    return fn


def _cpu_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu/{_native.selected_isa()}" if _native.available() else "cpu/reference"
    return "cuda/triton" if device.type == "cuda" else f"{device.type}/reference"


@handler
def _torch_ao_dynamic_linear(mod, ctx):
    if _AoDynamicLinear is None or not isinstance(mod, _AoDynamicLinear):
        return None
    try:
        return Int8Linear.from_module(mod)
    except ValueError as exc:
        return f"torch.ao weights not representable: {exc}"


@handler
def _sparse24_linear(mod, ctx):
    """nn.Linear whose weight (or torch prune-masked weight) is already 2:4:
    Sparse24Linear (lossless), or Sparse24Int8Linear with quantize="int8"."""
    if type(mod) is not nn.Linear:
        return None
    w = effective_weight(mod)
    if w.device.type == "meta" or not w.is_floating_point() or w.shape[1] < MIN_SPARSE24_K:
        return None
    if not s24.is_24(w):
        return None
    return Sparse24Int8Linear.from_float(mod) if ctx.quantize == "int8" else Sparse24Linear.from_float(mod)


@handler
def _float_linear(mod, ctx):
    if type(mod) is not nn.Linear:
        if isinstance(mod, nn.Linear):
            return f"subclass {type(mod).__name__} of nn.Linear may change forward(); not swapped"
        return None
    if ctx.quantize != "int8":
        return "dense float Linear (weights not 2:4 sparse): pass quantize='int8' to quantize it (lossy)"
    if mod.weight.device.type == "meta":
        return "weights on the meta device"
    if not mod.weight.is_floating_point():
        return f"weight dtype {mod.weight.dtype} is not floating point"
    return Int8Linear.from_float(mod)


def _matches(path: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _patterns(p: Optional[Union[str, Sequence[str]]]) -> Optional[Sequence[str]]:
    return [p] if isinstance(p, str) else p


def selection_reason(mod: nn.Module, path: str, include, exclude, filter_fn) -> Optional[str]:
    """Why the user's filters leave `mod` out, or None when it is selected."""
    inc, exc = _patterns(include), _patterns(exclude)
    if (inc is not None and not _matches(path, inc)) or (exc is not None and _matches(path, exc)):
        return "excluded by include/exclude patterns"
    if filter_fn is not None and not filter_fn(mod, path):
        return "filtered out by filter_fn"
    return None


def patch(
    model: nn.Module,
    *,
    quantize: Optional[str] = None,
    filter_fn: Optional[FilterFn] = None,
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    inplace: bool = True,
) -> PatchReport:
    """Swap pyaccel kernels into `model`; return a :class:`PatchReport`.

    Args:
        model: any nn.Module.
        quantize: None (lossless swaps only) or "int8" (also quantize float
            nn.Linear layers: per-channel weights, per-token activations).
        filter_fn: ``filter_fn(module, path) -> bool``; modules for which it is
            False are left alone (reported as filtered out).
        include / exclude: fnmatch patterns on module paths ("encoder.*.dense").
        inplace: False deep-copies the model first; ``report.model`` is the copy.

    A module patch replaces keeps its original's device; if the model itself is
    a single replaceable module, ``report.model`` is the replacement.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize: expected one of {QUANTIZE_MODES}, got {quantize!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, path) -> bool, got {type(filter_fn).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    ctx = _Context(quantize=quantize)
    report = PatchReport(model=model)
    replacements = []
    skip_prefixes: List[str] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(mod, (Int8Linear, Sparse24Linear, Sparse24Int8Linear)):
            continue
        result = None
        for h in _HANDLERS:
            try:
                result = h(mod, ctx)
            except (ValueError, TypeError) as exc:  # a layer the kernels cannot take: leave it
                result = f"not convertible: {exc}"
            if result is not None:
                break
        if result is None:
            continue
        entry = PatchEntry(path=path, old_type=mod._get_name())
        report.entries.append(entry)
        why = selection_reason(mod, path, include, exclude, filter_fn)
        if why is not None:
            entry.reason = why
            continue
        if isinstance(result, str):
            entry.reason = result
            continue
        device = next(iter(mod.buffers()), None)
        device = device.device if device is not None else next(
            (p.device for p in mod.parameters()), torch.device("cpu"))
        new = result.to(device) if device.type != "meta" else result
        new.train(mod.training)
        entry.new_type = type(new).__name__
        entry.backend = new.backend() if hasattr(new, "backend") else _cpu_backend(device)
        entry.lossy = isinstance(mod, nn.Linear) and quantize is not None
        notes = getattr(new, "notes", None)
        if notes:
            entry.backend += "; " + "; ".join(notes)
        replacements.append((path, new))
        skip_prefixes.append(path + "." if path else "")
    for path, new in replacements:
        if path == "":
            report.model = new
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
    return report
