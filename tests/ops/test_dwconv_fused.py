"""Fused depthwise-separable conv (pyaccel::dws_conv2d, FusedDWSeparableConv2d):
native CPU kernels on every ISA against the float64 reference.

Tile facts the grid is built from (csrc/dwconv_fused/README.md and
_C.kernel_params()["dws"]): channels padded to 16; depthwise in blocks of 4
adjacent output pixels of a row x 4 (AVX-512) / 2 (AVX2) / 8 (portable)
channel vectors, full vectors unmasked, the last one masked; interior blocks
skip the column checks; pointwise tiles mr x nr (12 x 32, 6 x 16, 1 x 16),
the last panel of <= nr/2 channels with a half-width tile; bands of <= 192 KB
of depthwise output (c_pad * 4 bytes a pixel) split the pixels, and with
fewer bands than 2 per thread the panels are split too. fp32 sums differ from
the reference only in order: |y - ref| <= 1e-5 * (the same block on |x| and
|weights| without activations) -- the issue's relative error of 1e-5.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyaccel
from pyaccel import _native, reference
from pyaccel._pattern import ActKind, Activation, activation_of, bn_scale_shift, fold_bn
from pyaccel.nn import FusedDWSeparableConv2d
from pyaccel.nn._conv import ConvGeometry, ConvSkip, conv_geometry

from _helpers import num_threads

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")
ACTS = ["none", "relu", "relu6", "hardswish", "silu", Activation(ActKind.HARDTANH, -0.5, 0.75)]


def _random_module(c, co, k=3, stride=1, padding=None, dilation=1, act1="relu6", act2="none", gen=None):
    m = FusedDWSeparableConv2d(c, co, k, stride, padding, dilation, act1, act2)
    with torch.no_grad():
        m.dw_weight.copy_(torch.randn(m.dw_weight.shape, generator=gen))
        m.dw_bias.copy_(torch.randn(c, generator=gen))
        m.pw_weight.copy_(torch.randn(m.pw_weight.shape, generator=gen) / c ** 0.5)
        m.bias.copy_(torch.randn(co, generator=gen))
    m._refresh()  # repacked now: tests hand m._packed to the ops
    return m


def _ref64(m, x):
    g = m.geometry
    pads = g.pads(x.shape[2], x.shape[3])
    return reference.dws_conv2d(x.double(), m.dw_weight.double(), m.dw_bias.double(), m.pw_weight.double(),
                                m.bias.double(), g.stride, g.dilation, pads, m.act1, m.act2)


def _scale(m, x):
    g = m.geometry
    pads = g.pads(x.shape[2], x.shape[3])
    ident = Activation()
    return reference.dws_conv2d(x.double().abs(), m.dw_weight.double().abs(), m.dw_bias.double().abs(),
                                m.pw_weight.double().abs(), m.bias.double().abs(), g.stride, g.dilation, pads,
                                ident, ident)


def assert_close(y, m, x, what="", rel=1e-5):
    ref = _ref64(m, x)
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} vs {tuple(ref.shape)}"
    tol = rel * _scale(m, x) + (torch.finfo(y.dtype).eps * ref.abs() if y.dtype != torch.float32 else 0) + 1e-30
    bad = (y.double() - ref).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} off, first at {bad.nonzero()[0].tolist()}: "
                           f"{y[tuple(bad.nonzero()[0])]} vs {ref[tuple(bad.nonzero()[0])]}")


def _params():
    return _native.lib().kernel_params()["dws"]


# ---- geometry --------------------------------------------------------------------------------
def test_geometry_out_size_matches_conv2d():
    for k, s, d, p, h in itertools.product((1, 3, 5), (1, 2), (1, 2), (0, 1, 2), (5, 8, 11)):
        g = ConvGeometry(k, s, d, p)
        if (k - 1) * d + 1 > h + 2 * p:
            with pytest.raises(ValueError, match="x"):
                g.out_size(h, h)
            continue
        want = F.conv2d(torch.zeros(1, 1, h, h), torch.zeros(1, 1, k, k), stride=s, padding=p, dilation=d).shape
        assert g.out_size(h, h) == tuple(want[2:])


def test_tf_same_padding():
    g = ConvGeometry(3, 2, 1, "tf_same")
    assert g.pads(8, 8) == (0, 1, 0, 1)  # stride 2 on an even input: (0, 1), not (1, 1)
    assert g.pads(7, 7) == (1, 1, 1, 1)
    assert g.out_size(8, 8) == (4, 4) and g.out_size(7, 7) == (4, 4)
    assert ConvGeometry(5, 1, 1, "tf_same").pads(9, 10) == (2, 2, 2, 2)


def test_conv_geometry_reads_subclasses():
    class OwnPad(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)))

    with pytest.raises(ConvSkip, match="overrides forward"):
        conv_geometry(OwnPad(4, 4, 3, groups=4))
    with pytest.raises(ConvSkip, match="padding_mode"):
        conv_geometry(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert conv_geometry(nn.Conv2d(4, 4, (3, 5), padding="same")).padding == (1, 1, 2, 2)
    assert conv_geometry(nn.Conv2d(4, 4, 3, 2, (1, 0))).padding == (1, 1, 0, 0)


# ---- BN folding, activations -----------------------------------------------------------------
def test_fold_bn_and_scale_shift(gen):
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.2, 3.0, generator=gen)
        bn.weight.normal_(generator=gen)  # some negative gammas
        bn.weight[0] = -2.0
        bn.bias.normal_(generator=gen)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    want = bn(conv(x))
    w, b = fold_bn(conv.weight, conv.bias, bn)
    assert torch.allclose(F.conv2d(x, w, b, padding=1, groups=6), want, rtol=1e-5, atol=1e-5)
    scale, shift = bn_scale_shift(bn)
    assert scale[0] < 0
    assert torch.allclose(conv(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), want, rtol=1e-5, atol=1e-5)


def test_activation_descriptor():
    x = torch.linspace(-8, 8, 101)
    for mod, fn in [(nn.ReLU(), F.relu), (nn.ReLU6(), F.relu6), (nn.Hardswish(), F.hardswish), (nn.SiLU(), F.silu),
                    (nn.Hardtanh(-0.5, 2.0), lambda t: F.hardtanh(t, -0.5, 2.0))]:
        a = activation_of(mod)
        assert a is not None and torch.equal(a(x), fn(x)), type(mod).__name__
    p = nn.PReLU(3)
    assert activation_of(p) is None and activation_of(p, prelu=True).kind == ActKind.PRELU
    assert activation_of(nn.Sigmoid()) is None


# ---- the kernel on every ISA -----------------------------------------------------------------
@needs_native
def test_channel_and_panel_grid(isa, gen):
    """C across channel vectors (1, 15, 16, 17, 71), Cout across panels (1, nr/2, nr - 1, nr, nr + 1, 2nr + 3)."""
    nr = _params()["nr"]
    for c, co in itertools.product((1, 15, 16, 17, 71), (1, nr // 2, nr - 1, nr, nr + 1, 2 * nr + 3)):
        m = _random_module(c, co, gen=gen)
        x = torch.randn(2, c, 9, 7, generator=gen)
        assert_close(m(x), m, x, f"{isa} c={c} co={co}")


@needs_native
@pytest.mark.parametrize("k,stride,dilation,padding", [
    (3, 1, 1, None), (3, 2, 1, None), (5, 1, 1, None), (5, 2, 1, None), (3, 1, 2, None), (3, 2, 1, 0),
    (3, 2, 1, (0, 1, 0, 1)), (5, 2, 1, (1, 2, 2, 1)), (3, 2, 1, "tf_same"), (5, 2, 1, "tf_same"), ((3, 5), 1, 1, None),
    (1, 1, 1, 0), (7, 1, 1, 3),
])
def test_geometry_grid(isa, gen, k, stride, dilation, padding):
    for h, w in ((1, 1), (2, 3), (5, 5), (8, 8), (13, 6), (17, 23)):
        m = _random_module(19, 21, k, stride, padding, dilation, gen=gen)
        kk = (k, k) if isinstance(k, int) else k
        try:
            m.geometry.out_size(h, w)
        except ValueError:
            continue
        x = torch.randn(2, 19, h, w, generator=gen)
        assert_close(m(x), m, x, f"{isa} k={k} s={stride} d={dilation} p={padding} hw={h}x{w} {kk}")


@needs_native
@pytest.mark.parametrize("act1,act2", [(a, b) for a in ACTS for b in ("none", "relu")] + [("none", a) for a in ACTS])
def test_activations(isa, gen, act1, act2):
    m = _random_module(33, 40, act1=act1, act2=act2, gen=gen)
    x = torch.randn(1, 33, 11, 11, generator=gen) * 3
    assert_close(m(x), m, x, f"{isa} {act1} {act2}")


@needs_native
@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates_through_every_activation(isa, gen, act):
    """NaN in, NaN out, as torch's clamp-style activations (x86 max/min would
    otherwise return the bound for a NaN operand)."""
    m = _random_module(16, 24, act1=act, act2=act, gen=gen)
    x = torch.randn(1, 16, 7, 7, generator=gen)
    x[0, 3, 3, 3] = float("nan")
    y, ref = m(x), _ref64(m, x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(ref).any(), f"{isa} {act}"


def _op_with(m, x, packed, bias=True):
    """torch.ops.pyaccel.dws_conv2d with m's weights and parameters but the packing `packed`."""
    return torch.ops.pyaccel.dws_conv2d(x, m.dw_weight, m.dw_bias, m.pw_weight, m.bias if bias else None,
                                        *m._op_geometry(), packed)


