"""Binary layers: training modules (BinaryConv2d / BinaryLinear, binarize),
inference modules (XnorConv2d / XnorLinear: the parts of the module contract
that apply to them, see NOT_IN_LINEAR_SUITE in test_module_contract.py) and
patch's binary rules (BN + activation folded into the epilogue)."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyaccel
from pyaccel import _native
from pyaccel import reference_binary as rb
from pyaccel.formats import binary as bf
from pyaccel.nn import BinaryConv2d, BinaryLinear, XnorConv2d, XnorLinear

from _helpers import num_threads

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


# ---- training modules ------------------------------------------------------------------------
def test_binary_conv_forward_is_xnor_net(gen):
    m = BinaryConv2d(6, 8, 3, padding=1, bias=True)
    x = torch.randn(2, 6, 5, 5, generator=gen)
    x[0, 0, 0, 0] = 0.0
    alpha = m.weight.abs().mean((1, 2, 3))
    want = F.conv2d(bf.sign(x), bf.sign(m.weight), padding=1) * alpha[:, None, None] + m.bias[:, None, None]
    assert torch.equal(m(x), want)
    assert isinstance(m, nn.Conv2d) and torch.equal(m(x[0]), want[0])


def test_ste_gradients(gen):
    m = BinaryLinear(5, 3, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.5, -2.0, 0.1, 0.0, 1.0]] * 3))
    x = torch.tensor([[0.3, -1.5, 0.0, 2.0, -1.0]], requires_grad=True)
    m(x).sum().backward()
    assert torch.equal(x.grad != 0, torch.tensor([[True, False, True, False, True]]))  # |x| <= 1 passes
    # weight gradient: STE where |w| <= 1, plus the alpha term everywhere
    assert m.weight.grad[0, 1] != 0 and torch.isfinite(m.weight.grad).all()


def test_one_padding_training_forward(gen):
    m = BinaryConv2d(4, 4, 3, padding=1, bias=False, binary_padding="ones")
    x = torch.randn(1, 4, 6, 6, generator=gen)
    alpha = m.weight.abs().mean((1, 2, 3))
    want = rb.binary_conv2d(x, m.weight, alpha, None, 1, 1, 1, 1, "ones")
    assert torch.equal(m(x), want)
    with pytest.raises(ValueError, match="binary_padding"):
        BinaryConv2d(4, 4, 3, binary_padding="reflect")


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
                         nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.PReLU(32)),
                         nn.Conv2d(32, 32, 1), nn.Flatten(), nn.LazyLinear(10) if False else nn.Linear(32 * 16, 10))


def test_binarize_keeps_first_and_last(gen):
    model = _cnn()
    params = {id(p) for p in model.parameters()}
    out = pyaccel.binarize(model)
    assert out is model and {id(p) for p in model.parameters()} == params  # an optimizer keeps training them
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == ["Conv2d", "BinaryConv2d", "BinaryConv2d", "BinaryConv2d", "Linear"]
    model2 = pyaccel.binarize(_cnn(), filter_fn=lambda m, p: p != "3", keep_first_last=False)
    kinds = [type(m).__name__ for m in model2.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == ["BinaryConv2d", "Conv2d", "BinaryConv2d", "BinaryConv2d", "BinaryLinear"]
    with pytest.raises(TypeError, match="filter_fn"):
        pyaccel.binarize(_cnn(), filter_fn=3)


def test_training_module_tracing(gen):
    m = nn.Sequential(BinaryConv2d(4, 8, 3, padding=1), nn.Flatten(), BinaryLinear(8 * 16, 5))
    x = torch.randn(2, 4, 4, 4, generator=gen)
    want = m(x)
    assert torch.equal(torch.fx.symbolic_trace(m)(x), want)
    assert torch.allclose(torch.compile(m, fullgraph=True)(x), want, atol=1e-5)
    ep = torch.export.export(m, (x,))
    assert torch.allclose(ep.module()(x), want, atol=1e-5)
    sd = m.state_dict()
    assert set(sd) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ---- inference modules -------------------------------------------------------------------------
def _xconv(gen, c=20, oc=24, k=3, s=1, p=1, groups=1, padding="zeros"):
    b = BinaryConv2d(c, oc, k, stride=s, padding=p, groups=groups, binary_padding=padding).eval()
    with torch.no_grad():
        b.bias.copy_(torch.randn(oc, generator=gen))
    return b, XnorConv2d.from_binary(b)


@pytest.mark.parametrize("padding", ["zeros", "ones"])
def test_xnor_conv_equals_training_module_bit_for_bit(isa, gen, padding):
    for c, oc, k, s, p, groups in ((20, 24, 3, 1, 1, 1), (130, 66, 3, 2, 1, 2), (3, 5, 5, 1, 2, 1), (64, 64, 1, 1, 0, 1)):
        b, x_mod = _xconv(gen, c, oc, k, s, p, groups, padding)
        x = torch.randn(2, c, 9, 7, generator=gen)
        with torch.no_grad():
            want = b(x)
        y = x_mod(x)
        assert torch.equal(y, want) and y.is_contiguous()
        ycl = x_mod(x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(ycl, want) and ycl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x_mod(x[0]), want[0])


def test_xnor_linear_equals_training_module(isa, gen):
    b = BinaryLinear(130, 70).eval()
    m = XnorLinear.from_binary(b)
    for shape in ((1, 130), (9, 130), (2, 3, 130), (130,), (0, 130)):
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            assert torch.equal(m(x), b(x)), shape
    xs = torch.randn(9, 260, generator=gen)[:, ::2]
    with torch.no_grad():
        assert torch.equal(m(xs), b(xs))


def test_xnor_save_load_copy_meta(gen):
    b, m = _xconv(gen, groups=2, oc=24, c=20)
    x = torch.randn(2, 20, 6, 6, generator=gen)
    want = m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"weight_bits", "scale", "bias"}
    fresh = XnorConv2d(20, 24, 3, padding=1, groups=2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), want)
    assert torch.equal(copy.deepcopy(m)(x), want)
    assert torch.equal(pickle.loads(pickle.dumps(m))(x), want)
    with torch.device("meta"):
        sk = XnorConv2d(20, 24, 3, padding=1, groups=2)
    sk.load_state_dict(sd, assign=True)
    assert torch.equal(sk(x), want)
    with pytest.raises(RuntimeError, match="weight_bits"):
        fresh.load_state_dict({**sd, "weight_bits": sd["weight_bits"][:, :, :1]})


def test_xnor_tracing_and_compile(gen):
    _, m = _xconv(gen)
    x = torch.randn(2, 20, 6, 6, generator=gen)
    want = m(x)
    assert torch.equal(torch.compile(m, fullgraph=True)(x), want)
    ep = torch.export.export(m, (x,))
    assert torch.equal(ep.module()(x), want)
    tr = torch.jit.trace(m, (x,))
    assert torch.equal(tr(x), want)
    gm = torch.fx.symbolic_trace(nn.Sequential(m))
    assert torch.equal(gm(x), want)
    lin = XnorLinear.from_binary(BinaryLinear(40, 8).eval())
    xl = torch.randn(3, 40, generator=gen)
    assert torch.equal(torch.compile(lin, fullgraph=True)(xl), lin(xl))


def test_xnor_threads_and_isas_agree(gen):
    _, m = _xconv(gen, c=130, oc=70)
    x = torch.randn(4, 130, 10, 10, generator=gen)
    outs = []
    for isa in _native.ISA_LADDER:
        if _native.isa_supported(isa):
            with _native.isa_cap(isa):
                for t in (1, 2):
                    with num_threads(t):
                        outs.append(m(x))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_xnor_bad_inputs(gen):
    _, m = _xconv(gen)
    with pytest.raises(ValueError, match="x:"):
        m(torch.randn(2, 19, 6, 6))
    with pytest.raises(TypeError, match="x:"):
        m(torch.ones(2, 20, 6, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="x:"):
        m(torch.randn(2, 20, 1, 1)[..., :0, :0])
    with pytest.raises(TypeError, match="conv"):
        XnorConv2d.from_binary(nn.Conv2d(3, 3, 3))


def test_xnor_conv_geometry_arguments(gen):
    # strings as nn.Conv2d takes them: the same numbers, the same outputs
    b, ref = _xconv(gen, c=20, oc=24, k=3, p=1)
    for padding in ("same", (1, 1), 1):
        m = XnorConv2d(20, 24, 3, padding=padding)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(2, 20, 7, 6, generator=gen)
        assert m.padding == (1, 1) and torch.equal(m(x), ref(x))
    assert XnorConv2d(20, 24, (3, 5), padding="same", dilation=(1, 2)).padding == (1, 4)
    assert XnorConv2d(20, 24, 3, padding="valid").padding == (0, 0)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        XnorConv2d(3, 5, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="pads unevenly"):
        XnorConv2d(3, 5, 2, padding="same")
    with pytest.raises(ValueError, match="padding: expected 'same', 'valid'"):
        XnorConv2d(3, 5, 3, padding="full")
    # anything but an int or a pair of ints: refused by name, never truncated or cast
    for arg, bad in (("kernel_size", "3"), ("kernel_size", (3, 3, 3)), ("stride", 1.5), ("stride", True),
                     ("stride", (2.7, 1)), ("padding", (1, 1, 9)), ("dilation", (1, 1, 7)), ("dilation", None)):
        kw = {"kernel_size": 3, arg: bad}
        with pytest.raises(TypeError, match=f"{arg}: expected an int or a pair of ints"):
            XnorConv2d(3, 5, **kw)
    m = XnorConv2d(3, 5, 3)
    with pytest.raises(TypeError, match="stride: expected an int or a pair of ints"):
        m.stride = (1, 2, 3)


# ---- patch ----------------------------------------------------------------------------------------
def _bnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
        BinaryConv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.PReLU(64),
        nn.Sequential(BinaryConv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU()),
        BinaryConv2d(64, 64, 3, padding=1, binary_padding="ones"),
        nn.Flatten(), BinaryLinear(64 * 16, 32), nn.BatchNorm1d(32), nn.Hardtanh(),
        BinaryLinear(32, 16), nn.Linear(16, 10))
    return _random_bn_statistics(model)


def _random_bn_statistics(model):
    """Non-trivial BN statistics, negative gammas; the model in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def test_patch_folds_bn_and_activation(gen):
    model = _bnn()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    with torch.no_grad():
        want = model(x)
    report = pyaccel.patch(model)
    text = str(report)
    kinds = {e.path: e.new_type for e in report.entries}
    assert kinds["3"] == "XnorConv2d" and kinds["6.0"] == "XnorConv2d" and kinds["7"] == "XnorConv2d"
    assert kinds["9"] == "XnorLinear" and kinds["12"] == "XnorLinear"
    assert all(isinstance(model[i], nn.Identity) for i in (4, 5, 10, 11))
    assert "folded" in text
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[13], nn.Linear)
    with torch.no_grad():
        y = model(x)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-3), (y - want).abs().max()


