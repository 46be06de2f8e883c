"""Int8Linear: accuracy (SQNR), torch.ao interop, persistence, compile, errors."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import pyaccel
from pyaccel import reference
from pyaccel.nn import Int8Linear

from _helpers import sqnr_db


def _ao_dynamic(model, per_channel: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
                   else torch.ao.quantization.default_dynamic_qconfig)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


@pytest.mark.parametrize("n,k", [(256, 256), (1024, 512), (100, 333)])
def test_from_float_sqnr_at_least_35db(isa, gen, n, k):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n)  # default init
    x = torch.randn(64, k, generator=gen)
    m = Int8Linear.from_float(lin)
    with torch.no_grad():
        ref = lin(x)
        y = m(x)
    db = sqnr_db(ref, y)
    assert db >= 35.0, f"SQNR {db:.1f} dB"


@pytest.mark.parametrize("per_channel", [False, True])
def test_from_torch_ao_at_least_as_accurate(gen, per_channel):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50))
    x = torch.randn(32, 300, generator=gen)
    with torch.no_grad():
        ref = model(x)
        aq = _ao_dynamic(copy.deepcopy(model), per_channel)
        y_ao = aq(x)
        report = pyaccel.patch(aq)
        assert len(report.swapped) == 2, str(report)
        assert all(isinstance(m, Int8Linear) for m in (aq[0], aq[2]))
        y = aq(x)
    assert sqnr_db(ref, y) >= sqnr_db(ref, y_ao), (sqnr_db(ref, y), sqnr_db(ref, y_ao))


def test_from_torch_ao_reuses_weights():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32))
    aq = _ao_dynamic(model, per_channel=True)
    wq, b = aq[0]._packed_params._weight_bias()
    m = Int8Linear.from_module(aq[0])
    assert torch.equal(m.weight_int8, wq.int_repr().clamp(min=-127))
    assert torch.allclose(m.weight_scale, wq.q_per_channel_scales().float())
    assert torch.equal(m.bias, b)


def test_torch_ao_minus_128_is_clamped_and_reported():
    aq = _ao_dynamic(nn.Sequential(nn.Linear(8, 4)), per_channel=False)
    w = torch.rand(4, 8)  # in [0, 1): 0..100 steps
    w[0, 0] = -128 * 0.01  # exactly -128 steps of the scale below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)
    assert int(qw.int_repr().min()) == -128
    aq[0].set_weight_bias(qw, torch.zeros(4))
    report = pyaccel.patch(aq)
    assert "clamped 1 weight value(s) from -128 to -127" in str(report)
    assert int(aq[0].weight_int8.min()) == -127


def _model():
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 24, bias=False))


def test_state_dict_round_trip_into_fresh_patched_model(gen):
    torch.manual_seed(3)
    a = _model()
    pyaccel.patch(a, quantize="int8")
    sd = a.state_dict()
    assert set(sd) == {"0.weight_int8", "0.weight_scale", "0.bias", "2.weight_int8", "2.weight_scale"}
    assert not any(v.dtype == torch.uint8 for v in sd.values()), "packing must not be saved"
    torch.manual_seed(4)
    b = _model()
    pyaccel.patch(b, quantize="int8")
    x = torch.randn(5, 48, generator=gen)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(sd)
    assert torch.equal(a(x), b(x))


def test_torch_save_load_and_deepcopy(gen):
    a = _model()
    pyaccel.patch(a, quantize="int8")
    x = torch.randn(3, 48, generator=gen)
    y = a(x)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    b = torch.load(buf, weights_only=False)
    assert torch.equal(b(x), y)
    c = copy.deepcopy(a)
    assert torch.equal(c(x), y)
    assert c[0]._packed is not None and c[0]._packed.data_ptr() != a[0]._packed.data_ptr()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    a2 = _model()
    pyaccel.patch(a2, quantize="int8")
    a2.load_state_dict(torch.load(buf))
    assert torch.equal(a2(x), y)


def test_eager_path_matches_op_path(isa, gen):
    m = Int8Linear.from_float(nn.Linear(70, 33))
    for x in (torch.randn(4, 70, generator=gen), torch.randn(2, 3, 70, generator=gen).to(torch.bfloat16)):
        y_eager = m(x)
        y_op = torch.ops.pyaccel.int8_linear(x, m.weight_int8, m.weight_scale, m.bias, m._packed)
        assert torch.equal(y_eager, y_op)
        assert y_eager.dtype == x.dtype


def test_torch_compile_matches_eager(gen):
    model = _model()
    pyaccel.patch(model, quantize="int8")
    x = torch.randn(6, 48, generator=gen)
    eager = model(x)
    compiled = torch.compile(model, backend="inductor")
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_reference_backend_when_unpacked(gen):
    m = Int8Linear.from_float(nn.Linear(20, 10))
    m._packed, m._plan = None, None  # as when the native library is missing
    x = torch.randn(3, 20, generator=gen)
    assert torch.allclose(m(x), reference.int8_linear(x, m.weight_int8, m.weight_scale, m.bias))


def test_extra_repr_shows_backend():
    m = Int8Linear.from_float(nn.Linear(8, 4))
    assert "backend=cpu/" in repr(m)


def test_errors_name_the_argument(gen):
    m = Int8Linear.from_float(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"x: expected last dimension K=16"):
        m(torch.randn(2, 17))
    with pytest.raises(TypeError, match=r"x: expected float32 or bfloat16"):
        m(torch.randn(2, 16).double())
    with pytest.raises(TypeError, match=r"x: expected float32 or bfloat16"):
        m(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"linear: expected torch.nn.Linear or a transformers Conv1D, got Conv2d"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match=r"module: expected torch.ao.nn.quantized.dynamic.Linear"):
        Int8Linear.from_module(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"in_features/out_features"):
        Int8Linear(0, 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"w_int8: expected a tensor on x's device"):
            m(torch.randn(2, 16, device="cuda"))
    else:
        # a tensor on another device than the module: named, not a crash
        with pytest.raises(ValueError, match=r"w_int8: expected a tensor on x's device meta"):
            m(torch.randn(2, 16, device="meta"))


@pytest.mark.parametrize("bad", [torch.tensor(7.5), torch.tensor(7.0), torch.tensor(True), torch.tensor([7]) * 1.0,
                                 7.5, 7.0], ids=["7.5", "7.0-tensor", "bool", "float-1d", "py-7.5", "py-7.0"])
def test_state_dict_act_bits_must_be_an_integer(gen, bad):
    """A state_dict act_bits of 7.5 loaded as 7 (int() truncated it) where
    ``module.act_bits = 7.5`` / ``7.0`` are refused: non-integers are refused
    on load too, naming the key; nothing is loaded."""
    src = Int8Linear.from_float(nn.Linear(16, 8), act_bits=7)
    sd = src.state_dict()
    sd["act_bits"] = bad
    mod = Int8Linear.from_float(nn.Linear(16, 8))
    before = mod.weight_int8.clone()
    with pytest.raises(RuntimeError, match=r"act_bits: expected the integer 8 or 7"):
        mod.load_state_dict(sd)
    assert mod.act_bits == 8 and torch.equal(mod.weight_int8, before)
    wrapped = nn.Sequential(Int8Linear.from_float(nn.Linear(16, 8)))
    with pytest.raises(RuntimeError, match=r"0\.act_bits: expected the integer 8 or 7"):
        wrapped.load_state_dict({f"0.{k}": v for k, v in sd.items()})
    sd["act_bits"] = torch.tensor(7, dtype=torch.int32)  # any integer dtype
    mod.load_state_dict(sd)
    assert mod.act_bits == 7


def test_hooks_still_run(gen):
    m = Int8Linear.from_float(nn.Linear(8, 4))
    seen = []
    h1 = m.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    h2 = m.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    m(torch.randn(2, 8, generator=gen))
    assert seen == ["pre", torch.Size([2, 4])]
    h1.remove()
    h2.remove()
    g = nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append("global"))
    try:
        m(torch.randn(2, 8, generator=gen))
    finally:
        g.remove()
    assert seen[-1] == "global"


def test_non_tensor_input_is_a_type_error():
    m = Int8Linear.from_float(nn.Linear(4, 2))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        m([1.0] * 4)


def test_from_float_tiny_weight_rows(isa, gen):
    """Issue 9, fault 4: a weight row with max|w| = 2e-37 (a normal fp32 number)
    used to quantize to a sign pattern (127 / amax overflowed; row error 1.69)."""
    k, n = 96, 7
    lin = nn.Linear(k, n, bias=False)
    amaxes = torch.tensor([1.0, 2e-37, 3.7e-37, 1e-38, 1e-30, 0.05, 1e-40], dtype=torch.float64)
    with torch.no_grad():
        w = torch.randn(n, k, generator=gen, dtype=torch.float64)
        lin.weight.copy_((w / w.abs().amax(dim=1, keepdim=True) * amaxes[:, None]).float())
    m = Int8Linear.from_float(lin)
    w64 = lin.weight.double()
    err = (m.dequantized_weight().double() - w64).norm(dim=1) / w64.norm(dim=1)
    assert (err[:6] < 1e-2).all() and err[6] < 2e-2, err.tolist()  # 1e-40: subnormal scale
    x = torch.randn(5, k, generator=gen)
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, reference.int8_linear(x, m.weight_int8, m.weight_scale, None))
    y64 = x.double() @ w64.t()
    col_err = (y.double() - y64).norm(dim=0) / y64.norm(dim=0)
    assert (col_err < 3e-2).all(), col_err.tolist()
