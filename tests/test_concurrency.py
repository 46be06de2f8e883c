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


def test_fewer_threads_than_requested_still_cover_all_work(tmp_path):
    """OpenMP may grant a smaller team than num_threads asks for (nested
    regions, OMP_THREAD_LIMIT): every split must follow the granted team, or
    the missing threads' rows and channels would silently stay unwritten."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch import nn
        from pyaccel import reference
        from pyaccel.formats import sparse24 as s24
        from pyaccel.nn import Int8Linear, Sparse24Int8Linear, Sparse24Linear
        torch.manual_seed(0)
        lin = nn.Linear(1024, 1000)  # big enough that even 1 row is split over threads
        with torch.no_grad():
            lin.weight.mul_(s24.mask_24(lin.weight))
        for mod in (Int8Linear.from_float(lin), Sparse24Linear.from_dense(lin.weight.detach(), lin.bias.detach()),
                    Sparse24Int8Linear.from_float(lin)):
            for m in (1, 3, 64, 200):
                x = torch.randn(m, 1024)
                y = torch.full((m, 1000), float("nan"))
                mod._plan(x.data_ptr(), 1024, False, m, y.data_ptr(), 2)  # ask for 2 threads
                want = mod(x)
                assert torch.isfinite(y).all(), (type(mod).__name__, m)
                assert torch.allclose(y, want, rtol=1e-4, atol=1e-4), (type(mod).__name__, m)
        print("ok")
    """)
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    # run outside the source tree, so that the child imports the installed package
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