def test_patch_leaves_training_mode_and_filters(gen):
    model = _bnn().train()
    report = pyaccel.patch(model)
    assert not any(e.new_type in ("XnorConv2d", "XnorLinear") for e in report.entries)
    assert any("training mode" in (e.reason or "") for e in report.entries)
    model = _bnn()
    report = pyaccel.patch(model, exclude="3")
    kinds = {e.path: e.new_type for e in report.entries}
    assert kinds.get("3") is None and isinstance(model[3], BinaryConv2d) and isinstance(model[4], nn.BatchNorm2d)


def test_patch_reflect_padding_stays_with_reason():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), BinaryConv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                      nn.Linear(2, 2)).eval()
    report = pyaccel.patch(m)
    e = next(e for e in report.entries if e.path == "1")
    assert not e.swapped and "reflect" in e.reason


def test_bench_suite_smoke():
    from pyaccel.bench import binary

    conv, lin, name = binary.run(quick=True, log=lambda *a: None)
    assert conv and lin and all(r.times_us["pyaccel binary"] > 0 for r in conv)
    md = binary.to_markdown(conv, lin, 2000.0)
    assert "× fp32" in md and "kernel only" in md


def test_built_and_run_under_inference_mode(gen):
    model = _bnn()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.inference_mode():
        want = model(x)
        pyaccel.patch(model)
        y = model(x)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(x), y)


