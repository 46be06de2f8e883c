"""The 8-bit AVX2 kernel's pair-safe path (csrc/int8_gemm/qs8_gemm_4x16c4ps_avx2.cpp)
against the exact integer reference.

Facts the grids come from: the path serves calls of more than 4 rows
(kAvx2RowPathRows) on packings with a pair-safe section, which pack_int8_weight
builds at the avx2 level when at most 2 % of the weights become residual
entries; the tile is 4 rows x 16 channels over 64-channel panels, k in groups
of 4 whose vpmaddubsw pairs are (k even, k + 1); the activations are
transposed in 16-row blocks and the residual sums run 64 rows (4 blocks) at a
time per 8 channels; threads take row chunks in multiples of 16; row passes of
~8 MiB. A pair of same-sign weights whose magnitudes sum past 128 is split
(128 exactly stays whole), and u = q + 128 reaches 1 and 255 when |q| = 127:
the extreme pairs and extreme activations below hit every saturation edge of
vpmaddubsw. Integer results must match exactly.
"""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import num_threads, on_threads_unguarded, run_unguarded_script
from pyaccel import _native, reference
from pyaccel.formats.int8 import pack_int8_weight

M_GRID = [5, 6, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 80, 129]
N_GRID = [1, 8, 9, 16, 17, 63, 64, 65, 130]
K_GRID = [1, 2, 3, 4, 5, 63, 255, 257, 1030]
# same-sign pairs around the split edge: sums of 128 stay whole, 129 and more split
EDGE_PAIRS = [(127, 127), (-127, -127), (64, 64), (-64, -64), (65, 64), (-64, -65), (127, 2), (-2, -127),
              (127, 1), (1, 127), (-127, -1), (127, -127), (100, 29), (-100, -28)]


@pytest.fixture
def avx2():
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.isa_supported("avx2"):
        pytest.skip("this CPU lacks avx2")
    with _native.isa_cap("avx2") as used:
        assert used == "avx2"
        yield


def expected_entries(w: torch.Tensor) -> int:
    """Residual entries of the pair-safe split: same-sign pairs (k even, k + 1)
    whose magnitudes sum past 128."""
    w = w.to(torch.int32)
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    a, b = w[:, 0::2], w[:, 1::2]
    return int((((a > 0) & (b > 0) & (a + b > 128)) | ((a < 0) & (b < 0) & (a + b < -128))).sum())


def has_section(packed: torch.Tensor, n: int, k: int) -> bool:
    return packed.numel() > _native.lib().int8_packed_nbytes(n, k)


def edge_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """int8 [n, k]: small Gaussian values (no pair to split), about 1.2 % of
    the pairs replaced by edge pairs, the split ones capped at the 2 % entry
    limit (so the packing keeps its section), +-127 in every row."""
    w = (torch.randn(n, k, generator=gen) * 12).round().clamp(-60, 60).to(torch.int8)
    budget = int(0.02 * n * k)
    for c in range(n):
        for j in range(0, k - 1, 2):
            if torch.rand((), generator=gen) < 0.012:
                a, b = EDGE_PAIRS[int(torch.randint(len(EDGE_PAIRS), (), generator=gen))]
                if a * b > 0 and abs(a + b) > 128:
                    if budget == 0:
                        continue
                    budget -= 1
                w[c, j], w[c, j + 1] = a, b
        pos = int(torch.randint(k, (), generator=gen))
        if w[c, pos] * (1 if c % 2 else -1) < 64:  # +-127 here, without making its pair one to split
            if pos ^ 1 < k:
                w[c, pos ^ 1] = 0
            w[c, pos] = 127 if c % 2 else -127
    return w