# A packing made for other parameters than the call's (the kernel takes stride, dilation,
# activations and channel counts from the header): the op says what differs.
OTHER_PACKINGS = [
    (dict(stride=2), r"packed: expected stride \(1, 1\), the buffer holds \(2, 2\)"),
    (dict(dilation=2), r"packed: expected dilation \(1, 1\), the buffer holds \(2, 2\)"),
    (dict(act1="silu"), r"packed: expected act1 relu, the buffer holds silu"),
    (dict(act2=Activation(ActKind.HARDTANH, -0.5, 0.75)),
     r"packed: expected act2 none, the buffer holds hardtanh\(-0.5, 0.75\)"),
    (dict(c=24), r"packed: expected channels \(C, Cout\) \(16, 24\), the buffer holds \(24, 24\)"),
    (dict(co=32), r"packed: expected channels \(C, Cout\) \(16, 24\), the buffer holds \(16, 32\)"),
    (dict(k=5), r"packed: expected a window \(kh, kw\) \(3, 3\), the buffer holds \(5, 5\)"),
]


@needs_native
@pytest.mark.parametrize("other, match", OTHER_PACKINGS)
def test_op_raises_for_a_packing_of_other_parameters(isa, gen, other, match):
    kw = dict(c=16, co=24, k=3, stride=1, dilation=1, act1="relu", act2="none")
    m = _random_module(**kw, gen=gen)
    o = _random_module(**{**kw, **other}, gen=gen)
    x = torch.randn(1, 16, 9, 9, generator=gen)
    with pytest.raises(ValueError, match=match):
        _op_with(m, x, o._packed)
    assert_close(_op_with(m, x, m._packed), m, x, f"{isa}: its own packing")


