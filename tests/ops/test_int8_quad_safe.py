"""The 7-bit AVX2 kernel's quad-safe path (csrc/int8_gemm/qs8_gemm_4x16c4qs_avx2.cpp)
against the exact integer reference.

Facts the grids come from: the path serves act_bits=7 calls of at least 24
rows (9 on layers of >= 4 Mi weights, counted as n * k_pad: kernel_params()["int8_a7"]) on
packings with a quad-safe section, which pack_int8_weight(act_bits=7) builds
at the avx2 level when at most 2 % of the weights become residual entries.
The tile is 4 rows x 16 channels over 64-channel panels and multiplies two k
groups of 4 at a time; a quad is pair p of groups 2j and 2j + 1, k = 8j + 2p +
{0, 1} and 8j + 4 + 2p + {0, 1}; a last group without a partner (k_pad / 4
odd) is not split. A quad's same-sign weights are kept, in k order, while
their magnitudes sum to at most 258 (258 exactly stays whole); u = q + 64
reaches 1 and 127 when |q| = 63, so the extreme quads and activations below
hit the int16 edge of the vpaddw of two vpmaddubsw pair sums (127 * 258 =
32766). The activations are transposed in 16-row blocks, residual sums run 64
rows at a time per 8 channels, threads take row chunks in multiples of 16
from 64 rows a thread. Integer results must match exactly.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import num_threads, on_threads_unguarded, run_unguarded_script
from pyaccel import _native, reference
from pyaccel.formats.int8 import pack_int8_weight

LIMIT = 258
M_GRID = [23, 24, 25, 31, 32, 33, 63, 64, 65, 129]
N_GRID = [1, 8, 16, 17, 63, 64, 65, 130]
# k_pad / 4 odd (a last unsplit group) at 1, 4, 12, 257; whole pairs of groups at 8, 16, 1030
K_GRID = [1, 3, 4, 5, 8, 12, 16, 63, 257, 1030]
# quads (k order: pair p of group 2j, then of group 2j + 1) around the split edge
EDGE_QUADS = [(127, 127, 4, 0), (127, 127, 5, 0), (-127, -127, -4, 0), (-127, -127, -5, 0),
              (127, 127, 127, 127), (-127, -127, -127, -127), (64, 64, 64, 66), (64, 64, 64, 67),
              (127, -127, 127, -127), (1, 127, 127, 3), (1, 127, 127, 4), (-3, -127, -127, -1),
              (100, 100, 58, 0), (100, 100, 59, -127)]


@pytest.fixture
def avx2():
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.isa_supported("avx2"):
        pytest.skip("this CPU lacks avx2")
    with _native.isa_cap("avx2") as used:
        assert used == "avx2"
        yield


def quad_index(k: int) -> torch.Tensor:
    """[quads, 4] k indices of the quads of a row of k weights (whole pairs of
    k groups only), each quad in k order."""
    pairs = (k + 3) // 4 // 2
    j = torch.arange(pairs).repeat_interleave(2)
    p = torch.arange(2).repeat(pairs)
    base = 8 * j + 2 * p
    return torch.stack([base, base + 1, base + 4, base + 5], 1)


def split_quads(w: torch.Tensor) -> torch.Tensor:
    """The residual r = w - s of the quad-safe split (int32 [n, k])."""
    n, k = w.shape
    wp = torch.nn.functional.pad(w.to(torch.int32), (0, (-k) % 8))
    r = torch.zeros_like(wp)
    idx = quad_index(k)
    if idx.numel():
        pos = torch.zeros(n, idx.shape[0], dtype=torch.int32)
        neg = torch.zeros_like(pos)
        for i in range(4):
            v = wp[:, idx[:, i]]
            s = torch.where(v > 0, torch.minimum(v, LIMIT - pos), torch.maximum(v, -LIMIT - neg))
            pos += s.clamp_min(0)
            neg += s.clamp_max(0)
            r[:, idx[:, i]] = v - s
    return r[:, :k]


def expected_entries(w: torch.Tensor) -> int:
    return int((split_quads(w) != 0).sum())


def has_section(packed: torch.Tensor, n: int, k: int) -> bool:
    return packed.numel() > _native.lib().int8_packed_nbytes(n, k)


def pack7(w: torch.Tensor) -> torch.Tensor:
    return pack_int8_weight(w, act_bits=7)


def _quad_entries(quad) -> int:
    w = torch.zeros(1, 8, dtype=torch.int8)
    w[0, [0, 1, 4, 5]] = torch.tensor(quad, dtype=torch.int8)
    return expected_entries(w)


def edge_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """int8 [n, k]: Gaussian values (few quads to split), about 3 % of the
    whole quads replaced by edge quads (the split entries capped at the 2 %
    limit, so the packing keeps its section), +-127 at k = 0 (its quad's other
    members 0)."""
    w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-100, 100).to(torch.int8)
    w[:, 0] = torch.where(torch.arange(n) % 2 == 1, 127, -127).to(torch.int8)
    w[:, [i for i in (1, 4, 5) if i < k]] = 0
    idx = quad_index(k)
    idx = idx[(idx[:, 3] < k) & (idx[:, 0] > 0)]
    if len(idx):
        table = torch.tensor(EDGE_QUADS, dtype=torch.int8)
        cost = torch.tensor([_quad_entries(q) for q in EDGE_QUADS])
        rows, qs = (torch.rand(n, len(idx), generator=gen) < 0.03).nonzero(as_tuple=True)
        choice = torch.randint(len(EDGE_QUADS), (len(rows),), generator=gen)
        keep = torch.cumsum(cost[choice], 0) <= int(0.02 * n * k) - expected_entries(w)
        rows, qs, choice = rows[keep], qs[keep], choice[keep]
        w[rows.unsqueeze(1), idx[qs]] = table[choice]
    return w


def edge_activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 [m, k] of integers whose rows have max |x| = 63, so the 7-bit q = x
    and the scale is 1: mostly +-63 (u = 127 or 1), some random values."""
    x = torch.where(torch.rand(m, k, generator=gen) < 0.7,
                    torch.where(torch.rand(m, k, generator=gen) < 0.5, 63.0, -63.0),
                    torch.randint(-63, 64, (m, k), generator=gen).float())
    x[:, 0] = 63.0
    return x