def edge_activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 [m, k] of integers whose rows have max |x| = 127, so q = x and the
    scale is 1: mostly +-127 (u = 255 or 1), some random values."""
    x = torch.where(torch.rand(m, k, generator=gen) < 0.7,
                    torch.where(torch.rand(m, k, generator=gen) < 0.5, 127.0, -127.0),
                    torch.randint(-127, 128, (m, k), generator=gen).float())
    x[:, 0] = 127.0
    return x


def run_exact(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    n = w.shape[0]
    return torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, packed)


@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("n", N_GRID)
def test_pair_safe_exact_grid(avx2, gen, m, n):
    for k in K_GRID:
        w = edge_weight(n, k, gen)
        packed = pack_int8_weight(w)
        assert has_section(packed, n, k), (n, k)
        x = edge_activations(m, k, gen)
        # scale 1 and |acc| <= 127 * 127 * 1030 < 2**24: y is the exact integer
        y = run_exact(x, w, packed)
        ref = reference.int8_matmul_exact(x.to(torch.int8), w).float()
        assert torch.equal(y, ref), f"k={k}: first mismatch at {(y - ref).nonzero()[0].tolist()}"


def test_section_holds_one_entry_per_split_pair(avx2, gen):
    """The section's size is what its entry count implies (header, lane table,
    8 bytes an entry, panels), and that count is the split rule's: pairs of
    128 stay whole, 129 split."""
    C = _native.lib()
    n, k = 64, 256
    w = (torch.randn(n, k, generator=gen) * 10).round().clamp(-127, 127).to(torch.int8)
    for i, (a, b) in enumerate(EDGE_PAIRS):
        w[i, 2 * i:2 * i + 2] = torch.tensor([a, b], dtype=torch.int8)
    split = [(a, b) for a, b in EDGE_PAIRS if a * b > 0 and abs(a + b) > 128]
    assert (64, 64) not in split and (127, 1) not in split and (65, 64) in split and (-64, -65) in split
    n_pad, k_pad = 64, 256
    for extra in range(3):
        w[40 + extra, 100:102] = torch.tensor([127, 127], dtype=torch.int8)
        e = expected_entries(w)
        section = 64 + (4 * (n_pad + 1) + 8 * e + 63) // 64 * 64 + n_pad * k_pad
        assert C.int8_packed_nbytes_for(w.data_ptr(), k, n, k) == C.int8_packed_nbytes(n, k) + section


def test_threshold_decides_the_section(avx2, gen):
    """Gaussian weights (few residual entries) get a section; uniformly
    distributed ones (~12 % entries, more than the 2 % limit) do not and run on
    the int16 tile -- with the same results."""
    n, k = 96, 300
    gauss = (torch.randn(n, k, generator=gen) * 30).round().clamp(-127, 127).to(torch.int8)
    unif = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    assert expected_entries(gauss) <= 0.02 * n * k < expected_entries(unif)
    x = edge_activations(20, k, gen)
    for w, want in ((gauss, True), (unif, False)):
        packed = pack_int8_weight(w)
        assert has_section(packed, n, k) == want
        assert torch.equal(run_exact(x, w, packed), reference.int8_matmul_exact(x.to(torch.int8), w).float())


def test_same_outputs_with_and_without_the_section_and_on_every_isa(avx2, gen):
    """One weight, packed with and without a section at avx2 and as every other
    level packs it, run at every level this CPU has: bit-identical fp32 and
    bf16 outputs (real scales, bias, rows that are not integers)."""
    C = _native.lib()
    n, k = 130, 515
    w = edge_weight(n, k, gen)
    scale = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=gen)
    plain = torch.empty(C.int8_packed_nbytes(n, k), dtype=torch.uint8)
    C.int8_pack(w.data_ptr(), k, n, k, plain.data_ptr(), plain.numel())
    with_ps = pack_int8_weight(w)
    assert has_section(with_ps, n, k)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(37, k, generator=gen) * 3).to(dtype)
        for name in _native.ISA_LADDER:
            if not _native.isa_supported(name) or name == "avx512_amx":
                continue
            with _native.isa_cap(name):
                for label, p in (("section", with_ps), ("plain", plain), ("own", pack_int8_weight(w))):
                    outs[(dtype, name, label)] = torch.ops.pyaccel.int8_linear(x, w, scale, bias, p)
        ref = reference.int8_linear(x, w, scale, bias)
        first = outs[(dtype, "avx2", "section")]
        for key, y in outs.items():
            if key[0] == dtype:
                assert torch.equal(y, first), key
        tol = torch.finfo(dtype).eps * ref.abs().float().clamp_min(1e-30)
        assert ((first.float() - ref.float()).abs() <= tol).all()


@pytest.mark.parametrize("m", [1, 2, 4, 5, 6])
def test_big_layer_few_rows(avx2, gen, m):
    """Every layer, either tuning, takes the path from 5 rows (pair_safe_from_rows);
    1 - 4 rows take the k-blocked row path, which streams the weights in
    address order: exact either way, on a layer of >= 4 Mi weights with a
    partial last panel and k-block."""
    params = _native.lib().kernel_params()["int8"]
    assert params["pair_safe_from_rows"] == params["row_path_rows"] + 1 == 5
    # >= 4 Mi weights, a partial last panel (1000 channels) and k-block (4196 inputs)
    n, k = 1000, 4196
    w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-127, 127).to(torch.int8)
    w[:, :8] = torch.tensor([127, 127, -127, -127, 127, 2, -1, -127], dtype=torch.int8)
    packed = pack_int8_weight(w)
    assert has_section(packed, n, k)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, :2] = 127.0
    y = torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, packed)
    assert torch.equal(y.double(), reference.int8_matmul_exact(x.to(torch.int8), w).float().double())


@pytest.mark.parametrize("threads", [1, 2])
def test_row_passes_and_threads(avx2, gen, threads):
    """K = 4096: ~680 rows a row pass, so 1500 rows run in 3 passes; chunks of
    16 rows over 2 threads, a last pass whose row count is no multiple of 16."""
    n, k, m = 72, 4096, 1500
    w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-127, 127).to(torch.int8)
    w[:, :8] = torch.tensor([127, 127, -127, -127, 127, 2, -1, -127], dtype=torch.int8)
    packed = pack_int8_weight(w)
    assert has_section(packed, n, k)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 0] = 127.0
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, packed)
    finally:
        torch.set_num_threads(prev)
    ref = reference.int8_matmul_exact(x.to(torch.int8), w).double()
    # |acc| < 2**31 but beyond 2**24: the fp32 output is the rounded integer
    assert torch.equal(y.double(), ref.float().double())


# From 64 rows a thread, a row pass is cut into one chunk of 16-row blocks per
# thread, each quantized, transposed and multiplied by its own thread (sub-items
# of ~64 rows, the other chunks' leftovers taken last): rows around 64 x threads
# and chunks that are no multiple of 16.
AFFINE_M = [127, 128, 129, 191, 192, 200, 240, 257, 390]


@functools.lru_cache(maxsize=1)
def _affine_weights():
    """One dense and one 2:4 edge weight (130 x 1030) for the row-chunk tests
    (building them takes ~1 s; each test draws its own activations)."""
    gen = torch.Generator().manual_seed(20261201)
    w = edge_weight(130, 1030, gen)
    dense24 = edge_weight_24(130, 1030, gen)
    return w, pack_int8_weight(w), dense24, pack24(dense24)


def _check_row_chunks(x, threads=None):
    """Exact dense and 2:4 int8 results on x (threads: torch's, or this many)."""
    w, packed, dense24, (vals, meta, packed24) = _affine_weights()
    assert has_section(packed, *w.shape) and s24_section(packed24, *dense24.shape)
    run = lambda: (run_exact(x, w, packed), run24(x, dense24, vals, meta, packed24))  # noqa: E731
    if threads is None:
        y, y24 = run()
    else:
        with num_threads(threads):
            y, y24 = run()
    ref = reference.int8_matmul_exact(x.to(torch.int8), w).float()
    assert torch.equal(y, ref), f"first mismatch at {(y - ref).nonzero()[0].tolist()}"
    ref24 = reference.int8_matmul_exact(x.to(torch.int8), dense24).float()
    assert torch.equal(y24, ref24), f"2:4: first mismatch at {(y24 - ref24).nonzero()[0].tolist()}"


@pytest.mark.serial
@pytest.mark.parametrize("m", AFFINE_M)
def test_row_chunks_per_thread(avx2, gen, m):
    """2 threads, while the late-team guard keeps no window open."""
    x = edge_activations(m, 1030, gen)
    on_threads_unguarded(2, lambda: _check_row_chunks(x))


def test_row_chunks_more_threads_than_cores(avx2, tmp_path):
    """3 and 4 threads (on 2 cores here: late threads leave their chunks' items
    to the others), in a process with the late-team guard off."""
    run_unguarded_script("""
        import torch
        from pyaccel import _native
        import test_int8_pair_safe as t
        with _native.isa_cap("avx2"):
            gen = torch.Generator().manual_seed(7)
            for threads in (3, 4):
                for m in t.AFFINE_M:
                    t._check_row_chunks(t.edge_activations(m, 1030, gen), threads)
        print("ok", _native.lib().late_team_trips())
    """, __file__, tmp_path)


def test_nonfinite_and_tiny_rows(avx2, gen):
    """Rows with inf / NaN give NaN rows, tiny rows are lifted, as on every path."""
    n, k, m = 70, 260, 23
    w = edge_weight(n, k, gen)
    scale = torch.rand(n, generator=gen) + 0.5
    x = torch.randn(m, k, generator=gen)
    x[3, 7] = float("nan")
    x[9, 0] = float("inf")
    x[12] *= 1e-30
    x[13] *= 3e-39  # subnormal inputs
    y = torch.ops.pyaccel.int8_linear(x, w, scale, None, pack_int8_weight(w))
    ref = reference.int8_linear(x, w, scale, None)
    assert torch.isnan(y[3]).all() and torch.isnan(y[9]).all()
    ok = ~torch.isnan(ref)
    tol = torch.finfo(torch.float32).eps * ref[ok].abs().clamp_min(1e-38)
    assert ((y[ok] - ref[ok]).abs() <= tol).all()


def test_damaged_section_is_refused(avx2, gen):
    C = _native.lib()
    n, k = 64, 64
    w = edge_weight(n, k, gen)
    packed = pack_int8_weight(w)
    assert has_section(packed, n, k)
    assert C.int8_check_packed(packed.data_ptr(), packed.numel(), n, k) is None
    base = C.int8_packed_nbytes(n, k)
    bad_magic = packed.clone()
    bad_magic[base] ^= 1
    assert "pair-safe" in C.int8_check_packed(bad_magic.data_ptr(), bad_magic.numel(), n, k)
    bad_count = packed.clone()
    bad_count[base + 8] += 1  # entries
    assert "pair-safe" in C.int8_check_packed(bad_count.data_ptr(), bad_count.numel(), n, k)
    short = packed[:-64].clone()
    assert "size" in C.int8_check_packed(short.data_ptr(), short.numel(), n, k)
    # the tables the kernel indexes with: lane (n_pad + 1 int32 after the 64-byte section header), ek, er
    entries = int(packed[base + 8:base + 16].view(torch.int64))
    assert entries > 0
    lane_at, ek_at = base + 64, base + 64 + 4 * 65
    er_at = ek_at + 4 * entries
    for at, value in ((lane_at + 4, 1 << 30), (lane_at, 1), (ek_at, 1 << 28), (ek_at, -1), (er_at, 1 << 16)):
        bad = packed.clone()
        bad[at:at + 4].view(torch.int32)[0] = value
        assert "pair-safe" in C.int8_check_packed(bad.data_ptr(), bad.numel(), n, k), (at, value)
        with pytest.raises(ValueError, match="pair-safe"):
            torch.ops.pyaccel.int8_linear(torch.randn(64, k), w, torch.ones(n), None, bad)
    x = torch.randn(8, k, generator=gen)
    with pytest.raises(ValueError, match="packed_weight"):
        torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, bad_magic)


