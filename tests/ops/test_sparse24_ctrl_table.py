"""The 2:4 int8 AVX2 and AVX-VNNI kernels' control table (csrc/sparse24/sparse24_int8.h,
layout 5) against its documented layout and the exact integer reference.

Facts the grids come from: the packers add the table where the AVX2 or
the AVX-VNNI kernel is selected; panels of 32 channels in two halves of 16, whose octets 2h and
2h + 1 share 32 bytes (low and high nibbles); quads of 4 pairs of groups (32
inputs). The kernel reads the table at one row (the one-row path), in its
k-blocked row path at 2 - 4 rows (avx2) / 2 - 6 rows (avx_vnni: k-blocks of 3
quads, passes of 2 rows and one of 1 at odd counts, so K = 72 is one block,
300 three and a part, 1030 eleven), in its 4 x 16 tiles above those, in the
AVX-VNNI level's 12 x 8 octet tiles from 12 rows
and on the pair-safe path (from 32 rows on layers under 4 Mi weights);
packings without a table (layout 4, e.g. made at another ISA level) are
decoded per call into the same form. Every combination must give the same
integers as the reference.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import num_threads
from pyaccel import _native, reference
from pyaccel.formats import sparse24 as s24

M_GRID = [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 31, 32, 33]  # the row paths end at 4 (avx2) and 6 (avx_vnni) rows
NK_GRID = [(1, 4), (8, 33), (17, 64), (40, 72), (70, 300), (33, 1030)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def needs(level: str):
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.isa_supported(level):
        pytest.skip(f"this CPU lacks {level}")


def weight_24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """int8 [n, k], 2 random nonzeros in [-127, 127] in every group of 4 (some
    pairs past the pair-safe split edge), a +-127 in every row."""
    groups = (k + 3) // 4
    w = torch.randint(-127, 128, (n, groups * 4), generator=gen).float()
    w[w == 0] = 1
    keep = torch.rand(n, groups, 4, generator=gen).argsort(dim=2)[:, :, :2]
    mask = torch.zeros(n, groups, 4).scatter_(2, keep, 1.0).view(n, -1)
    w = (w * mask)[:, :k]
    w[:, 0] = torch.where(torch.arange(n) % 2 == 0, 127.0, -127.0)
    if k > 1:
        w[:, 1] = 0
    if k > 2:
        w[:, 2] = 5
    if k > 3:
        w[:, 3] = 0
    return w.to(torch.int8)


def activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Integers with max |x| = 127 per row (q = x, scale 1), mostly +-127."""
    x = torch.where(torch.rand(m, k, generator=gen) < 0.6,
                    torch.where(torch.rand(m, k, generator=gen) < 0.5, 127.0, -127.0),
                    torch.randint(-127, 128, (m, k), generator=gen).float())
    x[:, 0] = 127.0
    return x


def packings(dense: torch.Tensor):
    """(values, metadata, {name: packing}): the packer's own at the current
    level, and layout 4 / layout 5 without a section made explicitly."""
    C = _native.lib()
    n, k = dense.shape
    sw = s24.compress(dense.float())
    vals, meta = sw.values.to(torch.int8), sw.meta
    pb = s24.position_bytes(s24.Sparse24Weight(vals, meta, k))
    out = {"packer": s24.pack_sparse24_int8(vals, meta, k)}
    for name, nbytes in (("plain", C.s24i8_packed_nbytes(n, k)), ("table", C.s24i8_packed_nbytes_ctrl(n, k))):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        C.s24i8_pack(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k, buf.data_ptr(), nbytes)
        out[name] = buf
    return vals, meta, pb, out


def run(x, vals, meta, k, packed):
    n = vals.shape[0]
    return torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, k, torch.ones(n), None, packed)