@needs_native
def test_op_raises_for_a_bad_or_truncated_packing(gen):
    m = _random_module(16, 24, gen=gen)
    x = torch.randn(1, 16, 9, 9, generator=gen)
    p = m._packed
    with pytest.raises(ValueError, match=r"packed: expected \d+ bytes for this packing, the buffer has \d+ .*truncated"):
        _op_with(m, x, p[:-64].clone())
    with pytest.raises(ValueError, match=r"packed: expected a DWS1 packing \(at least its 96-byte header\), "
                                         r"the buffer has 50 bytes"):
        _op_with(m, x, p[:50].clone())
    with pytest.raises(ValueError, match=r"packed: expected a DWS1 packing \(magic 0x31535744\), the buffer's magic"):
        _op_with(m, x, torch.zeros(p.numel(), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"packed: expected biases: the depthwise bias only, the buffer holds both"):
        _op_with(m, x, p, bias=False)
    with pytest.raises(ValueError, match="packed: expected a contiguous CPU tensor"):
        _op_with(m, x, torch.stack([p, p], 1).reshape(-1)[::2])
    with pytest.raises(TypeError, match="packed: expected a 1-D uint8 tensor"):
        _op_with(m, x, p.view(torch.int32))


def _other_panel_width_isas():
    """(isa, other isa) whose dws kernels have different panel widths, both runnable here, or None."""
    widths = {}
    for isa in _native.ISA_LADDER:
        if _native.isa_supported(isa):
            with _native.isa_cap(isa):
                widths.setdefault(_params()["nr"], isa)
    return tuple(widths.values())[:2] if len(widths) > 1 else None


@needs_native
def test_op_takes_a_valid_packing_of_another_isa(gen):
    """A packing made on another machine (another panel width) is valid: the op
    runs the reference for it, exactly, and raises nothing."""
    pair = _other_panel_width_isas()
    if pair is None:
        pytest.skip("one dws panel width on this CPU")
    packer, runner = pair
    with _native.isa_cap(packer):
        m = _random_module(16, 24, stride=2, act1="hardswish", act2="relu6", gen=gen)
    x = torch.randn(2, 16, 11, 10, generator=gen)
    g = m.geometry
    with _native.isa_cap(runner):
        y = _op_with(m, x, m._packed)
    ref = reference.dws_conv2d(x, m.dw_weight, m.dw_bias, m.pw_weight, m.bias, g.stride, g.dilation,
                               g.pads(11, 10), m.act1, m.act2)
    assert torch.equal(y, ref)


@needs_native
def test_bands_threads_and_rows(isa, gen):
    """Many bands (c_pad * 4 bytes a pixel, 192 KB a band), one band split over panels, rows around mr."""
    mr = _params()["mr"]
    cases = [(512, 64, 3, 14, 1), (1024, 96, 1, 7, 1), (32, 48, 3, 40, 3), (64, 33, 1, mr + 1, 1),
             (16, 16, 1, max(1, mr - 1), 2)]
    for c, co, n, hw, batch in cases:
        m = _random_module(c, co, gen=gen)
        x = torch.randn(batch, c, hw, hw if n == 1 else hw + 1, generator=gen)
        for threads in (1, 2, 3):
            with num_threads(threads):
                assert_close(m(x), m, x, f"{isa} c={c} co={co} hw={hw} threads={threads}")


@needs_native
def test_sliding_window_depthwise_every_isa(isa, gen):
    """Stride 1 depthwise rows: the AVX-512 sliding-window block (5-tap rows,
    and 3-tap rows up to 64 channels where the two-row block leaves a single
    row: 7 rows) over channel counts around its 16- and 32-channel chunks, rows
    wider than its 4 pixels with borders on both sides, next to the general
    block elsewhere (3 taps over 64 channels, dilation 2)."""
    for k, dilation in ((3, 1), (5, 1), ((3, 5), 1), (3, 2)):
        for c in (1, 15, 16, 17, 31, 32, 33, 48, 64, 65, 97):
            m = _random_module(c, 24, k, 1, None, dilation, gen=gen)
            x = torch.randn(2, c, 7, 13, generator=gen).contiguous(memory_format=torch.channels_last)
            assert_close(m(x), m, x, f"{isa} k={k} d={dilation} c={c}")


@needs_native
def test_two_row_depthwise_every_isa(isa, gen):
    """3 x 3 stride-1 depthwise rows taken two at a time (the two-row block of
    the AVX-512 and AVX2 levels): heights 1 - 6 (odd ones leave a single
    row), widths 1 - 9 (runs of 1 - 4 pixels, borders on one or both sides),
    zero, symmetric and per-side padding with top != left ((top, bottom,
    left, right) = (1, 0, 0, 1) and (0, 1, 1, 0)), channels around its 16- and
    32-channel chunks, and 1040 channels at 10 x 13 (bands of 44 pixels: they
    start and end mid-row, with whole row pairs after the start)."""
    for c, hw, pad in ((16, (2, 5), 1), (17, (3, 4), 1), (33, (6, 9), 1), (48, (5, 1), 1), (65, (4, 7), 0),
                       (97, (6, 6), (0, 1, 0, 1)), (31, (5, 7), (1, 0, 0, 1)), (40, (6, 8), (0, 1, 1, 0)),
                       (32, (1, 8), 1), (15, (2, 2), 1), (1040, (10, 13), 1)):
        m = _random_module(c, 24, 3, 1, pad, 1, gen=gen)
        x = torch.randn(2, c, *hw, generator=gen).contiguous(memory_format=torch.channels_last)
        for threads in (1, 2, 3):
            with num_threads(threads):
                assert_close(m(x), m, x, f"{isa} c={c} hw={hw} pad={pad} threads={threads}")


@needs_native
def test_large_outputs_every_isa(isa, gen):
    """fp32 outputs of stream_min_bytes or more take non-temporal stores
    (whole vectors: N a multiple of 16): N = 1 and a batch, N with a
    half-empty last panel (48), N no multiple of 16 (plain stores), just
    below and above the size, stride 2."""
    limit = _params()["stream_min_bytes"]
    for c, co, stride, batch in ((32, 64, 1, 1), (16, 48, 1, 3), (24, 40, 1, 2), (8, 32, 2, 2)):
        h = 16
        pixels = limit // (4 * co)  # output pixels at the limit
        for ow in (pixels // (batch * h) - 1, -(-pixels // (batch * h)) + 1):
            m = _random_module(c, co, 3, stride, gen=gen)
            x = torch.randn(batch, c, h * stride, ow * stride, generator=gen).contiguous(
                memory_format=torch.channels_last)
            y = m(x)
            assert (y.numel() * 4 >= limit) == (ow > pixels // (batch * h) - 1), (y.shape, limit)
            assert_close(y, m, x, f"{isa} c={c} co={co} stride={stride} batch={batch} ow={ow}")


@needs_native
def test_memory_formats_dtypes_and_strides(isa, gen):
    m = _random_module(24, 20, 3, 2, gen=gen)
    x = torch.randn(3, 24, 10, 9, generator=gen)
    y = m(x)
    assert y.is_contiguous()
    assert_close(y, m, x, "NCHW")
    ycl = m(x.contiguous(memory_format=torch.channels_last))
    assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl, y)
    xs = torch.randn(3, 48, 10, 9, generator=gen)[:, ::2]  # strided channels
    assert_close(m(xs), m, xs, "strided")
    xb = x.to(torch.bfloat16)
    yb = m(xb)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, m(xb.float()).to(torch.bfloat16))
    e = m(torch.randn(0, 24, 10, 9))
    assert e.shape == (0, 20, 5, 5)
    assert torch.equal(m._checked_op(x), y)  # the torch.ops path: same kernel


@needs_native
def test_one_checkpoint_every_isa(gen):
    src = _random_module(37, 45, 5, 2, "tf_same", act1="hardswish", act2="silu", gen=gen)
    x = torch.randn(2, 37, 12, 13, generator=gen)
    outs = {}
    for isa in _native.ISA_LADDER:
        if not _native.isa_supported(isa):
            continue
        with _native.isa_cap(isa):
            m = FusedDWSeparableConv2d(37, 45, 5, 2, "tf_same", 1, "hardswish", "silu")
            m.load_state_dict(src.state_dict())
            outs[isa] = m(x)
            assert_close(outs[isa], m, x, isa)
    # a module packed under one cap, used under another, repacks
    m = _random_module(20, 20, gen=gen)
    for isa in _native.ISA_LADDER:
        if _native.isa_supported(isa):
            with _native.isa_cap(isa):
                assert_close(m(x[:, :20]), m, x[:, :20], f"cap changed to {isa}")


@given(c=st.integers(1, 80), co=st.integers(1, 80), hw=st.tuples(st.integers(1, 19), st.integers(1, 19)),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), batch=st.integers(1, 3),
       tf=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
@settings(max_examples=40, deadline=None)
def test_property_random_blocks(c, co, hw, k, stride, batch, tf, seed):
    gen = torch.Generator().manual_seed(seed)
    m = _random_module(c, co, k, stride, "tf_same" if tf else None, gen=gen)
    try:
        m.geometry.out_size(*hw)
    except ValueError:
        return
    x = torch.randn(batch, c, *hw, generator=gen)
    assert_close(m(x), m, x, f"c={c} co={co} hw={hw} k={k} s={stride} tf={tf}")


def test_activation_modules_and_names(gen):
    """act1 / act2 take nn activation modules as well as names (any case)."""
    x = torch.randn(2, 8, 6, 6, generator=gen)
    for mod_act, name in ((nn.ReLU(), "relu"), (nn.ReLU6(), "RELU6"), (nn.Hardswish(), "hardswish"),
                          (nn.SiLU(), "swish"), (nn.Identity(), "identity"), (None, "none")):
        a = _random_module(8, 12, act1=mod_act, act2=mod_act, gen=gen)
        b = FusedDWSeparableConv2d(8, 12, 3, act1=name, act2=name)
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x)), name
    h = FusedDWSeparableConv2d(8, 12, 3, act1=nn.Hardtanh(-0.5, 0.5))
    assert h.act1.lo == -0.5 and h.act1.hi == 0.5