def run_exact(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.pyaccel.int8_linear(x, w, torch.ones(w.shape[0]), None, packed, 7)


def exact_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return reference.int8_matmul_exact(x.to(torch.int8), w).float()


def test_split_rule_matches_the_packer(avx2):
    """The section's entry count is the split rule's: each edge quad in turn."""
    C = _native.lib()
    n, k = 64, 64
    for quad in EDGE_QUADS:
        w = torch.zeros(n, k, dtype=torch.int8)
        w[3, [2, 3, 6, 7]] = torch.tensor(quad, dtype=torch.int8)  # pair 1 of groups 0 and 1
        w[:, 0] = 1
        e = expected_entries(w)
        want = {(127, 127, 5, 0): 1, (-127, -127, -5, 0): 1, (127, 127, 127, 127): 2, (-127, -127, -127, -127): 2,
                (64, 64, 64, 67): 1, (1, 127, 127, 4): 1, (100, 100, 59, -127): 1}.get(quad, 0)
        assert e == want, quad
        if e:
            section = 64 + (4 * (n + 1) + 8 * e + 63) // 64 * 64 + n * k
            assert C.int8_packed_nbytes_for(w.data_ptr(), k, n, k, 7) == C.int8_packed_nbytes(n, k) + section


@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("n", N_GRID)
def test_quad_safe_exact_grid(avx2, gen, m, n):
    for k in K_GRID:
        w = edge_weight(n, k, gen)
        packed = pack7(w)
        assert has_section(packed, n, k), (n, k)
        x = edge_activations(m, k, gen)
        # scale 1 and |acc| <= 63 * 127 * 1030 < 2**24: y is the exact integer
        y = run_exact(x, w, packed)
        ref = exact_ref(x, w)
        assert torch.equal(y, ref), f"k={k}: first mismatch at {(y - ref).nonzero()[0].tolist()}"


@pytest.mark.parametrize("m", [5, 11, 23])
def test_below_the_row_gate(avx2, gen, m):
    """Fewer rows than the gate run the 7-bit tile on the plain panels: exact too."""
    n, k = 70, 300
    w = edge_weight(n, k, gen)
    packed = pack7(w)
    assert has_section(packed, n, k)
    x = edge_activations(m, k, gen)
    assert torch.equal(run_exact(x, w, packed), exact_ref(x, w))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 10])