# ---- review findings: each a test ----------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("act", [nn.ReLU(), nn.Hardtanh(-0.5, 0.5), nn.ReLU6()])
def test_nan_propagates_through_the_folded_activation(isa, gen, act):
    conv = BinaryConv2d(8, 8, 3, padding=1)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean[0] = float("nan")
    model = nn.Sequential(conv, bn, act).eval()
    x = torch.randn(1, 8, 5, 5, generator=gen)
    want = model(x)
    pyaccel.patch(model)
    y = model(x)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.isnan(want).any()


def test_op_refuses_non_contiguous_buffers(gen):
    m = XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1).eval())
    x = torch.randn(1, 8, 6, 6, generator=gen)
    args = list(m._args(x))
    args[3] = torch.ones(32)[::2]  # scale: right shape and dtype, strided
    with pytest.raises(ValueError, match="scale: expected a contiguous tensor"):
        torch.ops.pyaccel.binary_conv2d(*args)


def test_patch_keeps_hooked_binary_layers(gen):
    m = nn.Sequential(nn.Conv2d(3, 8, 1), BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    calls = []
    m[1].register_forward_hook(lambda mod, i, o: calls.append(1))
    report = pyaccel.patch(m)
    assert isinstance(m[1], BinaryConv2d) and any("hook" in (e.reason or "") for e in report.entries if e.path == "1")
    m(torch.randn(1, 3, 4, 4, generator=gen))
    assert calls == [1]


@needs_native
def test_border_correction_follows_weight_edits(gen):
    """wsum (the exact zero padding's correction) is derived from weight_bits:
    an in-place edit or a reassignment is seen at the next call, in eager and
    op paths alike; so are geometry attribute edits."""
    a = XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1, bias=False).eval())
    b = XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1, bias=False).eval())
    x = torch.randn(2, 8, 6, 6, generator=gen)
    a(x)
    with torch.no_grad():
        a.weight_bits.copy_(b.weight_bits)
        a.scale.copy_(b.scale)
    assert torch.equal(a(x), b(x))
    c = XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1, bias=False).eval())
    c(x)
    c.weight_bits = b.weight_bits.clone()
    c.scale = b.scale.clone()
    assert torch.equal(c(x), b(x))
    c.padding = (0, 0)
    assert c(x).shape == (2, 16, 4, 4)


