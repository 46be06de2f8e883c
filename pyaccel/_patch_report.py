"""pyaccel.patch's report: one :class:`PatchEntry` per module (or fused
chain) patch looked at, gathered in a :class:`PatchReport` (exported by
:mod:`pyaccel.patch` and :mod:`pyaccel`)."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from torch import nn


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