def test_bad_arguments_name_themselves(gen):
    m = _random_module(8, 8, gen=gen)
    with pytest.raises(TypeError, match=r"x: expected float32 or bfloat16.*stay fp32 under .double\(\)"):
        m(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x: expected float32 or bfloat16.*stay fp32 under .double\(\)"):
        copy.deepcopy(m).double()(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 9, 5, 5))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(8, 5))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(9, 5, 5))  # unbatched [C, H, W] is taken, with the right C
    with pytest.raises(ValueError, match="x"):
        FusedDWSeparableConv2d(8, 8, 5, padding=0)(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        FusedDWSeparableConv2d(8, 8, 3, padding="same-ish")
    with pytest.raises(TypeError, match="in_channels"):
        FusedDWSeparableConv2d(8.0, 8)
    for arg, bad in (("kernel_size", "3"), ("kernel_size", (3, 3, 3)), ("stride", 1.5), ("stride", True),
                     ("dilation", (1, "2"))):
        for cls in (FusedDWSeparableConv2d, pyaccel.nn.FusedDWSeparableInt8Conv2d):
            with pytest.raises(TypeError, match=f"{arg}: expected an int or a pair of ints"):
                cls(8, 8, **{arg: bad})
    with pytest.raises(ValueError, match="act"):
        FusedDWSeparableConv2d(8, 8, act1="gelu")
    with pytest.raises(ValueError, match="act1: expected one of nn.ReLU"):
        FusedDWSeparableConv2d(8, 8, act1=nn.GELU())
    with pytest.raises(TypeError, match="fused: expected a float pyaccel.nn.FusedDWSeparableConv2d, got Conv2d"):
        pyaccel.nn.FusedDWSeparableInt8Conv2d.from_float(nn.Conv2d(8, 8, 1))
    dw, pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
    with pytest.raises(ValueError, match="bn1: in training mode"):
        FusedDWSeparableConv2d.from_modules(dw, nn.BatchNorm2d(8), None, pw, None, None)
    assert issubclass(pyaccel.nn.ConvSkip, ValueError)
    with pytest.raises(ValueError, match="dw_weight"):
        torch.ops.pyaccel.dws_conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 2, 3, 3), None, m.pw_weight, None,
                                     [1, 1], [1, 1], [1, 1, 1, 1], False, 0, [], 0, [], None)