def test_compile_in_grad_mode_and_dtypes(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6, generator=gen)
    want = model(x)
    pyaccel.patch(model)
    y = torch.compile(model)(x)  # grad mode: the first conv's parameters require grad
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    bf = copy.deepcopy(model).bfloat16()
    yb = bf(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and bf[1].scale.dtype == torch.float32


def test_folded_batchnorm1d_needs_2d_input(gen):
    model = nn.Sequential(BinaryLinear(8, 8), nn.BatchNorm1d(8)).eval()
    pyaccel.patch(model)
    x = torch.randn(4, 8, generator=gen)
    assert model(x).shape == (4, 8)
    with pytest.raises(ValueError, match="2-D input"):
        model(torch.randn(2, 8, 8, generator=gen))


@pytest.mark.parametrize("padding,k,dilation", [("same", 3, 1), ("same", 5, 2), ("valid", 3, 1)])
def test_patch_takes_string_padding_it_can_express(gen, padding, k, dilation):
    model = nn.Sequential(BinaryConv2d(8, 8, k, padding=padding, dilation=dilation), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 8, 11, 9, generator=gen)
    want = model(x)
    report = pyaccel.patch(model)
    assert isinstance(model[0], XnorConv2d), str(report)
    assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5)


def test_patch_reports_uneven_same_padding():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BinaryConv2d(8, 8, 4, padding="same"), nn.Linear(2, 2)).eval()
    report = pyaccel.patch(model)
    e = next(e for e in report.entries if e.path == "1")
    assert not e.swapped and "pads unevenly" in e.reason