def test_huge_layer_rows(avx2, gen, m, threads):
    """Layers of 4 Mi weights take the path from 9 rows, the k-blocked row path
    up to 8 (row_path_rows_huge): exact on both sides, on one and two threads
    (two split 16 panels, one runs all rows in one call)."""
    n, k = 1024, 4096
    params = _native.lib().kernel_params()["int8_a7"]
    assert params["quad_safe_from_rows_huge"] == params["row_path_rows_huge"] + 1 == 9
    assert params["quad_safe_huge_weights"] == params["row_path_huge_weights"] == n * k
    w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-127, 127).to(torch.int8)
    w[:, :8] = torch.tensor([127, 127, 127, 127, 127, 127, 5, 0], dtype=torch.int8)
    packed = pack7(w)
    assert has_section(packed, n, k)
    x = torch.randint(-63, 64, (m, k), generator=gen).float()
    x[:, 0] = 63.0
    with num_threads(threads):
        y = run_exact(x, w, packed)
    assert torch.equal(y.double(), exact_ref(x, w).double())


@pytest.mark.parametrize("section", [True, False])
@pytest.mark.parametrize("m", [4, 6, 7, 8, 9])
def test_huge_layer_rows_odd_shape(avx2, gen, m, section):
    """A >= 4 Mi-weight layer with a partial last panel and k-block (1000 x
    4196), u = 1 and 127 in every row, with a quad-safe section (row path up to
    8 rows, the path from 9) and without one (uniform weights: the row path up
    to 8 rows, the unsplit 4-row tile from 9): exact."""
    n, k = 1000, 4196
    if section:
        w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-127, 127).to(torch.int8)
    else:
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w[:, :4] = torch.tensor([127, -127, 127, -127], dtype=torch.int8)
    packed = pack7(w)
    assert has_section(packed, n, k) == section
    x = torch.randint(-63, 64, (m, k), generator=gen).float()
    x[:, 0], x[:, 1] = 63.0, -63.0
    with num_threads(2):
        y = run_exact(x, w, packed)
    assert torch.equal(y.double(), exact_ref(x, w).double())


@pytest.mark.parametrize("n, k", [(130, 515), (64, 1032), (70, 300)])
def test_quarter_order_and_older_panel_order(avx2, gen, n, k):
    """pack_int8_weight(act_bits=7) writes the quad-safe panels in kPsQuarters
    order (each 16-channel quarter of a panel contiguous, k group by k group);
    a section in NR64K4 order (what older packings hold) still runs: the same
    exact integers at the path's row counts, on one and two threads."""
    C = _native.lib()
    w = (torch.randn(n, k, generator=gen) * 30).round().clamp(-127, 127).to(torch.int8)
    w[:, :8] = torch.tensor([127, 127, 4, 0, 127, -127, 3, 1], dtype=torch.int8)
    packed = pack7(w)
    base = C.int8_packed_nbytes(n, k)
    assert packed.numel() > base
    kind = int(packed[base + 4:base + 8].view(torch.int32))
    f = packed[base + 8:base + 64].view(torch.int64).tolist()
    assert kind == 1 and f[6] == 1  # kPsQuad, kPsQuarters
    n_pad, k_pad = -(-n // 64) * 64, -(-k // 4) * 4
    at = base + f[4]
    quarters = packed[at:at + n_pad * k_pad].view(n_pad // 64, 4, k_pad // 4, 16, 4)
    older = packed.clone()
    older[at:at + n_pad * k_pad] = quarters.permute(0, 2, 1, 3, 4).reshape(-1)
    older[base + 56:base + 64].view(torch.int64)[0] = 0
    assert C.int8_check_packed(older.data_ptr(), older.numel(), n, k) is None
    for threads in (1, 2):
        for m in (24, 25, 40):
            x = torch.randint(-63, 64, (m, k), generator=gen).float()
            x[:, 0], x[:, 1] = 63.0, -63.0
            want = exact_ref(x, w)
            with num_threads(threads):
                for p in (packed, older):
                    assert torch.equal(run_exact(x, w, p), want), (threads, m)


def test_threshold_decides_the_section(avx2, gen):
    """Gaussian weights get a section; nn.Linear's uniform ones (~13 % of the
    quads to split) do not -- with the same results."""
    n, k = 96, 304
    gauss = (torch.randn(n, k, generator=gen) * 30).round().clamp(-127, 127).to(torch.int8)
    unif = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    assert expected_entries(gauss) <= 0.02 * n * k < expected_entries(unif)
    x = edge_activations(40, k, gen)
    for w, want in ((gauss, True), (unif, False)):
        packed = pack7(w)
        assert has_section(packed, n, k) == want
        assert torch.equal(run_exact(x, w, packed), exact_ref(x, w))


def test_sections_serve_their_own_mode_only(avx2, gen):
    """A quad-safe packing run with 8-bit activations, and a pair-safe one run
    with 7-bit activations, ignore the other mode's section: exact."""
    n, k = 72, 520
    w = edge_weight(n, k, gen)
    quad, pair = pack7(w), pack_int8_weight(w)
    assert has_section(quad, n, k) and has_section(pair, n, k)
    x7 = edge_activations(40, k, gen)
    x8 = x7 * 2.0 + 1.0  # max |x| = 127: the 8-bit q = x
    assert torch.equal(run_exact(x7, w, pair), exact_ref(x7, w))
    y8 = torch.ops.pyaccel.int8_linear(x8, w, torch.ones(n), None, quad, 8)
    assert torch.equal(y8, exact_ref(x8, w))


def test_same_outputs_with_and_without_the_section_and_on_every_isa(avx2, gen):
    """One weight, packed with and without the quad-safe section, run with
    7-bit activations at every level this CPU has: bit-identical fp32 and bf16
    outputs (real scales, bias, rows that are not integers)."""
    C = _native.lib()
    n, k = 130, 515
    w = edge_weight(n, k, gen)
    scale = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=gen)
    plain = torch.empty(C.int8_packed_nbytes(n, k), dtype=torch.uint8)
    C.int8_pack(w.data_ptr(), k, n, k, plain.data_ptr(), plain.numel())
    with_qs = pack7(w)
    assert has_section(with_qs, n, k)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(37, k, generator=gen) * 3).to(dtype)
        outs = {}
        for name in _native.ISA_LADDER:
            if not _native.isa_supported(name):
                continue
            with _native.isa_cap(name):
                for label, p in (("section", with_qs), ("plain", plain), ("own", pack7(w))):
                    outs[(name, label)] = torch.ops.pyaccel.int8_linear(x, w, scale, bias, p, 7)
        first = outs[("avx2", "section")]
        for key, y in outs.items():
            assert torch.equal(y, first), key
        ref = reference.int8_linear(x, w, scale, bias, 63)
        tol = torch.finfo(dtype).eps * ref.abs().float().clamp_min(1e-30)
        assert ((first.float() - ref.float()).abs() <= tol).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_row_passes_and_threads(avx2, gen, threads):
    """K = 4096: ~680 rows a row pass, so 1500 rows run in 3 passes."""
    n, k, m = 72, 4096, 1500
    w = (torch.randn(n, k, generator=gen) * 25).round().clamp(-127, 127).to(torch.int8)
    w[:, :8] = torch.tensor([127, 127, -127, -127, 127, 127, 5, -127], dtype=torch.int8)
    packed = pack7(w)
    assert has_section(packed, n, k)
    x = torch.randint(-63, 64, (m, k), generator=gen).float()
    x[:, 0] = 63.0
    with num_threads(threads):
        y = run_exact(x, w, packed)
    ref = exact_ref(x, w).double()
    assert torch.equal(y.double(), ref.float().double())