def test_opcheck(gen):
    m = _random_module(8, 12, gen=gen)
    x = torch.randn(2, 8, 6, 7, generator=gen)
    args = (x, m.dw_weight, m.dw_bias, m.pw_weight, m.bias, [1, 1], [1, 1], [1, 1, 1, 1], False, 2, [-1.0, 1.0], 0,
            [-1.0, 1.0], m._packed)
    torch.library.opcheck(torch.ops.pyaccel.dws_conv2d.default, args)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.pyaccel.dws_conv2d.default, (xg,) + args[1:])


# ---- int8 pointwise stage ------------------------------------------------------------------
@needs_native
def test_int8_pointwise_matches_reference_and_sqnr(isa, gen):
    """Against the int8 reference (the same quantization; a depthwise sum rounded the other way
    may move one activation by one step) and, by SQNR, against the fp32 block."""
    from pyaccel.nn import FusedDWSeparableInt8Conv2d

    for c, co, k, s, hw, n in [(32, 64, 3, 1, (13, 14), 2), (17, 33, 3, 2, (11, 11), 1), (100, 70, 5, 1, (9, 9), 1),
                               (64, 200, 3, 1, (14, 14), 1), (1, 1, 3, 1, (3, 3), 1), (512, 64, 3, 1, (14, 14), 1),
                               (1024, 64, 3, 1, (7, 7), 1)]:  # 1024: quantized row stride != k_pad
        f = _random_module(c, co, k, s, act1="relu6", act2="hardswish", gen=gen)
        q = FusedDWSeparableInt8Conv2d.from_float(f)
        x = torch.randn(n, c, *hw, generator=gen)
        y = q(x)
        g = q.geometry
        ref = reference.dws_conv2d_int8(x, q.dw_weight, q.dw_bias, q.pw_weight_int8, q.pw_scale, q.bias, g.stride,
                                        g.dilation, g.pads(*hw), q.act1, q.act2)
        assert (y - ref).abs().max() <= 2e-2 * ref.abs().max(), f"{isa} c={c} co={co}"
        close = torch.isclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()).float().mean()
        assert close > 0.8, f"{isa} c={c} co={co}: only {close:.0%} equal to the reference to rounding"
        yf = f(x)
        sqnr = 20 * torch.log10(yf.norm() / (y - yf).norm())
        assert c == 1 or sqnr > 35, f"{isa} c={c} co={co}: SQNR {sqnr:.1f} dB"
        assert torch.equal(y, q._checked_op(x))
        ycl = q(x.contiguous(memory_format=torch.channels_last))
        assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl, y)