def _section_header(packed: torch.Tensor, base: int) -> dict:
    """The PsHeader fields (int8_gemm.h) of the section at byte base."""
    f = packed[base + 8:base + 64].view(torch.int64).tolist()
    return dict(kind=int(packed[base + 4:base + 8].view(torch.int32)), entries=f[0], panels_offset=f[4],
                panel_order=f[6])


@pytest.mark.parametrize("n, k", [(130, 515), (64, 1030), (17, 8)])
def test_quarter_order_and_older_panel_order(avx2, gen, n, k):
    """pack_weights writes the pair-safe panels in kPsQuarters order (each
    16-channel quarter of a panel contiguous, k group by k group); a section
    in NR64K4 order (what older packings hold) still runs, with the same
    outputs; any other order is refused."""
    C = _native.lib()
    w = edge_weight(n, k, gen)
    packed = pack_int8_weight(w)
    base = C.int8_packed_nbytes(n, k)
    hdr = _section_header(packed, base)
    assert hdr["panel_order"] == 1 and hdr["kind"] == 0
    n_pad, k_pad = -(-n // 64) * 64, -(-k // 4) * 4
    at = base + hdr["panels_offset"]
    quarters = packed[at:at + n_pad * k_pad].view(n_pad // 64, 4, k_pad // 4, 16, 4)
    # quarter order -> NR64K4: [panel][quarter][group][16 ch][4 k] -> [panel][group][quarter][16 ch][4 k]
    older = packed.clone()
    older[at:at + n_pad * k_pad] = quarters.permute(0, 2, 1, 3, 4).reshape(-1)
    older[base + 56:base + 64].view(torch.int64)[0] = 0
    assert C.int8_check_packed(older.data_ptr(), older.numel(), n, k) is None
    scale = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    for m in (5, 8, 9, 33, 70):
        x = torch.randn(m, k, generator=gen) * 3
        y = torch.ops.pyaccel.int8_linear(x, w, scale, None, packed)
        assert torch.equal(y, torch.ops.pyaccel.int8_linear(x, w, scale, None, older)), m
        x_exact = torch.randint(-127, 128, (m, k), generator=gen).float()
        x_exact[:, 0] = 127.0
        want = reference.int8_matmul_exact(x_exact.to(torch.int8), w).float()
        for p in (packed, older):
            assert torch.equal(torch.ops.pyaccel.int8_linear(x_exact, w, torch.ones(n), None, p), want), m
    for order, kind in ((2, 0), (-1, 0), (2, 1)):
        bad = packed.clone()
        bad[base + 56:base + 64].view(torch.int64)[0] = order
        bad[base + 4:base + 8].view(torch.int32)[0] = kind
        assert "pair-safe" in C.int8_check_packed(bad.data_ptr(), bad.numel(), n, k), (order, kind)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(5, 70), n=st.integers(1, 140), k=st.integers(1, 600),
       frac=st.floats(0.0, 0.04), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k, frac, seed):
    if not _native.available() or not _native.isa_supported("avx2"):
        pytest.skip("needs the native library and avx2")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 20).round().clamp(-127, 127).to(torch.int8)
    pick = torch.rand(n, k, generator=g) < frac
    w[pick] = torch.where(torch.rand(int(pick.sum()), generator=g) < 0.5, 127, -127).to(torch.int8)
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    x[:, 0] = 127.0
    with _native.isa_cap("avx2"):
        packed = pack_int8_weight(w)
        assert has_section(packed, n, k) == (expected_entries(w) <= 0.02 * n * k)
        y = run_exact(x, w, packed)
    assert torch.equal(y, reference.int8_matmul_exact(x.to(torch.int8), w).float())


