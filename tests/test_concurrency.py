"""Modules called from several Python threads at once (the native calls run
without the GIL, each with its own OpenMP team): every result must equal the
one computed alone -- the kernels keep their scratch per calling thread."""
import threading

import pytest
import torch
from torch import nn

from pyaccel import _native
from pyaccel.formats import sparse24 as s24
from pyaccel.nn import Int8Linear, Sparse24Int8Linear, Sparse24Linear

pytestmark = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


def test_concurrent_calls_match_serial(gen):
    lin = nn.Linear(200, 72)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    mods = [Int8Linear.from_float(lin), Sparse24Linear.from_dense(lin.weight.detach(), lin.bias.detach()),
            Sparse24Int8Linear.from_float(lin)]
    # 3 rows: row tiles; 64 rows: the 2:4 column kernel (transposed-x scratch)
    xs = [torch.randn(m, 200, generator=gen) for m in (3, 64, 3, 64)]
    want = [[mod(x) for x in xs] for mod in mods]
    errors = []

    def worker(seed):
        try:
            for it in range(15):
                i = (seed + it) % len(xs)
                for mod, w in zip(mods, want):
                    y = mod(xs[i])
                    if not torch.equal(y, w[i]):
                        errors.append((type(mod).__name__, i, (y - w[i]).abs().max().item()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
