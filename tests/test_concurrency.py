"""Modules called from several Python threads at once (the native calls run
without the GIL, each with its own OpenMP team): every result must equal the
one computed alone -- the kernels keep their scratch per calling thread."""
import os
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


def _switching_module(n):
    """A 2:4 int8 n x n layer under a cap whose 2:4 int8 kernel switches to
    dense int8 past some row count (the caller holds the cap); skips where
    none does."""
    if _native.lib().s24i8_dense_from_rows() == 0:
        pytest.skip("no 2:4 int8 kernel here switches to dense (this CPU lacks AVX-512 VNNI and AVX-VNNI)")
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    return Sparse24Int8Linear.from_float(lin)


def test_first_dense_switch_from_several_threads_at_once(gen):
    """Several threads make a fresh 2:4 int8 module's first call past its
    kernel's switch point at once: each may build a dense int8 plan while
    another runs the one already attached (the native forward keeps the plan
    it runs alive); every result equals the single-threaded one."""
    with _native.isa_cap("avx_vnni"):
        base = _switching_module(1024)
        x = torch.randn(5, 1024, generator=gen)  # inside the switch window (avx_vnni, 1 Mi weights: 2 - 7 rows)
        ref = base(x).clone()
        import copy

        wrong = []
        for _ in range(8):
            mod = copy.deepcopy(base)
            assert mod._dense is None

            def work():
                for _ in range(4):
                    if not torch.equal(mod(x), ref):
                        wrong.append(1)

            ts = [threading.Thread(target=work) for _ in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert mod._plan.dense is mod._dense[0]
        assert not wrong


def test_replacing_the_dense_plan_while_it_runs(gen):
    """plan.dense replaced (the old one dropped by everything else) while
    another thread runs forward through it: no crash, every result right."""
    import time

    from pyaccel.formats.int8 import pack_int8_weight

    with _native.isa_cap("avx_vnni"):
        mod = _switching_module(1024)
        x = torch.randn(5, 1024, generator=gen)  # rows where dense wins (avx_vnni, under 4 Mi weights: 2 - 7)
        assert _native.lib().s24i8_dense_wins(5, 1024, 1024)
        ref = mod(x).clone()
        plan = mod._plan
        mod._dense = None  # only plan.dense holds it now

        def fresh():
            p = mod._make_plan("int8", pack_int8_weight(mod.dense_int8_weight()), mod.weight_scale)
            p.max_rows = 1 << 62
            return p

        stop, wrong, runs = [], [], []

        def runner():
            while not stop:
                y = plan.forward(x)
                runs.append(1)
                if not torch.equal(y, ref):
                    wrong.append(1)

        t = threading.Thread(target=runner)
        t.start()
        end = time.time() + 1.5
        while time.time() < end:
            plan.dense = fresh()
        stop.append(1)
        t.join()
        assert runs and not wrong


@pytest.mark.serial
def test_one_late_team_never_trips_the_guard(tmp_path):
    """The late-team guard counts teams, not threads: one call whose team of
    16 threads (on fewer cores) starts late opens no window by itself."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from pyaccel import _native
        from pyaccel.formats.int8 import pack_int8_weight
        C = _native.lib()
        w = torch.randint(-127, 128, (2048, 2048), dtype=torch.int8)
        p = pack_int8_weight(w)
        q = torch.randint(-127, 128, (64, 2048), dtype=torch.int8)
        y = torch.empty(64, 2048); om, on = torch.ones(64), torch.ones(2048)
        C.int8_gemm_prequantized(q.data_ptr(), 2048, om.data_ptr(), 64, 2048, p.data_ptr(), p.numel(), 2048,
                                 on.data_ptr(), 0, y.data_ptr(), 2048, False, 16)
        print(C.late_team_trips())
    """)
    env = dict(os.environ, PYACCEL_LATE_TEAM_GUARD="1")  # on, whatever the test run set
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