AFFINE_M = [127, 128, 129, 191, 200, 257, 390]


@pytest.mark.serial
@pytest.mark.parametrize("m", AFFINE_M)
def test_row_chunks_per_thread(avx2, gen, m):
    """From 64 rows a thread each thread quantizes, transposes and multiplies
    its own chunk: 2 threads, while the late-team guard keeps no window open."""
    n, k = 130, 1030
    w = edge_weight(n, k, gen)
    packed = pack7(w)
    x = edge_activations(m, k, gen)

    def check():
        y = run_exact(x, w, packed)
        ref = exact_ref(x, w)
        assert torch.equal(y, ref), f"first mismatch at {(y - ref).nonzero()[0].tolist()}"

    on_threads_unguarded(2, check)


def test_row_chunks_more_threads_than_cores(avx2, tmp_path):
    """3 and 4 threads, in a process with the late-team guard off."""
    run_unguarded_script("""
        import torch
        from pyaccel import _native
        from _helpers import num_threads
        import test_int8_quad_safe as t
        with _native.isa_cap("avx2"):
            gen = torch.Generator().manual_seed(11)
            w = t.edge_weight(130, 1030, gen)
            packed = t.pack7(w)
            for threads in (3, 4):
                for m in t.AFFINE_M:
                    x = t.edge_activations(m, 1030, gen)
                    with num_threads(threads):
                        y = t.run_exact(x, w, packed)
                    assert torch.equal(y, t.exact_ref(x, w)), (threads, m)
        print("ok", _native.lib().late_team_trips())
    """, __file__, tmp_path)