# ---- 2:4 int8 (csrc/sparse24/qs8_s24_gemm_4x16_avx2.cpp, linear_ps_avx2) --------------
# The pair is a group's two kept values; the path serves calls of >= 16 rows on
# layers under 4 Mi weights and >= 6 from there (ps_min_rows),
# 32-channel panels, quads of 32 inputs, the same 16-row blocks and 64-row
# residual groups.
S24_M_GRID = [16, 17, 32, 33, 41, 47, 63, 64, 65, 100, 129]
S24_NK_GRID = [(1, 4), (31, 5), (32, 32), (33, 33), (64, 255), (65, 64), (130, 1030)]


def edge_weight_24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Dense int8 [n, k] with 2 nonzeros in every group of 4 (a trailing part
    group: up to 2): small values, ~5 % of the groups an edge pair (the split
    ones capped at 8 % of the kept values), and a +-127 in every row."""
    groups = (k + 3) // 4
    dense = torch.zeros(n, groups * 4, dtype=torch.int8)
    budget = int(0.08 * 2 * n * groups)
    for c in range(n):
        for g in range(groups):
            width = min(4, k - 4 * g)
            idx = sorted(torch.randperm(width, generator=gen)[:2].tolist())
            a, b = (int(v) for v in torch.randint(1, 41, (2,), generator=gen) * torch.where(
                torch.rand(2, generator=gen) < 0.5, -1, 1))
            if g == 0:
                a, b = (127, -5) if c % 2 else (-127, 5)
            elif torch.rand((), generator=gen) < 0.05:
                a, b = EDGE_PAIRS[int(torch.randint(len(EDGE_PAIRS), (), generator=gen))]
                if a * b > 0 and abs(a + b) > 128:
                    if budget == 0:
                        continue
                    budget -= 1
            dense[c, 4 * g + idx[0]] = a
            if len(idx) > 1:
                dense[c, 4 * g + idx[1]] = b
    return dense[:, :k].contiguous()


def pack24(dense: torch.Tensor):
    from pyaccel.formats import sparse24 as s24

    sw = s24.compress(dense.float())
    vals, meta = sw.values.to(torch.int8), sw.meta
    return vals, meta, s24.pack_sparse24_int8(vals, meta, dense.shape[1])


def s24_section(packed: torch.Tensor, n: int, k: int) -> bool:
    """Whether the packing has a pair-safe section (it then has the control table too)."""
    ctrl, pair_safe = _native.lib().s24i8_packing_parts(packed.data_ptr(), packed.numel(), n, k)
    assert ctrl or not pair_safe
    return pair_safe


def run24(x, dense, vals, meta, packed, scale=None, bias=None):
    n, k = dense.shape
    return torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, k, torch.ones(n) if scale is None else scale,
                                                  bias, packed)


@pytest.mark.parametrize("m", S24_M_GRID)
@pytest.mark.parametrize("n,k", S24_NK_GRID)
def test_s24_pair_safe_exact_grid(avx2, gen, m, n, k):
    dense = edge_weight_24(n, k, gen)
    vals, meta, packed = pack24(dense)
    assert s24_section(packed, n, k)
    x = edge_activations(m, k, gen)
    y = run24(x, dense, vals, meta, packed)
    ref = reference.int8_matmul_exact(x.to(torch.int8), dense).float()
    assert torch.equal(y, ref), f"first mismatch at {(y - ref).nonzero()[0].tolist()}"


@pytest.mark.parametrize("n,k,m", [(1024, 4096, 5), (1024, 4096, 6), (1024, 4096, 7), (1024, 4096, 33),
                                   (4096, 4096, 5), (4096, 4096, 6), (4096, 4096, 9)])
def test_s24_pair_safe_big_layer_rows(avx2, gen, n, k, m):
    """Layers of 4 Mi weights take the path from 6 rows; fewer rows stay on the
    sign-trick tile: exact on both sides of the switch."""
    dense = (torch.randn(n, k, generator=gen) * 30).round().clamp(-127, 127)
    from pyaccel.formats import sparse24 as s24
    dense = (dense * s24.mask_24(dense)).to(torch.int8)
    dense[:, :4] = torch.tensor([127, 127, 0, 0], dtype=torch.int8)
    vals, meta, packed = pack24(dense)
    assert s24_section(packed, n, k)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 0] = 127.0
    y = run24(x, dense, vals, meta, packed)
    assert torch.equal(y.double(), reference.int8_matmul_exact(x.to(torch.int8), dense).float().double())


def test_s24_same_outputs_with_and_without_the_section(avx2, gen):
    C = _native.lib()
    n, k = 70, 300
    dense = edge_weight_24(n, k, gen)
    vals, meta, with_ps = pack24(dense)
    assert s24_section(with_ps, n, k)
    from pyaccel.formats import sparse24 as s24
    pb = s24.position_bytes(s24.Sparse24Weight(vals, meta, k))
    plain = torch.empty(C.s24i8_packed_nbytes(n, k), dtype=torch.uint8)
    C.s24i8_pack(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k, plain.data_ptr(), plain.numel())
    scale = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(45, k, generator=gen) * 3).to(dtype)
        outs = {}
        for name in _native.ISA_LADDER:
            if not _native.isa_supported(name) or name == "avx512_amx":
                continue
            with _native.isa_cap(name):
                for label, p in (("section", with_ps), ("plain", plain)):
                    outs[(name, label)] = run24(x, dense, vals, meta, p, scale, bias)
        first = outs[("avx2", "section")]
        for key, y in outs.items():
            assert torch.equal(y, first), key
        ref = reference.int8_linear(x, dense, scale, bias)
        tol = torch.finfo(dtype).eps * ref.abs().float().clamp_min(1e-30)
        assert ((first.float() - ref.float()).abs() <= tol).all()


def test_s24_threshold_and_damaged_section(avx2, gen):
    """Values with more than 8 % residual entries get no section; a damaged one is refused."""
    C = _native.lib()
    n, k = 64, 256
    full = torch.full((n, k), 120, dtype=torch.int8)
    full[:, 2::4] = 0
    full[:, 3::4] = 0  # every group keeps (120, 120): one entry per group, 50 % of the values
    _, _, packed = pack24(full)
    assert not s24_section(packed, n, k)
    dense = edge_weight_24(n, k, gen)
    vals, meta, packed = pack24(dense)
    assert s24_section(packed, n, k)
    base = C.s24i8_packed_nbytes_ctrl(n, k)  # the section follows the control table
    bad = packed.clone()
    bad[base] ^= 1
    x = torch.randn(48, k, generator=gen)
    with pytest.raises(ValueError, match="pair-safe"):
        run24(x, dense, vals, meta, bad)
    with pytest.raises(ValueError, match="size"):
        run24(x, dense, vals, meta, packed[:-64].clone())
    entries = int(packed[base + 8:base + 16].view(torch.int64))
    ek_at = base + 64 + 4 * 65
    for at, value in ((base + 64 + 4, 1 << 30), (ek_at, 256), (ek_at + 4 * entries, -1)):
        bad = packed.clone()
        bad[at:at + 4].view(torch.int32)[0] = value
        with pytest.raises(ValueError, match="pair-safe"):
            run24(x, dense, vals, meta, bad)


def test_each_mode_packs_its_own_section(avx2, gen):
    """8-bit modules pack the pair-safe section, 7-bit ones the quad-safe one
    (test_int8_quad_safe.py); switching the mode repacks; the fused conv's int8
    stage reads none, and none is built for it."""
    from pyaccel.nn import Int8Linear

    lin = torch.nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=gen)
    m8, m7 = Int8Linear.from_float(lin), Int8Linear.from_float(lin, act_bits=7)
    pair, quad = m8._packed.clone(), m7._packed.clone()
    assert has_section(pair, 128, 256) and has_section(quad, 128, 256) and not torch.equal(pair, quad)
    m8.act_bits = 7
    assert torch.equal(m8._packed, quad)
    m8.act_bits = 8
    assert torch.equal(m8._packed, pair)
    assert not has_section(pack_int8_weight(m8.weight_int8, pair_safe=False), 128, 256)


def test_modules_say_when_they_run_pair_safe(avx2, gen):
    """backend() names the pair-safe path where the packing has a section, and only there."""
    from pyaccel.formats import sparse24 as s24
    from pyaccel.nn import Int8Linear, Sparse24Int8Linear

    lin = torch.nn.Linear(300, 96)
    # nn.Linear's uniform init: ~12 % entries, no section, and the reason said
    b = Int8Linear.from_float(lin).backend()
    assert "int16 tile: splitting these weights would leave more than 2% residual entries" in b
    assert "pair-safe" not in b
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=gen)
    mod = Int8Linear.from_float(lin)
    assert "pair-safe qs8_gemm_4x16c4ps_avx2 from 5 rows" in mod.backend()
    huge = torch.nn.Linear(4096, 1024)
    with torch.no_grad():
        huge.weight.normal_(0.0, 0.02, generator=gen)
    assert "pair-safe qs8_gemm_4x16c4ps_avx2 from 5 rows" in Int8Linear.from_float(huge).backend()
    q7 = Int8Linear.from_float(huge, act_bits=7).backend()
    assert "quad-safe qs8_gemm_4x16c4qs_avx2 from 9 rows" in q7, q7
    if _native.isa_supported("avx512_vnni"):  # packed at another level: the int16 tile, and why
        with _native.isa_cap("avx512_vnni"):
            other = Int8Linear.from_float(lin)
        assert "int16 tile: packed at another ISA level" in other.backend()
    assert _native.lib().kernel_params()["int8"]["pair_safe_max_entry_fraction"] == 0.02
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    assert "pair-safe values from 16 rows" in Sparse24Int8Linear.from_float(lin).backend()
    flat = torch.nn.Linear(300, 96)
    flat.weight.data = torch.where(torch.arange(300) % 4 < 2, 1.0, 0.0).expand(96, 300).clone()
    assert "sign-trick tile: splitting these values would leave more than 8%" in \
        Sparse24Int8Linear.from_float(flat).backend()
    x = torch.randn(7, 300, generator=gen)
    ref = reference.int8_linear(x, mod.weight_int8, mod.weight_scale, mod.bias)
    assert ((mod(x) - ref).abs() <= torch.finfo(torch.float32).eps * ref.abs()).all()


def test_isa_cap_change_repacks_with_or_without_the_section(gen):
    """A module packed at another level gets the section at its next call at
    avx2 (and drops it back there), on the native fast path and the Python one;
    outputs identical throughout."""
    if not _native.available() or not _native.isa_supported("avx2") or not _native.isa_supported("avx512_vnni"):
        pytest.skip("needs the native library, avx2 and avx512_vnni")
    from pyaccel.formats import sparse24 as s24
    from pyaccel.nn import Int8Linear, Sparse24Int8Linear

    lin = torch.nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(48, 256, generator=gen)
    with _native.isa_cap("avx512_vnni"):
        mod = Int8Linear.from_float(lin)
        y0 = mod(x)
    assert not has_section(mod._packed, 128, 256)
    with _native.isa_cap("avx2"):
        assert "int16 tile: packed at another ISA level" in mod.backend()
        y1 = mod(x)
        assert has_section(mod._packed, 128, 256) and "pair-safe" in mod.backend()
        y2 = mod(x.t().contiguous().t())  # column-strided: the Python path
    with _native.isa_cap("avx512_vnni"):
        y3 = mod(x)
        assert not has_section(mod._packed, 128, 256)
    assert torch.equal(y0, y1) and torch.equal(y0, y2) and torch.equal(y0, y3)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    with _native.isa_cap("avx512_vnni"):
        sp = Sparse24Int8Linear.from_float(lin)
        z0 = sp(x)
    with _native.isa_cap("avx2"):
        z1 = sp(x)
        assert s24_section(sp._packed, 128, 256)
    assert torch.equal(z0, z1)