def test_references_take_unbatched_input_and_ignore_the_memory_format(gen):
    """reference.dws_conv2d_int8 failed on an unbatched [C, H, W] input ("permute
    (sparse_coo): number of dimensions ..."), and both references rounded the
    depthwise sums differently for channels_last input (torch's depthwise conv
    sums in another order there: 2.9e-3 apart after quantization with a 9 x 9
    window), where the modules give the same bits for either format."""
    from pyaccel.nn import FusedDWSeparableInt8Conv2d

    f = _random_module(24, 40, 9, 1, act1="relu6", act2="hardswish", gen=gen)
    q = FusedDWSeparableInt8Conv2d.from_float(f)
    g = q.geometry
    x = torch.randn(2, 24, 17, 15, generator=gen) * 3
    xcl = x.contiguous(memory_format=torch.channels_last)
    args8 = (q.dw_weight, q.dw_bias, q.pw_weight_int8, q.pw_scale, q.bias, g.stride, g.dilation, g.pads(17, 15),
             q.act1, q.act2)
    args32 = (f.dw_weight, f.dw_bias, f.pw_weight, f.bias, g.stride, g.dilation, g.pads(17, 15), f.act1, f.act2)
    for ref, args in ((reference.dws_conv2d_int8, args8), (reference.dws_conv2d, args32)):
        y = ref(x, *args)
        ycl = ref(xcl, *args)
        assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl, y), ref.__name__
        y1 = ref(x[1], *args)  # (torch's convs may sum a batch of one in another order)
        assert y1.shape == y[1].shape and torch.allclose(y1, y[1], rtol=1e-5, atol=1e-4), ref.__name__


@needs_native
@pytest.mark.parametrize("act2", ACTS)
def test_int8_pointwise_every_activation(isa, gen, act2):
    """The int8 stage's act2 epilogue (vectorized, per 64-channel panel) for every
    activation, with a partial last panel (70 channels) and a ragged vector tail."""
    from pyaccel.nn import FusedDWSeparableInt8Conv2d

    f = _random_module(24, 70, act1="relu", act2=act2, gen=gen)
    q = FusedDWSeparableInt8Conv2d.from_float(f)
    x = torch.randn(2, 24, 9, 11, generator=gen) * 3
    g = q.geometry
    ref = reference.dws_conv2d_int8(x, q.dw_weight, q.dw_bias, q.pw_weight_int8, q.pw_scale, q.bias, g.stride,
                                    g.dilation, g.pads(9, 11), q.act1, q.act2)
    y = q(x)
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max(), f"{isa} {act2}"
    close = torch.isclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()).float().mean()
    assert close > 0.8, f"{isa} {act2}: only {close:.0%} equal to the reference to rounding"
    assert torch.equal(y, q._checked_op(x))


def _int8_module(gen, c=16, co=24, **kw):
    from pyaccel.nn import FusedDWSeparableInt8Conv2d

    args = dict(k=3, stride=1, dilation=1, act1="relu", act2="none")
    args.update(kw)
    return FusedDWSeparableInt8Conv2d.from_float(_random_module(c, co, **args, gen=gen))