def expected_table(pb: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The layout-5 table built from the position bytes (nibble i0 | i1 << 2)
    as sparse24_int8.h documents it."""
    panels, quads = (n + 31) // 32, (k + 31) // 32
    t = torch.zeros(panels, quads, 4, 2, 8, 4, dtype=torch.int64)  # panel, quad, pair j, half h, c % 8, byte
    for c in range(n):
        p, lane = divmod(c, 32)
        h, shift, c8 = lane // 16, 4 * ((lane // 8) % 2), lane % 8
        for g in range((k + 3) // 4):
            pair, half = divmod(g, 2)
            quad, j = divmod(pair, 4)
            nib = int(pb[c, g]) & 15
            t[p, quad, j, h, c8, 2 * half] |= (4 * half + (nib & 3)) << shift
            t[p, quad, j, h, c8, 2 * half + 1] |= (4 * half + (nib >> 2)) << shift
    return t.flatten().to(torch.uint8)


@pytest.mark.parametrize("n,k", NK_GRID + [(64, 256), (96, 40)])
def test_table_bytes_follow_the_layout(gen, n, k):
    needs("avx2")
    C = _native.lib()
    with _native.isa_cap("avx2"):
        vals, meta, pb, packs = packings(weight_24(n, k, gen))
    for name in ("packer", "table"):
        ctrl, _ = C.s24i8_packing_parts(packs[name].data_ptr(), packs[name].numel(), n, k)
        assert ctrl, name
        base = C.s24i8_packed_nbytes(n, k)
        table = packs[name][base:C.s24i8_packed_nbytes_ctrl(n, k)]
        assert torch.equal(table, expected_table(pb, n, k)), name
    assert C.s24i8_packing_parts(packs["plain"].data_ptr(), packs["plain"].numel(), n, k) == (False, False)


@pytest.mark.parametrize("level", ["avx2", "avx_vnni"])
@pytest.mark.parametrize("n,k", NK_GRID)
@pytest.mark.parametrize("m", M_GRID)
def test_same_integers_with_and_without_the_table(gen, level, n, k, m):
    needs(level)
    check_all_packings(m, n, k, level, gen)


def check_all_packings(m: int, n: int, k: int, level: str, gen: torch.Generator):
    """Each packing made at avx2 (the packer's, layout 4, layout 5), run at `level`, equals the reference."""
    dense = weight_24(n, k, gen)
    with _native.isa_cap("avx2"):
        vals, meta, _, packs = packings(dense)
    x = activations(m, k, gen)
    ref = reference.int8_matmul_exact(x.to(torch.int8), dense).float()
    with _native.isa_cap(level):
        for name, packed in packs.items():
            y = run(x, vals, meta, k, packed)
            assert torch.equal(y, ref), (name, f"first mismatch at {(y - ref).nonzero()[0].tolist()}")


def test_other_levels_pack_no_table(gen):
    needs("avx2")
    C = _native.lib()
    n, k = 40, 72
    dense = weight_24(n, k, gen)
    for level in _native.ISA_LADDER:
        if not _native.isa_supported(level):
            continue
        with _native.isa_cap(level):
            _, _, _, packs = packings(dense)
            ctrl, _ = C.s24i8_packing_parts(packs["packer"].data_ptr(), packs["packer"].numel(), n, k)
            assert ctrl == (_native.lib().s24i8_kernel_name() in ("qs8_s24_gemm_4x16_avx2",
                                                                   "qs8_s24_gemm_4x16_avxvnni")), level


def test_damaged_table_packings_are_refused(gen):
    needs("avx2")
    n, k = 40, 72
    dense = weight_24(n, k, gen)
    with _native.isa_cap("avx2"):
        vals, meta, _, packs = packings(dense)
        x = activations(3, k, gen)
        table = packs["table"]
        with pytest.raises(ValueError, match="size"):
            run(x, vals, meta, k, table[:-32].clone())
        with pytest.raises(ValueError, match="size"):  # layout 4 with the table's bytes
            bad = table.clone()
            bad[4:8].view(torch.int32)[0] = 4
            run(x, vals, meta, k, bad)
        with pytest.raises(ValueError, match="layout"):
            bad = table.clone()
            bad[4:8].view(torch.int32)[0] = 6
            run(x, vals, meta, k, bad)
        with pytest.raises(ValueError, match="out"):  # the packer takes only its three sizes
            C = _native.lib()
            pb = s24.position_bytes(s24.Sparse24Weight(vals, meta, k))
            buf = torch.empty(C.s24i8_packed_nbytes_ctrl(n, k) + 64, dtype=torch.uint8)
            C.s24i8_pack(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k, buf.data_ptr(),
                         buf.numel())


@pytest.mark.parametrize("level", ["avx2", "avx_vnni"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [5, 7, 9, 13])
def test_row_chunks_of_a_one_panel_layer(gen, level, threads, m):
    """A layer of one panel and >= 2^19 multiply-adds runs on 2 threads as row
    chunks of whole tiles (4 rows at avx2, 12 at avx_vnni), so calls of 1 - 4
    rows reach the row paths from inside a bigger batch."""
    needs(level)
    with num_threads(threads):
        check_all_packings(m, 30, 4100, level, gen)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       level=st.sampled_from(["avx2", "avx_vnni"]))
def test_property_random_shapes(m, n, k, seed, level):
    needs("avx2")
    if not _native.isa_supported(level):
        level = "avx2"
    check_all_packings(m, n, k, level, torch.Generator().manual_seed(seed))


def test_modules_repack_when_the_level_wants_other_parts(gen):
    """A module packed where no table is read gets one at its next call at
    avx_vnni, and the section too at avx2; outputs identical throughout."""
    needs("avx_vnni")
    if not _native.isa_supported("avx512_vnni"):
        pytest.skip("needs avx512_vnni to pack without a table")
    from pyaccel.nn import Sparse24Int8Linear

    C = _native.lib()
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=gen)
        lin.weight.mul_(s24.mask_24(lin.weight))
    x = torch.randn(40, 256, generator=gen)
    parts = []
    with _native.isa_cap("avx512_vnni"):
        mod = Sparse24Int8Linear.from_float(lin)
        y0 = mod(x)
        parts.append(C.s24i8_packing_parts(mod._packed.data_ptr(), mod._packed.numel(), 96, 256))
    for level in ("avx_vnni", "avx2", "avx_vnni"):
        with _native.isa_cap(level):
            assert torch.equal(mod(x), y0), level
            parts.append(C.s24i8_packing_parts(mod._packed.data_ptr(), mod._packed.numel(), 96, 256))
    assert parts == [(False, False), (True, False), (True, True), (True, False)]


# header fields the kernels index with (byte offset in the 64-byte header, a wrong value)
S24I8_FIELDS = {"n_pad": (24, 1 << 20), "quads": (32, 1_000_000), "quads small": (32, 1),
                "comp_offset": (40, 1 << 40), "data_offset": (48, 1 << 40)}


@pytest.mark.parametrize("field", sorted(S24I8_FIELDS))
@pytest.mark.parametrize("kind", ["plain", "table", "packer"])
def test_inconsistent_headers_are_refused(gen, field, kind):
    """Magic, layout, shape and size right but a derived field wrong: refused
    with a message, never read (a huge quads or data_offset crashed before)."""
    needs("avx2")
    n, k = 64, 256
    with _native.isa_cap("avx2"):
        vals, meta, _, packs = packings(weight_24(n, k, gen))
        at, value = S24I8_FIELDS[field]
        bad = packs[kind].clone()
        bad[at:at + 8].view(torch.int64)[0] = value
        with pytest.raises(ValueError, match="inconsistent"):
            run(activations(3, k, gen), vals, meta, k, bad)


def test_other_ops_refuse_inconsistent_headers(gen):
    """The same check on the dense int8 and 2:4 fp32 packings."""
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    from pyaccel.formats.int8 import pack_int8_weight

    n, k = 64, 256
    w = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    packed = pack_int8_weight(w)
    x = torch.randn(3, k, generator=gen)
    for at, value in ((24, 1 << 20), (32, 4), (40, 1 << 40), (48, 1 << 40)):  # n_pad, k_pad, comp, data
        bad = packed.clone()
        bad[at:at + 8].view(torch.int64)[0] = value
        with pytest.raises(ValueError, match="inconsistent"):
            torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, bad)
    dense = weight_24(n, k, gen).float()
    sw = s24.compress(dense)
    packed = s24.pack_sparse24(sw)
    for at, value in ((24, 1 << 20), (32, 1 << 30), (40, 1 << 40)):  # n_pad, groups_pad, data_offset
        bad = packed.clone()
        bad[at:at + 8].view(torch.int64)[0] = value
        with pytest.raises(ValueError, match="inconsistent"):
            torch.ops.pyaccel.sparse24_linear(x, sw.values, sw.meta, k, None, bad)


def test_backend_names_the_dense_window_only_where_there_is_one(gen):
    """At avx_vnni the modules switch to dense int8 at 2 - 7 rows on layers
    under 4 Mi weights and never on bigger ones: backend() says so."""
    needs("avx_vnni")
    from pyaccel.nn import Sparse24Int8Linear

    with _native.isa_cap("avx_vnni"):
        for n, k, note in ((256, 256, "at 2 - 7 rows"), (2048, 2048, None)):
            lin = torch.nn.Linear(k, n)
            with torch.no_grad():
                lin.weight.mul_(s24.mask_24(lin.weight))
            b = Sparse24Int8Linear.from_float(lin).backend()
            assert (note in b) if note else ("dense" not in b), b
            assert _native.lib().s24i8_dense_wins(2, n, k) == (note is not None)