def test_binarize_first_and_last_follow_the_forward():
    """The layers kept float are the first and last the forward calls (torch.fx
    order), not the first and last registered; a Linear subclass it cannot
    convert (MultiheadAttention's out_proj) is not taken for the classifier."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 10)  # registered first, called last
            self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh())
            self.proj = nn.modules.linear.NonDynamicallyQuantizableLinear(32, 32)

        def forward(self, x):
            return self.fc(self.proj(self.body(self.conv1(x)).mean((2, 3))))

    m = pyaccel.binarize(Net())
    kinds = {n: type(c).__name__ for n, c in m.named_modules() if isinstance(c, (nn.Conv2d, nn.Linear))}
    assert kinds == {"fc": "Linear", "conv1": "Conv2d", "body.0": "BinaryConv2d",
                     "proj": "NonDynamicallyQuantizableLinear"}


@needs_native
def test_cached_native_calls_follow_shapes_layouts_and_state(isa, gen):
    """The eager path keeps one prepared native call per input shape and strides:
    calls repeated in any order, after buffer edits and geometry changes give
    what the checked op path gives."""
    _, m = _xconv(gen, c=20, oc=24)
    base = torch.randn(3, 40, 9, 7, generator=gen)
    xs = [base[:, :20].contiguous(), base[:, :20].contiguous(memory_format=torch.channels_last), base[:1, :20],
          base[:, ::2], torch.randn(5, 20, 4, 6, generator=gen)]
    for _ in range(3):
        for x in xs:
            y = m(x)
            assert torch.equal(y, m._checked_op(x)) and y.is_contiguous(memory_format=torch.channels_last) == (
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    with torch.no_grad():
        m.weight_bits.copy_(m.weight_bits ^ bf.valid_bits_mask(m.weight_bits.shape, 24, 20))
        m.scale.mul_(-1)
    assert torch.equal(m(xs[1]), m._checked_op(xs[1]))
    m.padding = (0, 0)
    assert m(xs[0]).shape == (3, 24, 7, 5) and torch.equal(m(xs[0]), m._checked_op(xs[0]))
    lin = XnorLinear.from_binary(BinaryLinear(70, 40).eval())
    for _ in range(3):
        for x in (torch.randn(5, 70, generator=gen), torch.randn(2, 3, 70, generator=gen), torch.randn(70, generator=gen),
                  torch.randn(4, 140, generator=gen)[:, ::2], torch.randn(4, 80, generator=gen)[:, :70]):
            y = lin(x)
            assert y.shape == x.shape[:-1] + (40,) and torch.equal(y, lin._checked_op(x))


# ---- bit-packed hand-off between binary layers -----------------------------------------------------
def _binary_chain(groups=1, mode="zeros"):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Hardtanh(),
        BinaryConv2d(64, 64, 3, padding=1, groups=groups), nn.BatchNorm2d(64), nn.PReLU(64),
        BinaryConv2d(64, 96, 3, padding=1, stride=2, binary_padding=mode), nn.BatchNorm2d(96),
        BinaryConv2d(96, 130, 3, padding=1), nn.BatchNorm2d(130), nn.ReLU(),
        BinaryConv2d(130, 70, 1), nn.Hardtanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(70, 10))
    return _random_bn_statistics(model)


@needs_native
@pytest.mark.parametrize("groups,mode", [(1, "zeros"), (2, "ones")])
def test_handoff_chain_computes_the_float_chain(isa, gen, groups, mode):
    ref = _binary_chain(groups, mode)
    pyaccel.patch(ref, binary_handoff=False)
    model = _binary_chain(groups, mode)
    report = pyaccel.patch(model, binary_handoff=True)
    kinds = [(type(m).__name__, m.emit_bits, m.takes_bits) for m in model if isinstance(m, XnorConv2d)]
    assert kinds == [("XnorConv2d", True, False), ("XnorConv2d", True, True), ("XnorConv2d", True, True),
                     ("XnorConv2d", False, True)], kinds
    assert "hands packed signs to 6" in str(report)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    for x in (torch.randn(2, 3, 12, 10, generator=gen), cl(torch.randn(1, 3, 7, 9, generator=gen)),
              cl(torch.randn(2, 3, 12, 10, generator=gen)), torch.randn(0, 3, 8, 8)):
        with torch.no_grad():
            want, got = ref(x), model(x)
            want_last, got_last = ref[:13](x), model[:13](x)
            y1 = model[3](model[2](model[1](model[0](x))))
        # the same values, dtype and memory format as the float chain
        assert torch.equal(got_last, want_last) and torch.equal(got, want), (got - want).abs().max()
        assert got.dtype == want.dtype and got_last.stride() == want_last.stride()
        packed = x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0 and not x.is_contiguous()
        assert (y1.dtype == torch.int64) == packed, (x.shape, x.stride(), y1.dtype)
        if packed:  # 64 channels: one word per pixel; the checked path agrees
            assert y1.shape[-1] == 1 and torch.equal(model[6]._checked_op(y1), model[6](y1))
    # autograd keeps float activations, so the gradient reaches the float layers before the chain
    x = cl(torch.randn(2, 3, 12, 10, generator=gen)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    model(x).sum().backward()
    ref(xr).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_handoff_chain_takes_unbatched_input_as_the_float_chain_does(gen):
    def chain():
        torch.manual_seed(2)
        return _random_bn_statistics(nn.Sequential(BinaryConv2d(8, 64, 3, padding=1), nn.BatchNorm2d(64),
                                                   BinaryConv2d(64, 16, 3, padding=1), nn.BatchNorm2d(16)))
    ref, model = chain(), chain()
    pyaccel.patch(ref)
    pyaccel.patch(model, binary_handoff=True)
    assert model[0].emit_bits and model[2].takes_bits
    x = torch.randn(8, 6, 5, generator=gen)
    assert torch.equal(model(x), ref(x)) and model(x).shape == (16, 6, 5)
    xb = torch.randn(2, 8, 6, 5, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    y = model(xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref(xb)) and y.stride() == ref(xb).stride()


def test_handoff_chain_traces_compiles_and_reloads(gen):
    model = _binary_chain()
    pyaccel.patch(model, binary_handoff=True)
    x = torch.randn(2, 3, 12, 10, generator=gen)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(torch.jit.trace(model, x)(x), want)
        assert torch.allclose(torch.compile(model)(x), want, rtol=1e-5, atol=1e-5)
    fresh = _binary_chain()
    pyaccel.patch(fresh, binary_handoff=True)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    xf = torch.randn(2, 64, 6, 5, generator=gen)
    assert torch.equal(model[6](xf), model[6]._checked_op(xf))  # float input: taken as usual
    with pytest.raises(ValueError, match="x: this layer takes the packed signs"):
        model[6](torch.zeros(2, 6, 5, 3, dtype=torch.int64))  # 64 channels are one word, not 3


def test_handoff_not_taken_where_it_cannot_be(gen):
    model = _binary_chain()
    calls = []
    model[5].register_forward_pre_hook(lambda m, a: calls.append(a[0].dtype))  # the PReLU stays: not adjacent
    pyaccel.patch(model, binary_handoff=True)
    assert isinstance(model[5], nn.PReLU) and not model[3].emit_bits and not model[6].takes_bits
    assert model[6].emit_bits and model[8].takes_bits
    model(torch.randn(1, 3, 8, 8, generator=gen))
    assert calls == [torch.float32]
    off = _binary_chain()
    pyaccel.patch(off)  # the default keeps float activations
    assert not any(m.emit_bits or m.takes_bits for m in off if isinstance(m, XnorConv2d))
    grouped = nn.Sequential(nn.Conv2d(3, 64, 1), BinaryConv2d(64, 64, 3, padding=1),
                            BinaryConv2d(64, 64, 3, padding=1, groups=2), nn.Linear(2, 2)).eval()
    pyaccel.patch(grouped, binary_handoff=True)
    assert not grouped[1].emit_bits and not grouped[2].takes_bits


# ---- review findings (2nd round) ----------------------------------------------------------------
@pytest.mark.parametrize("attr,val", [("groups", 2), ("kernel_size", (5, 5)), ("out_channels", 200), ("act", "prelu")])
def test_geometry_assignment_is_checked_against_the_buffers(attr, val):
    m = XnorConv2d.from_binary(BinaryConv2d(20, 24, 3, padding=1).eval())
    x = torch.randn(1, 20, 8, 8)
    m(x)
    setattr(m, attr, val)
    with pytest.raises(ValueError, match="weight_bits|slope"):
        m._checked_op(x)
    with pytest.raises(ValueError, match="weight_bits|slope"):
        m(x)  # the eager path refuses too (it read past the buffers / a null slope before)


def test_mutating_a_padding_list_is_impossible():
    m = XnorConv2d.from_binary(BinaryConv2d(20, 24, 3, padding=1).eval())
    m.padding = [1, 1]
    assert m.padding == (1, 1) and isinstance(m.padding, tuple)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.PReLU(), nn.Hardtanh(-0.5, 0.5)])
def test_ste_gradient_matches_the_training_module_at_activation_kinks(act):
    torch.manual_seed(0)
    bc = BinaryConv2d(20, 24, 3, padding=1, bias=False).eval()
    m = XnorConv2d.from_binary(bc, None, act)
    x1 = torch.randn(2, 20, 7, 7).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = act(bc(x1)), m(x2)
    assert torch.allclose(y, y_ref) and ((y_ref == act(torch.zeros(()))).any() or isinstance(act, nn.PReLU))
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


# ---- new-user findings ----------------------------------------------------------------------------
def test_binarize_keeps_a_layer_at_two_paths_one_layer():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), conv, nn.ReLU(), conv, nn.Flatten(), nn.Linear(256, 10))
    pyaccel.binarize(m)
    assert isinstance(m[1], BinaryConv2d) and m[1] is m[3]
    m2 = nn.Sequential(conv, nn.ReLU(), conv, nn.Flatten(), nn.Linear(256, 10))
    pyaccel.binarize(m2)  # the shared conv is also the first layer at one path: float at both
    assert type(m2[0]) is nn.Conv2d and m2[0] is m2[2]


def test_a_lone_depthwise_binary_conv_is_swapped_and_reports_are_lossless():
    model = nn.Sequential(BinaryConv2d(64, 64, 3, padding=1, groups=64)).eval()
    report = pyaccel.patch(model)
    assert isinstance(model[0], XnorConv2d), str(report)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BinaryLinear(8, 8), nn.Linear(8, 2)).eval()
    report = pyaccel.patch(model, quantize="int8")
    assert not next(e for e in report.entries if e.path == "1").lossy


def test_a_one_channel_conv_is_not_called_depthwise():
    report = pyaccel.patch(nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU()).eval())
    assert "depthwise" not in str(report)


def test_binary_padding_checked_up_front():
    m = BinaryConv2d(4, 4, 3, padding="same", binary_padding="ones")
    assert m.padding == (1, 1)
    x = torch.randn(1, 4, 5, 5)
    want = rb.binary_conv2d(x, m.weight, m.alpha(), m.bias, 1, 1, 1, 1, "ones")
    assert torch.allclose(m(x), want, atol=1e-6)
    with pytest.raises(ValueError, match="pads unevenly"):
        BinaryConv2d(4, 4, 4, padding="same", binary_padding="ones")
    with pytest.raises(ValueError, match="binary_padding"):
        pyaccel.binarize(nn.Sequential(nn.Linear(2, 2)), binary_padding="bogus")


# ---- QA findings (binary family) ----------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("lo,hi", [(NAN, 1.0), (-1.0, NAN), (1.0, -1.0), (0.5, 0.5), (-INF, 1.0), (0.0, INF)])
def test_hardtanh_bounds_must_be_finite_and_ordered(lo, hi):
    """A NaN bound dropped its clamp in the kernels; reversed bounds gave a constant
    (a different one in the kernels and in torch.clamp): both are refused."""
    with pytest.raises(ValueError, match="act_lo / act_hi"):
        XnorConv2d(8, 16, 3, padding=1, act="hardtanh", act_lo=lo, act_hi=hi)
    with pytest.raises(ValueError, match="act_lo / act_hi"):
        XnorLinear(8, 16, act="hardtanh", act_lo=lo, act_hi=hi)
    ht = nn.Hardtanh()
    ht.min_val, ht.max_val = lo, hi  # nn.Hardtanh checks its bounds only when built
    with pytest.raises(ValueError, match="act: Hardtanh"):
        XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1).eval(), None, ht)
    with pytest.raises(ValueError, match="act: Hardtanh"):
        XnorLinear.from_binary(BinaryLinear(8, 16).eval(), None, ht)


def test_hardtanh_bounds_other_activations_and_assignments(gen):
    m = XnorConv2d(8, 16, 3, padding=1, act="hardtanh")  # nn.Hardtanh's default bounds
    assert (m.act_lo, m.act_hi) == (-1.0, 1.0) and "hardtanh(-1, 1)" in repr(m)
    XnorConv2d(8, 16, 3, act="relu", act_lo=NAN)  # the other activations ignore the bounds
    with pytest.raises(TypeError, match="act_hi: expected a real number"):
        XnorLinear(8, 16, act="hardtanh", act_hi="1")
    x = torch.randn(2, 8, 6, 6, generator=gen)
    m(x)
    m(x)  # a native plan for this shape
    m.act_lo = NAN
    for call in (m, m._checked_op):
        with pytest.raises(ValueError, match="act_lo / act_hi"):
            call(x)
    m.act_lo = -0.5
    assert m(x).min() == -0.5
    lin = XnorLinear(8, 4, act="hardtanh", act_lo=-0.5, act_hi=0.5)
    lin.act_hi = -1.0
    with pytest.raises(ValueError, match="act_lo / act_hi"):
        lin(torch.randn(3, 8, generator=gen))


def test_patch_leaves_a_hardtanh_it_cannot_fold(gen):
    ht = nn.Hardtanh()
    ht.min_val = NAN
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BinaryConv2d(8, 8, 3, padding=1), ht).eval()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    want = model(x)
    pyaccel.patch(model)
    assert isinstance(model[1], XnorConv2d) and model[1].act == "none" and model[2] is ht
    torch.testing.assert_close(model(x), want, equal_nan=True)


@pytest.mark.parametrize("bn,exc,match", [
    (nn.BatchNorm2d(16), ValueError, r"bn: in training mode .* call \.eval\(\)"),
    (nn.BatchNorm2d(15).eval(), ValueError, "bn: expected 16 features"),
    (nn.BatchNorm2d(16, track_running_stats=False).eval(), ValueError, "bn: no running statistics"),
    (nn.BatchNorm1d(16).eval(), TypeError, "bn: expected an nn.BatchNorm2d"),
    (nn.LayerNorm(16), TypeError, "bn: expected an nn.BatchNorm2d"),
])
def test_from_binary_conv_refuses_a_batchnorm_it_cannot_fold(bn, exc, match):
    with pytest.raises(exc, match=match):
        XnorConv2d.from_binary(BinaryConv2d(8, 16, 3, padding=1).eval(), bn)


@pytest.mark.parametrize("bn,exc,match", [
    (nn.BatchNorm1d(16), ValueError, r"bn: in training mode .* call \.eval\(\)"),
    (nn.BatchNorm1d(15).eval(), ValueError, "bn: expected 16 features"),
    (nn.BatchNorm1d(16, track_running_stats=False).eval(), ValueError, "bn: no running statistics"),
    (nn.BatchNorm2d(16).eval(), TypeError, "bn: expected an nn.BatchNorm1d"),
])
def test_from_binary_linear_refuses_a_batchnorm_it_cannot_fold(bn, exc, match):
    with pytest.raises(exc, match=match):
        XnorLinear.from_binary(BinaryLinear(8, 16).eval(), bn)


def test_fold_epilogue_and_prelu_name_their_argument():
    from pyaccel.nn.xnor import fold_epilogue

    with pytest.raises(ValueError, match="bn: in training mode"):
        fold_epilogue(torch.ones(16), None, nn.BatchNorm2d(16))
    with pytest.raises(ValueError, match="act: PReLU with 3 slopes"):
        XnorConv2d.from_binary(BinaryConv2d(8, 16, 3).eval(), None, nn.PReLU(3))
    with pytest.raises(ValueError, match="act: expected nn.ReLU"):
        XnorConv2d.from_binary(BinaryConv2d(8, 16, 3).eval(), None, nn.GELU())


def _handoff_pair(c):
    def chain():
        torch.manual_seed(3)
        return _random_bn_statistics(nn.Sequential(BinaryConv2d(8, c, 3, padding=1), nn.BatchNorm2d(c),
                                                   BinaryConv2d(c, 24, 3, padding=1), nn.BatchNorm2d(24)))
    model = chain()
    pyaccel.patch(model, binary_handoff=True)
    assert model[0].emit_bits and model[2].takes_bits
    return model


@needs_native
@pytest.mark.parametrize("c", [16, 96])
def test_packed_signs_past_the_channels_are_ignored(isa, gen, c):
    """The taking layer's kernel counted the bits past its input channels in the
    last word (its torch path did not): now every path ignores them."""
    model = _handoff_pair(c)
    x = torch.randn(2, 8, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        bits = model[0](x)
        assert bits.dtype == torch.int64 and bits.shape == (2, 6, 5, bf.words(c))
        want = model[2](bits)
        junk = bits.clone()
        junk[..., -1] |= torch.randint(0, 2 ** 40, bits.shape[:3], generator=gen) << (c % 64)
        assert not torch.equal(junk, bits)
        for _ in range(3):  # the checked call, then the native plan for this shape
            assert torch.equal(model[2](junk), want)
        assert torch.equal(model[2]._checked_op(junk), want)  # the torch path
        assert torch.equal(model[2](bits), want)


def test_patch_report_counts_a_folded_chain_as_one_swap():
    """BatchNorms and activations folded into a binary layer were reported as
    swaps of their own ("Identity"): 9 swapped for 3 layers on the digits model."""
    model = _bnn()
    report = pyaccel.patch(model)
    swapped = {e.path: e for e in report.swapped}
    assert sorted(swapped) == ["12", "3", "6.0", "7", "9"], str(report)
    assert all(e.new_type in ("XnorConv2d", "XnorLinear") for e in swapped.values())
    assert swapped["3"].span == ["3", "4", "5"] and swapped["6.0"].span == ["6.0", "6.1", "6.2"]
    assert swapped["9"].span == ["9", "10", "11"] and swapped["7"].span is None
    assert swapped["3"].old_type == "BinaryConv2d+BatchNorm2d+PReLU"
    assert report.folded == 6 and not any(e.path in ("4", "5", "10", "11") for e in report.entries)
    text = str(report)
    assert f"5 swapped, {len(report.skipped)} skipped (6 more modules fused or folded into the swapped ones)" in text
    assert "3 .. 5" in text and "folded 4 (BatchNorm2d), 5 (PReLU)" in text


def test_trace_does_not_warn(gen):
    """A shape check compared traced sizes (tensors under torch.jit.trace): a TracerWarning per trace."""
    _, conv = _xconv(gen)
    lin = XnorLinear.from_binary(BinaryLinear(40, 8).eval(), None, nn.Hardtanh(-0.5, 0.5))
    handoff = _handoff_pair(16)
    for m, x in ((conv, torch.randn(2, 20, 6, 6, generator=gen)), (lin, torch.randn(3, 40, generator=gen)),
                 (handoff, torch.randn(2, 8, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last))):
        with torch.no_grad():
            want = m(x)
            with warnings.catch_warnings():
                warnings.filterwarnings("error", category=torch.jit.TracerWarning)
                traced = torch.jit.trace(m, x)
            assert torch.equal(traced(x), want)
    with pytest.raises(ValueError, match=r"x: expected \[N, 20, H, W\]"):
        torch.jit.trace(conv, torch.randn(2, 21, 6, 6))


def test_binarize_refuses_pruned_layers_before_changing_anything():
    """binarize on a model with a torch.nn.utils.prune-pruned layer failed with
    torch's "cannot assign 'torch.FloatTensor' as parameter 'weight'" halfway,
    leaving [Linear, BinaryLinear, BinaryLinear, Linear, Linear]."""
    from torch.nn.utils import parametrize

    import pyaccel.prune

    def model():
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)], nn.Linear(16, 4))

    m = model()
    pyaccel.prune.prune_24(m, include="3")
    with pytest.raises(ValueError, match=r"binarize: 3 \(Linear\): its weight is pruned with torch.nn.utils.prune"):
        pyaccel.binarize(m)
    assert [type(x) for x in m] == [nn.Linear] * 5
    m = model()

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    # a parametrized layer is a subclass (ParametrizedLinear): left as it is, like every subclass
    parametrize.register_parametrization(m[2], "weight", Scale())
    pyaccel.binarize(m)
    assert [type(x).__name__ for x in m] == ["Linear", "BinaryLinear", "ParametrizedLinear", "BinaryLinear", "Linear"]
    # the pruned layer left out by filter_fn: the rest converts
    m = model()
    pyaccel.prune.prune_24(m, include="3")
    pyaccel.binarize(m, filter_fn=lambda mod, path: path != "3")
    assert [type(x).__name__ for x in m] == ["Linear", "BinaryLinear", "BinaryLinear", "Linear", "Linear"]