def test_nonfinite_and_tiny_rows(avx2, gen):
    """Rows with inf / NaN give NaN rows, tiny rows are lifted, as on every path."""
    n, k, m = 70, 260, 33
    w = edge_weight(n, k, gen)
    scale = torch.rand(n, generator=gen) + 0.5
    x = torch.randn(m, k, generator=gen)
    x[3, 7] = float("nan")
    x[9, 0] = float("inf")
    x[12] *= 1e-30
    x[13] *= 3e-39  # subnormal inputs
    y = torch.ops.pyaccel.int8_linear(x, w, scale, None, pack7(w), 7)
    ref = reference.int8_linear(x, w, scale, None, 63)
    assert torch.isnan(y[3]).all() and torch.isnan(y[9]).all()
    ok = ~torch.isnan(ref)
    tol = torch.finfo(torch.float32).eps * ref[ok].abs().clamp_min(1e-38)
    assert ((y[ok] - ref[ok]).abs() <= tol).all()


def test_damaged_section_is_refused(avx2, gen):
    C = _native.lib()
    n, k = 64, 64
    w = edge_weight(n, k, gen)
    w[0, [0, 1, 4, 5]] = torch.tensor([127, 127, 127, 127], dtype=torch.int8)
    packed = pack7(w)
    assert has_section(packed, n, k)
    assert C.int8_check_packed(packed.data_ptr(), packed.numel(), n, k) is None
    base = C.int8_packed_nbytes(n, k)
    for at, value in ((base + 4, 2), (base + 4, -1)):  # the kind: pair-safe 0 and quad-safe 1 only
        bad = packed.clone()
        bad[at:at + 4].view(torch.int32)[0] = value
        assert "pair-safe" in C.int8_check_packed(bad.data_ptr(), bad.numel(), n, k)
        with pytest.raises(ValueError, match="packed_weight"):
            run_exact(torch.randn(40, k), w, bad)
    entries = int(packed[base + 8:base + 16].view(torch.int64))
    assert entries > 0
    ek_at = base + 64 + 4 * 65
    for at, value in ((base + 64 + 4, 1 << 30), (ek_at, 64), (ek_at + 4 * entries, 1 << 16)):
        bad = packed.clone()
        bad[at:at + 4].view(torch.int32)[0] = value
        with pytest.raises(ValueError, match="pair-safe"):
            run_exact(torch.randn(40, k), w, bad)


def test_module_packs_the_section_of_its_mode(avx2, gen):
    """Int8Linear(act_bits=7) packs a quad-safe section and says so; switching
    the mode repacks with the other mode's section."""
    from pyaccel.nn import Int8Linear

    lin = torch.nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=gen)
    m7 = Int8Linear.from_float(lin, act_bits=7)
    assert has_section(m7._packed, 128, 256)
    assert "quad-safe qs8_gemm_4x16c4qs_avx2 from 24 rows" in m7.backend()
    ws = m7.weight_int8.clone()
    quad = m7._packed.clone()
    m7.act_bits = 8
    assert "pair-safe" in m7.backend() and not torch.equal(m7._packed, quad)
    m7.act_bits = 7
    assert torch.equal(m7._packed, quad)
    assert torch.equal(m7.weight_int8, ws)
    x = torch.randn(40, 256, generator=gen)
    with torch.no_grad():
        ref = reference.int8_linear(x, m7.weight_int8, m7.weight_scale, m7.bias, 63)
        assert torch.equal(m7(x), torch.ops.pyaccel.int8_linear(x, m7.weight_int8, m7.weight_scale, m7.bias, None, 7))
    tol = torch.finfo(torch.float32).eps * ref.abs().clamp_min(1e-30) * 4
    assert ((m7(x).detach() - ref).abs() <= tol).all()
    assert "unsplit tile: splitting these weights would leave more than 2% residual entries" in \
        Int8Linear.from_float(torch.nn.Linear(300, 96), act_bits=7).backend()


@settings(max_examples=40, deadline=None)
@given(m=st.integers(24, 90), n=st.integers(1, 140), k=st.integers(1, 600),
       frac=st.floats(0.0, 0.05), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k, frac, seed):
    if not _native.available() or not _native.isa_supported("avx2"):
        pytest.skip("needs the native library and avx2")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 25).round().clamp(-127, 127).to(torch.int8)
    pick = torch.rand(n, k, generator=g) < frac
    w[pick] = torch.where(torch.rand(int(pick.sum()), generator=g) < 0.5, 127, -127).to(torch.int8)
    x = torch.randint(-63, 64, (m, k), generator=g).float()
    x[:, 0] = 63.0
    with _native.isa_cap("avx2"):
        packed = pack7(w)
        assert has_section(packed, n, k) == (expected_entries(w) <= 0.02 * n * k)
        y = run_exact(x, w, packed)
    assert torch.equal(y, exact_ref(x, w))