@needs_native
@pytest.mark.parametrize("path", ["native", "autograd", "general", "compile"])
@pytest.mark.parametrize("change", [
    dict(act2=Activation.parse("relu")),
    dict(act1="hardswish"),  # a name, as the constructor takes it
    dict(geometry=ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1, 1, 1))),
], ids=["act2", "act1", "geometry"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_module_repacks_after_an_activation_or_geometry_assignment(gen, int8, change, path):
    """act1, act2 and geometry are plain attributes the packing bakes in. After
    `m.act2 = ...` the op paths raised 'packed: expected act2 relu, the buffer
    holds none' (the user passed no packing) and the no-grad native path kept
    the old activation, silently. They are in the repack signature now: every
    path gives the new parameters' answer."""
    m = _int8_module(gen) if int8 else _random_module(16, 24, act1="relu", act2="none", gen=gen)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    m(x)  # packed for the old parameters
    for name, v in change.items():
        setattr(m, name, v)
    if path == "native":
        with torch.no_grad():
            y = m(x)
    elif path == "autograd":
        y = m(x.clone().requires_grad_()).detach()
    elif path == "general":  # a tensor subclass: the checked op
        y = m(nn.Parameter(x.clone(), requires_grad=False)).detach()
    else:
        torch._dynamo.reset()
        with torch.no_grad():
            y = torch.compile(m, backend="eager")(x)
    if int8:
        ref = _int8_ref(m, x)
        assert y.shape == ref.shape and (y - ref).abs().max() <= 2e-2 * ref.abs().max(), f"{path} {change}"
    else:
        assert_close(y, m, x, f"{path} {change}")


def test_module_refuses_an_activation_assignment_the_kernel_lacks(gen):
    m = _random_module(8, 8, act1="relu", act2="none", gen=gen)
    x = torch.randn(1, 8, 5, 5, generator=gen)
    y = m(x)
    with pytest.raises(ValueError, match="act2: PReLU is not supported by the fused kernel"):
        m.act2 = Activation(ActKind.PRELU, slope=torch.ones(1))
    with pytest.raises(ValueError, match="act1: expected one of"):
        m.act1 = "gelu"
    assert m.act1 == Activation(ActKind.RELU) and m.act2 == Activation() and torch.equal(m(x), y)


def test_module_refuses_a_geometry_it_cannot_take(gen):
    """m.geometry = (3, 3) failed with "'tuple' object has no attribute
    'kernel'" and left the module broken; another window size failed at the
    repack naming dw_weight, leaving the module with it. Both are refused
    naming geometry, the module unchanged."""
    import dataclasses

    m = _random_module(8, 8, act1="relu", act2="none", gen=gen)
    x = torch.randn(1, 8, 9, 9, generator=gen)
    y, g = m(x), m.geometry
    for bad in ((3, 3), None, "tf_same"):
        with pytest.raises(TypeError, match=r"geometry: expected a pyaccel.nn._conv.ConvGeometry .*got "):
            m.geometry = bad
    with pytest.raises(ValueError, match=r"geometry: expected a 3x3 window \(dw_weight's\), got 5x5"):
        m.geometry = ConvGeometry((5, 5))
    assert m.geometry == g and torch.equal(m(x), y) and "kernel=3x3" in repr(m)
    m.geometry = dataclasses.replace(g, stride=(2, 2))  # the suggested way
    assert m(x).shape == (1, 8, 5, 5)


def test_fuse_dws_takes_what_the_constructor_takes(gen):
    """fuse_dws refused nn.Identity ("act: unsupported activation Identity")
    though the module's constructor takes it; an unsupported one names the
    argument."""
    from pyaccel.nn.dws_conv import fuse_dws

    dw, pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
    x = torch.randn(1, 8, 6, 6, generator=gen)
    m = fuse_dws(dw, None, nn.Identity(), pw, None, nn.Identity())
    assert m.act1 == Activation() and m.act2 == Activation()
    with torch.no_grad():
        assert torch.allclose(m(x), pw(dw(x)), rtol=1e-5, atol=1e-5)
    assert fuse_dws(dw, None, "relu6", pw, None, None).act1 == Activation(ActKind.RELU6)
    with pytest.raises(ValueError, match=r"act1: expected one of nn.ReLU, .*got GELU"):
        fuse_dws(dw, None, nn.GELU(), pw)
    with pytest.raises(ValueError, match=r"act2: expected one of nn.ReLU, .*got PReLU"):
        fuse_dws(dw, None, None, pw, None, nn.PReLU())


def _int8_op_with(q, x, packed_dw, packed_pw):
    return torch.ops.pyaccel.dws_conv2d_int8(x, q.dw_weight, q.dw_bias, q.pw_weight_int8, q.pw_scale, q.bias,
                                             *q._op_geometry(), packed_dw, packed_pw)


def _int8_ref(q, x):
    g = q.geometry
    return reference.dws_conv2d_int8(x, q.dw_weight, q.dw_bias, q.pw_weight_int8, q.pw_scale, q.bias, g.stride,
                                     g.dilation, g.pads(x.shape[2], x.shape[3]), q.act1, q.act2)


@needs_native
@pytest.mark.parametrize("other, match", [
    (dict(stride=2), r"packed_dw: expected stride \(1, 1\), the buffer holds \(2, 2\)"),
    (dict(dilation=2), r"packed_dw: expected dilation \(1, 1\), the buffer holds \(2, 2\)"),
    (dict(act1="relu6"), r"packed_dw: expected act1 relu, the buffer holds relu6"),
    (dict(act2="hardswish"), r"packed_dw: expected act2 none, the buffer holds hardswish"),
    (dict(c=32), r"packed_dw: expected channels \(C, Cout\) \(16, 0\), the buffer holds \(32, 0\)"),
])
def test_int8_op_raises_for_a_depthwise_packing_of_other_parameters(isa, gen, other, match):
    """The int8 op took stride, dilation and activations from packed_dw's header
    without comparing them with its arguments: a wrong answer, silently."""
    q, o = _int8_module(gen), _int8_module(gen, **other)
    x = torch.randn(1, 16, 9, 9, generator=gen)
    with pytest.raises(ValueError, match=match):
        _int8_op_with(q, x, o._packed, q._packed_pw)
    y = _int8_op_with(q, x, q._packed, q._packed_pw)
    assert torch.equal(y, q(x))


@needs_native
def test_int8_op_raises_for_a_bad_pointwise_or_truncated_packing(gen):
    q = _int8_module(gen)
    x = torch.randn(1, 16, 9, 9, generator=gen)
    with pytest.raises(ValueError, match=r"packed_pw: .*expected the int8 packing of a \[24, 16\] pointwise weight, "
                                         r"the buffer holds one of \[32, 16\]"):
        _int8_op_with(q, x, q._packed, _int8_module(gen, co=32)._packed_pw)
    with pytest.raises(ValueError, match=r"packed_pw: .*the buffer holds another format"):
        _int8_op_with(q, x, q._packed, q._packed)
    with pytest.raises(ValueError, match=r"packed_pw: .*wrong size"):
        _int8_op_with(q, x, q._packed, q._packed_pw[:-64].clone())
    with pytest.raises(ValueError, match=r"packed_dw: expected \d+ bytes for this packing, the buffer has \d+"):
        _int8_op_with(q, x, q._packed[:-64].clone(), q._packed_pw)
    f = _random_module(16, 24, act1="relu", act2="none", gen=gen)  # a packing with pointwise panels
    with pytest.raises(ValueError, match=r"packed_dw: expected channels \(C, Cout\) \(16, 0\), the buffer holds "
                                         r"\(16, 24\)"):
        _int8_op_with(q, x, f._packed, q._packed_pw)
    with pytest.raises(ValueError, match=r"packed_pw: .*expected the int8 packing of a \[24, 16\] pointwise weight, "
                                         r"the buffer holds one of \[24, 24\]"):  # checked with packed_dw absent too
        _int8_op_with(q, x, None, _int8_module(gen, c=24, co=24)._packed_pw)
    with pytest.raises(TypeError, match="packed_dw: expected a 1-D uint8 tensor"):
        _int8_op_with(q, x, q._packed.view(torch.int32), q._packed_pw)


@needs_native
def test_int8_op_takes_a_valid_packing_of_another_isa(gen):
    pair = _other_panel_width_isas()
    if pair is None:
        pytest.skip("one dws panel width on this CPU")
    packer, runner = pair
    with _native.isa_cap(packer):
        q = _int8_module(gen, stride=2, act1="hardswish", act2="relu6")
    x = torch.randn(2, 16, 11, 10, generator=gen)
    with _native.isa_cap(runner):
        y = _int8_op_with(q, x, q._packed, q._packed_pw)
    assert torch.equal(y, _int8_ref(q, x))


def test_patch_quantize_int8_mobilenet(gen):
    from pyaccel.demo import mobilenet_v1
    from pyaccel.nn import FusedDWSeparableInt8Conv2d

    model = mobilenet_v1(width=0.25, classes=10)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    want = model(x)
    report = pyaccel.patch(model, quantize="int8")
    fused = [e for e in report.swapped if e.new_type == "FusedDWSeparableInt8Conv2d"]
    assert len(fused) == 13 and all(e.lossy for e in fused)
    assert isinstance(model[3][0], FusedDWSeparableInt8Conv2d)
    got = model(x)
    assert 20 * torch.log10(want.norm() / (got - want).norm()) > 25


@pytest.mark.parametrize("params", [[float("nan"), 1.0], [1.0, -1.0], [0.5, 0.5], [-1.0, float("inf")]])
def test_hardtanh_params_are_checked(gen, params):
    """A NaN bound gave NaN outputs and reversed bounds torch.clamp's error
    without the argument's name: the ops and their fakes refuse them, naming it."""
    x = torch.randn(1, 4, 5, 5, generator=gen)
    dw, pw = torch.randn(4, 1, 3, 3, generator=gen), torch.randn(6, 4, 1, 1, generator=gen)
    ht, geo = int(ActKind.HARDTANH), ([1, 1], [1, 1], [1, 1, 1, 1], False)
    for which in (1, 2):
        acts = [ht, [-1.0, 1.0], ht, [-1.0, 1.0]]
        acts[2 * which - 1] = params
        with pytest.raises(ValueError, match=f"act{which}_params: Hardtanh clamps"):
            torch.ops.pyaccel.dws_conv2d(x, dw, None, pw, None, *geo, *acts, None)
        with pytest.raises(ValueError, match=f"act{which}_params: Hardtanh clamps"):
            torch.ops.pyaccel.dws_conv2d_int8(x, dw, None, torch.ones(6, 4, dtype=torch.int8), torch.ones(6),
                                              None, *geo, *acts, None, None)
        with pytest.raises(ValueError, match=f"act{which}_params"), torch._subclasses.FakeTensorMode() as mode:
            torch.ops.pyaccel.dws_conv2d(mode.from_tensor(x), mode.from_tensor(dw), None, mode.from_tensor(pw), None,
                                         *geo, *acts, None)
    ok = torch.ops.pyaccel.dws_conv2d(x, dw, None, pw, None, *geo, int(ActKind.RELU), params, ht, [-1.0, 1.0], None)
    assert ok.shape == (1, 6, 5, 5)  # the other activations ignore the params
