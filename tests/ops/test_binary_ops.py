"""Binary (XNOR) op: the pure-PyTorch references against each other (float
±1 conv vs. bit-level xor + popcount with the border correction), and the
native kernels on every ISA against them over grids from the kernels' tiles.
Dots are integers: every comparison is exact (torch.equal)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyaccel import _native
from pyaccel import ops_binary as ob
from pyaccel import reference_binary as rb
from pyaccel.formats import binary as bf

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


def _x(gen, *shape):
    x = torch.randn(*shape, generator=gen)
    x[x.abs() < 0.2] = 0.0  # zeros are +1
    x.view(-1)[::7] = -0.0  # so is -0.0
    return x


# ---- format ---------------------------------------------------------------------------
def test_popcount_and_pack_round_trip(gen):
    v = torch.randint(-2 ** 63, 2 ** 63 - 1, (4096,), generator=gen, dtype=torch.int64)
    v[:3] = torch.tensor([0, -1, -2 ** 63])
    want = torch.tensor([bin(int(i) & (2 ** 64 - 1)).count("1") for i in v])
    assert torch.equal(bf.popcount64(v), want)
    for c in (1, 63, 64, 65, 130):
        neg = torch.rand(5, c, generator=gen) < 0.5
        packed = bf.pack_bits_last(neg)
        assert packed.shape == (5, bf.words(c))
        assert torch.equal(bf.unpack_bits_last(packed, c), neg)
        assert torch.equal(bf.unpack_bits_last(packed, bf.words(c) * 64)[:, c:], torch.zeros(5, bf.words(c) * 64 - c,
                                                                                              dtype=torch.bool))


def test_sign_of_zero_and_nan():
    x = torch.tensor([0.0, -0.0, float("nan"), -1e-30, 1e-30, -float("inf")])
    assert bf.sign(x).tolist() == [1, 1, 1, -1, 1, -1]


@pytest.mark.parametrize("groups,oc,cg", [(1, 5, 3), (1, 33, 130), (2, 70, 64), (4, 8, 1)])
def test_weight_pack_round_trip(gen, groups, oc, cg):
    w = _x(gen, oc, cg, 3, 2)
    bits, wsum = bf.pack_conv_weight(w, groups)
    assert bits.shape == (groups, -(-(oc // groups) // bf.NR), 6, bf.words(cg), bf.NR)
    assert torch.equal(bf.unpack_conv_weight(bits, oc, cg, 3, 2), bf.sign(w))
    assert torch.equal(wsum, bf.sign(w).reshape(oc, cg, 6).sum(1).to(torch.int32))


# ---- references: float vs bits ----------------------------------------------------------------
GEOMETRIES = [  # (kernel, stride, padding, dilation)
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((5, 3), (2, 3), (2, 1), (1, 2)), ((3, 3), (1, 1), (3, 2), (2, 1)), ((2, 2), (1, 1), (1, 1), (1, 1)),
    ((7, 7), (1, 1), (3, 3), (1, 1)),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("mode", rb.PADDING_MODES)
def test_bit_reference_equals_float_reference(gen, geom, mode):
    k, s, p, d = geom
    for c, oc, groups in ((3, 4, 1), (130, 6, 2), (64, 3, 1)):
        x = _x(gen, 2, c, 9, 8)
        w = _x(gen, oc, c // groups, *k)
        dot = rb.binary_conv2d_dot(x, w, s, p, d, groups, mode)
        bits = rb.binary_conv2d_bits(x, w, s, p, d, groups, mode)
        assert torch.equal(dot, bits.permute(0, 3, 1, 2).float()), (c, oc, groups)


def test_zero_padding_correction_is_exact(gen):
    """Exact zero padding = the +1-padded conv minus the border term; and it
    differs from one-padding exactly at the border."""
    x, w = _x(gen, 1, 16, 6, 6), _x(gen, 8, 16, 3, 3)
    zeros = rb.binary_conv2d_dot(x, w, 1, 1, 1, 1, "zeros")
    ones = rb.binary_conv2d_dot(x, w, 1, 1, 1, 1, "ones")
    wsum = bf.sign(w).reshape(8, 16, 9).sum(1)
    corr = rb.border_correction(wsum.to(torch.int32), 6, 6, 3, 3, 1, 1, 1)
    assert torch.equal(ones - corr.permute(2, 0, 1)[None].float(), zeros)
    assert torch.equal(zeros[..., 1:-1, 1:-1], ones[..., 1:-1, 1:-1])
    assert corr[1:-1, 1:-1].eq(0).all() and corr[0].ne(0).any()
    # and zero padding is what F.conv2d of the ±1 tensors gives
    assert torch.equal(zeros, torch.nn.functional.conv2d(bf.sign(x), bf.sign(w), padding=1))


# ---- native kernels on every ISA ----------------------------------------------------------------
def _run(x, w, groups, k, s, p, d, mode, act="none", gen=None, scale=True, shift=True):
    oc = w.shape[0]
    bits, wsum = bf.pack_conv_weight(w, groups)
    sc = torch.rand(oc, generator=gen) + 0.25 if scale else None
    sh = torch.randn(oc, generator=gen) if shift else None
    sl = torch.randn(oc, generator=gen) if act == "prelu" else None
    args = (x, bits, wsum, sc, sh, sl, oc, list(k), list(s), list(p), list(d), groups, mode, act, -0.3, 0.6)
    y = ob.binary_conv2d(*args)
    ref = rb.binary_conv2d(x, w, sc, sh, s, p, d, groups, mode, act, (-0.3, 0.6), sl)
    return y, ref


@needs_native
def test_tile_grid_every_isa(isa, gen):
    params = _native.lib().kernel_params()["binary"]
    mr, nr, kr = params["mr"], params["nr"], params["kr"]
    # pixels (N * OH * OW) around the tile rows, channels around a word and the 32-channel block
    for c in (1, kr - 1, kr, kr + 1, 2 * kr + 2):
        for oc in (1, nr - 1, nr, nr + 1, 2 * nr + 3):
            for ow in (1, mr - 1, mr, mr + 1, 2 * mr + 1):
                ow = max(ow, 1)
                x = _x(gen, 1, c, 3, ow)
                w = _x(gen, oc, c, 3, 3)
                y, ref = _run(x, w, 1, (3, 3), (1, 1), (1, 1), (1, 1), "zeros", gen=gen)
                assert torch.equal(y, ref), (params["name"], c, oc, ow, (y - ref).abs().max())


@needs_native
def test_large_outputs_every_isa(isa, gen):
    """Outputs of stream_min_bytes or more take non-temporal stores (whole
    16-channel groups, y 64-byte aligned): whole images per thread (N >= 4)
    and pixel chunks (N = 1), OC with a half-empty last block (48), OC that is
    no multiple of 16 (plain stores), groups whose channel blocks start off a
    cache line (24, 40, 12 channels a group: plain stores) or on one (32),
    just below and above the size."""
    limit = _native.lib().kernel_params()["binary"]["stream_min_bytes"]
    for n, c, oc, act, groups in ((4, 64, 64, "relu", 1), (1, 70, 48, "none", 1), (5, 33, 40, "prelu", 1),
                                  (1, 64, 64, "hardtanh", 1), (1, 48, 48, "none", 2), (4, 80, 80, "relu", 2),
                                  (1, 48, 48, "none", 4), (1, 64, 64, "none", 2)):
        h, pixels = 8, limit // (4 * oc)  # output pixels at the limit
        for w in (pixels // (n * h) - 1, -(-pixels // (n * h)), -(-pixels // (n * h)) + 3):
            assert (n * h * w * oc * 4 >= limit) == (w > pixels // (n * h) - 1)
            x = _x(gen, n, c, h, w)
            if n == 1:
                x = x.contiguous(memory_format=torch.channels_last)
            wt = _x(gen, oc, c // groups, 3, 3)
            y, ref = _run(x, wt, groups, (3, 3), (1, 1), (1, 1), (1, 1), "zeros", act, gen)
            assert torch.equal(y, ref), (isa, n, c, oc, act, groups, w)


@needs_native
@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_geometries_every_isa(isa, gen, geom):
    k, s, p, d = geom
    for (c, oc, groups) in ((130, 33, 1), (130, 66, 2), (200, 40, 4), (8, 8, 8), (3, 5, 1)):
        for mode in rb.PADDING_MODES:
            x = _x(gen, 2, c, 9, 11)
            w = _x(gen, oc, c // groups, *k)
            y, ref = _run(x, w, groups, k, s, p, d, mode, gen=gen)
            assert torch.equal(y, ref), (isa, c, oc, groups, mode)


@needs_native
@pytest.mark.parametrize("act", rb.ACTIVATIONS)
def test_epilogue_every_isa(isa, gen, act):
    x, w = _x(gen, 3, 70, 5, 5), _x(gen, 40, 70, 3, 3)
    for scale, shift in ((True, True), (False, False), (True, False)):
        y, ref = _run(x, w, 1, (3, 3), (1, 1), (1, 1), (1, 1), "zeros", act, gen, scale, shift)
        assert torch.equal(y, ref), (act, scale, shift)
    # negative scales (a BatchNorm with negative gamma folded in)
    oc = 40
    bits, wsum = bf.pack_conv_weight(w, 1)
    sc = -torch.rand(oc, generator=gen)
    y = ob.binary_conv2d(x, bits, wsum, sc, None, torch.ones(oc), oc, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros",
                         act, -0.3, 0.6)
    ref = rb.binary_conv2d(x, w, sc, None, 1, 1, 1, 1, "zeros", act, (-0.3, 0.6), torch.ones(oc))
    assert torch.equal(y, ref)


@needs_native
def test_input_layouts_every_isa(isa, gen):
    x, w = _x(gen, 2, 96, 7, 9), _x(gen, 24, 96, 3, 3)
    base, _ = _run(x, w, 1, (3, 3), (1, 1), (1, 1), (1, 1), "zeros", gen=torch.Generator().manual_seed(1))
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.stack([x, x], -1)[..., 0],
        "channel slice": torch.cat([x, x], 1)[:, :96],
        "nhwc slice": torch.cat([x, x], 1).contiguous(memory_format=torch.channels_last)[:, 96:],
    }
    for what, xv in layouts.items():
        y, _ = _run(xv, w, 1, (3, 3), (1, 1), (1, 1), (1, 1), "zeros", gen=torch.Generator().manual_seed(1))
        assert torch.equal(y, base), what


@needs_native
def test_linear_is_the_1x1_case(isa, gen):
    for m, k, n in ((1, 4096, 65), (8, 130, 32), (13, 1, 3), (0, 64, 8)):
        x, w = _x(gen, m, k), _x(gen, n, k)
        bits, wsum = bf.pack_conv_weight(w, 1)
        sc = torch.rand(n, generator=gen)
        y = ob.binary_conv2d(x[:, :, None, None], bits, wsum, sc, None, None, n, [1, 1], [1, 1], [0, 0], [1, 1], 1,
                             "zeros", "none", 0.0, 0.0).reshape(m, n)
        assert torch.equal(y, rb.binary_linear(x, w, sc, None)), (m, k, n)


@needs_native
@given(c=st.integers(1, 150), oc=st.integers(1, 70), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
       g=st.sampled_from([1, 2, 3]), ones=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
@settings(max_examples=60, deadline=None)
def test_property_random_convs(c, oc, h, w, k, s, p, d, g, ones, seed):
    gen = torch.Generator().manual_seed(seed)
    c, oc = c * g, oc * g
    if h + 2 * p < d * (k - 1) + 1 or w + 2 * p < d * (k - 1) + 1:
        return
    x, wt = _x(gen, 2, c, h, w), _x(gen, oc, c // g, k, k)
    y, ref = _run(x, wt, g, (k, k), (s, s), (p, p), (d, d), "ones" if ones else "zeros", gen=gen)
    assert torch.equal(y, ref)


def test_bad_arguments_name_the_argument(gen):
    x, w = _x(gen, 1, 8, 5, 5), _x(gen, 4, 8, 3, 3)
    bits, wsum = bf.pack_conv_weight(w, 1)
    good = dict(x=x, weight_bits=bits, wsum=wsum, scale=None, shift=None, slope=None, out_channels=4,
                kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, padding_mode="zeros",
                act="none", act_lo=0.0, act_hi=0.0)
    for key, bad, exc, match in (
            ("x", x.double(), TypeError, "x:"), ("x", x[0], ValueError, "x:"),
            ("weight_bits", bits[..., :3], ValueError, "weight_bits"), ("wsum", wsum.float(), ValueError, "wsum"),
            ("scale", torch.ones(3), ValueError, "scale"), ("groups", 3, ValueError, "groups"),
            ("padding_mode", "reflect", ValueError, "padding_mode"), ("act", "gelu", ValueError, "act"),
            ("kernel_size", [9, 9], ValueError, "weight_bits")):
        args = dict(good, **{key: bad})
        with pytest.raises(exc, match=match):
            ob.binary_conv2d(**args)
    with pytest.raises(ValueError, match="smaller than"):
        ob.binary_conv2d(**dict(good, x=x[..., :1, :1], padding=[0, 0]))


def test_opcheck(gen):
    x, w = _x(gen, 2, 8, 5, 5), _x(gen, 4, 8, 3, 3)
    bits, wsum = bf.pack_conv_weight(w, 1)
    torch.library.opcheck(torch.ops.pyaccel.binary_conv2d.default,
                          (x, bits, wsum, torch.rand(4), None, None, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros",
                           "relu", 0.0, 0.0), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("lo,hi", [(float("nan"), 1.0), (1.0, -1.0), (0.25, 0.25), (-float("inf"), 1.0)])
def test_hardtanh_bounds_are_checked(gen, lo, hi):
    """A NaN bound dropped its clamp in the kernels; reversed bounds gave a different
    constant in the kernels and the reference: the op (and its fake) refuse them."""
    x, w = _x(gen, 1, 8, 5, 5), _x(gen, 4, 8, 3, 3)
    bits, wsum = bf.pack_conv_weight(w, 1)
    args = [x, bits, wsum, None, None, None, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros", "hardtanh", lo, hi]
    with pytest.raises(ValueError, match="act_lo / act_hi"):
        ob.binary_conv2d(*args)
    with pytest.raises(ValueError, match="act_lo / act_hi"), torch._subclasses.FakeTensorMode() as mode:
        ob.binary_conv2d(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    lbits, lwsum = bf.pack_conv_weight(_x(gen, 4, 8, 1, 1), 1)
    with pytest.raises(ValueError, match="act_lo / act_hi"):
        ob.binary_linear(_x(gen, 3, 8), lbits, lwsum, None, None, None, 4, "hardtanh", lo, hi)
    args[13] = "relu"  # the other activations ignore the bounds
    assert ob.binary_conv2d(*args).shape == (1, 4, 5, 5)


def test_weight_padding_bits_and_wsum_are_checked(gen):
    """Bits past K in a row's last word were counted by the kernels (|dot| > K)
    and dropped by the reference; a wrong wsum shifted the kernels' zero-padded
    border and not the reference's: the op refuses both, naming them."""
    x, w = _x(gen, 3, 5), _x(gen, 8, 5)
    bits, wsum = bf.pack_conv_weight(w, 1)
    junk = bits | ~bf.valid_bits_mask(bits.shape, 8, 5)
    with pytest.raises(ValueError, match="weight_bits: bits set past the 5 input channels"):
        ob.binary_linear(x, junk, wsum, None, None, None, 8, "none", 0.0, 0.0)
    assert torch.equal(ob.binary_linear(x, bits, wsum, None, None, None, 8, "none", 0.0, 0.0),
                       rb.binary_linear(x, w, None, None))
    xc, wc = _x(gen, 1, 70, 5, 5), _x(gen, 6, 70, 3, 3)
    cbits, cwsum = bf.pack_conv_weight(wc, 1)
    args = [xc, cbits, cwsum, None, None, None, 6, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros", "none", 0.0, 0.0]
    bad = cwsum.clone()
    bad[2, 4] += 2
    with pytest.raises(ValueError, match=r"wsum: .* at \[2, 4\]"):
        ob.binary_conv2d(*args[:2], bad, *args[3:])
    with pytest.raises(ValueError, match="weight_bits: bits set past the 70"):
        ob.binary_conv2d(xc, cbits | ~bf.valid_bits_mask(cbits.shape, 6, 70), *args[2:])
    # wsum is read only for exact zero padding with padding > 0: elsewhere any values match the reference
    ref = ob.reference_conv(xc, cbits, None, None, None, 6, [3, 3], [1, 1], [0, 0], [1, 1], 1, "zeros", "none", 0, 0)
    assert torch.equal(ob.binary_conv2d(*args[:2], bad, *args[3:9], [0, 0], *args[10:]), ref)


def test_weight_checks_remembered_until_a_write(gen):
    """check_weight_values runs its pass over the weights once per tensor
    state: a later call with the same objects skips it, but an in-place write
    to weight_bits or wsum (their version counters), other tensors, or a call
    that reads wsum where the earlier one did not, checks again."""
    xc, wc = _x(gen, 1, 70, 5, 5), _x(gen, 6, 70, 3, 3)
    bits, wsum = bf.pack_conv_weight(wc, 1)
    args = [xc, bits, wsum, None, None, None, 6, [3, 3], [1, 1], [0, 0], [1, 1], 1, "zeros", "none", 0.0, 0.0]
    calls = []
    real = ob.wsum_from_bits
    try:
        ob.wsum_from_bits = lambda *a: calls.append(1) or real(*a)
        y0 = ob.binary_conv2d(*args)  # padding 0: wsum not read, not checked
        assert calls == []
        args[9] = [1, 1]
        y1 = ob.binary_conv2d(*args)  # now it is read: checked once
        assert len(calls) == 1
        assert torch.equal(ob.binary_conv2d(*args), y1) and len(calls) == 1
        wsum[2, 4] += 2  # an in-place write: checked again, and refused
        with pytest.raises(ValueError, match=r"wsum: .* at \[2, 4\]"):
            ob.binary_conv2d(*args)
        wsum[2, 4] -= 2
        assert torch.equal(ob.binary_conv2d(*args), y1) and len(calls) == 3
        bits[..., -1, :] |= ~bf.valid_bits_mask(bits.shape, 6, 70)[..., -1, :]
        with pytest.raises(ValueError, match="weight_bits: bits set past the 70"):
            ob.binary_conv2d(*args)
        args[1] = bits.clone().copy_(bf.pack_conv_weight(wc, 1)[0])  # another object: checked
        assert torch.equal(ob.binary_conv2d(*args), y1) and len(calls) == 4
    finally:
        ob.wsum_from_bits = real
    assert y0.shape == (1, 6, 3, 3)


def test_weight_checks_miss_writes_without_a_version_bump(gen):
    """The documented limit of the remembered checks: a write that moves no
    version counter (.data, .numpy()) is not seen by the next call; a write
    through the tensor itself, or new tensor objects, are checked again."""
    xc, wc = _x(gen, 1, 70, 5, 5), _x(gen, 6, 70, 3, 3)
    bits, wsum = bf.pack_conv_weight(wc, 1)
    args = [xc, bits, wsum, None, None, None, 6, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros", "none", 0.0, 0.0]
    y = ob.binary_conv2d(*args)
    good = wsum.clone()
    wsum.numpy()[2, 0] += 2  # no version bump: not seen (documented)
    assert not torch.equal(ob.binary_conv2d(*args), y)
    args[2] = wsum.clone()  # new objects: checked
    with pytest.raises(ValueError, match=r"wsum: .* at \[2, 0\]"):
        ob.binary_conv2d(*args)
    args[2] = wsum
    wsum.data[2, 0] -= 2  # .data: no version bump either; the values are right again
    assert torch.equal(ob.binary_conv2d(*args), y)
    wsum.data[2, 0] += 2
    with torch.no_grad():
        wsum.copy_(wsum.clone())  # a write through the tensor itself: checked again
    with pytest.raises(ValueError, match=r"wsum: .* at \[2, 0\]"):
        ob.binary_conv2d(*args)
    wsum.copy_(good)
    assert torch.equal(ob.binary_conv2d(*args), y)


def test_binary_linear_without_features_and_list_lengths(gen):
    bits, wsum = bf.pack_conv_weight(_x(gen, 4, 8, 3, 3), 1)
    with pytest.raises(ValueError, match="x: .*in_features >= 1"):
        ob.binary_linear(torch.zeros(3, 0), bits[:, :, :1, :0], wsum[:, :1], None, None, None, 4, "none", 0.0, 0.0)
    x = _x(gen, 1, 8, 5, 5)
    args = [x, bits, wsum, None, None, None, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1, "zeros", "none", 0.0, 0.0]
    for i, name, bad in ((7, "kernel_size", [3]), (8, "stride", [1, 1, 1]), (9, "padding", [1]),
                         (10, "dilation", [])):
        with pytest.raises(ValueError, match=f"{name}: expected 2 values"):
            ob.binary_conv2d(*args[:i], bad, *args[i + 1:])
