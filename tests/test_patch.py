"""pyaccel.patch: what it swaps, what it leaves (and why), filters, inplace."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pyaccel
from pyaccel.nn import Int8Linear
from pyaccel.prune import prune_24

from _helpers import sqnr_db


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(x + self.mlp(self.attn(x)))


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _net():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(32, 10))


def test_default_patch_is_lossless_and_reports_reasons():
    net = _net()
    x = torch.randn(4, 32)
    before = net(x)
    report = pyaccel.patch(net)
    assert report.model is net
    assert not report.swapped
    assert len(report.skipped) == 7
    assert all("quantize='int8'" in e.reason for e in report.skipped)
    assert torch.equal(net(x), before)
    text = str(report)
    assert "0.mlp.0" in text and "skipped" in text and "0 swapped, 7 skipped" in text


def test_quantize_int8_swaps_every_linear():
    net = _net()
    x = torch.randn(8, 32)
    ref = net(x)
    report = pyaccel.patch(net, quantize="int8")
    assert len(report.swapped) == 7
    assert all(isinstance(m, Int8Linear) for n, m in net.named_modules() if n.endswith(("attn", "mlp.0", "mlp.2")))
    assert all(e.lossy and e.backend.startswith("cpu/") for e in report.swapped)
    assert sqnr_db(ref, net(x)) > 25
    # patching again changes nothing, and the report says why for each swapped module
    again = pyaccel.patch(net, quantize="int8")
    assert not again.swapped and len(again.entries) == 7
    assert all(e.reason.startswith("already a pyaccel module") for e in again.entries)


def test_inplace_false_leaves_original_untouched():
    net = _net()
    report = pyaccel.patch(net, quantize="int8", inplace=False)
    assert report.model is not net
    assert isinstance(report.model[2], Int8Linear)
    assert type(net[2]) is nn.Linear


def test_filters():
    net = _net()
    report = pyaccel.patch(net, quantize="int8", filter_fn=lambda m, path: m.out_features != 10)
    assert type(net[2]) is nn.Linear
    assert any(e.path == "2" and "filter_fn" in e.reason for e in report.skipped)
    net = _net()
    report = pyaccel.patch(net, quantize="int8", include="*.mlp.*")
    assert {e.path for e in report.swapped} == {"0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"}
    net = _net()
    report = pyaccel.patch(net, quantize="int8", exclude=["0.*", "2"])
    assert {e.path for e in report.swapped} == {"1.attn", "1.mlp.0", "1.mlp.2"}


def test_subclass_and_root_module():
    net = nn.Sequential(MyLinear(4, 4), nn.Linear(4, 4))
    report = pyaccel.patch(net, quantize="int8")
    assert type(net[0]) is MyLinear
    assert "subclass MyLinear" in report.skipped[0].reason
    lin = nn.Linear(5, 3)
    # the root cannot be replaced in place: said (a user kept calling `lin`, still nn.Linear)
    with pytest.warns(UserWarning, match=r"itself a single replaceable module \(Linear\).*report.model"):
        report = pyaccel.patch(lin, quantize="int8")
    assert isinstance(report.model, Int8Linear) and type(lin) is nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(pyaccel.patch(lin.eval(), quantize="int8", inplace=False).model, Int8Linear)


def test_selection_mistakes_are_said():
    """An include pattern that matched nothing and a filter_fn that raised
    (the README's own `module.out_features` filter on GPT-2's Conv1D) left
    every layer as it was with nothing said outside the report."""
    net = _net()
    with pytest.warns(UserWarning, match=r"include pattern 'encoder\.\*' matches no module path .*'0\.mlp\.0'"):
        report = pyaccel.patch(net, quantize="int8", include=["*.mlp.*", "encoder.*"])
    assert {e.path for e in report.swapped} == {"0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"}
    # a single pattern string is one pattern (it was warned about character by character)
    with pytest.warns(UserWarning) as got:
        pyaccel.patch(_net(), quantize="int8", include="xyz*")
    assert [str(w.message).split("'")[1] for w in got if "include pattern" in str(w.message)] == ["xyz*"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyaccel.patch(_net().eval(), quantize="int8", include="*.mlp.*")

    class Odd(nn.Module):  # a Linear-like layer without out_features (transformers' Conv1D has nf)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            del self.proj.out_features

        def forward(self, x):
            return self.proj(x)

    net = nn.Sequential(Odd(), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"filter_fn raised for 1 module\(s\).*first: 0\.proj: filter_fn raised "
                                         r"AttributeError"):
        report = pyaccel.patch(net, quantize="int8", filter_fn=lambda m, path: m.out_features >= 8)
    assert [e.path for e in report.swapped] == ["1"]


def test_training_flag_and_mixed_models_kept():
    net = _net().eval()
    pyaccel.patch(net, quantize="int8")
    assert not net[2].training


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        pyaccel.patch(object())
    with pytest.raises(ValueError, match="quantize: expected one of"):
        pyaccel.patch(nn.Linear(2, 2), quantize="int4")
    with pytest.raises(TypeError, match="filter_fn: expected a callable"):
        pyaccel.patch(nn.Linear(2, 2), filter_fn=3)
    for name, bad in (("include", 3), ("exclude", ["0", 1]), ("include", b"0")):
        with pytest.raises(TypeError, match=f"{name}: expected None, an fnmatch pattern string or a list"):
            pyaccel.patch(nn.Linear(2, 2), **{name: bad})
        with pytest.raises(TypeError, match=f"{name}: expected None"):
            prune_24(nn.Linear(8, 2), **{name: bad})
    # tuples, lists, sets and generators are fine (a generator is read once)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    report = pyaccel.patch(net, quantize="int8", include=(p for p in ["0", "1"]), exclude={"1"})
    assert [e.path for e in report.swapped] == ["0"]


def test_layers_in_training_mode_are_swapped_with_a_warning():
    """A trainable layer in training mode becomes an inference module (weights
    as buffers): patch says so; in eval mode, or with frozen weights, it does not."""
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) in training mode with trainable weights .*\(0, 2\)"):
        pyaccel.patch(copy.deepcopy(net), quantize="int8")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyaccel.patch(copy.deepcopy(net).eval(), quantize="int8")
        frozen = copy.deepcopy(net).requires_grad_(False)
        pyaccel.patch(frozen, quantize="int8")


def test_model_that_cannot_be_accelerated_is_left_as_is():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    sd = copy.deepcopy(net.state_dict())
    report = pyaccel.patch(net, quantize="int8")
    assert not report.swapped and "0 swapped, 1 skipped" in str(report)
    (entry,) = report.skipped
    assert entry.path == "0" and "no pyaccel kernel for this Conv2d (3x3, groups 1)" in entry.reason
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


def test_layer_the_kernels_cannot_take_is_left_with_reason():
    from pyaccel.reference import INT8_MAX_K

    wide = nn.Linear(INT8_MAX_K + 8, 2, bias=False)
    net = nn.Sequential(wide, nn.Linear(2, 2))
    report = pyaccel.patch(net, quantize="int8")
    assert net[0] is wide
    assert "exceeds" in report.skipped[0].reason
    assert type(net[1]) is Int8Linear


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_empty_linear_is_left_with_reason(quantize):
    """nn.Linear(8, 0) gave "could not read the module (RuntimeError): cannot
    reshape tensor of 0 elements ..."; nn.Linear(0, 8) advised quantize='int8',
    which then failed: an empty layer is left as is with its own reason."""
    net = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8))
    report = pyaccel.patch(net, quantize=quantize)
    assert not report.swapped
    reasons = {e.path: e.reason for e in report.skipped}
    assert reasons == {"0": "empty Linear (in_features 8, out_features 0): pyaccel modules need both >= 1; left as is",
                       "1": "empty Linear (in_features 0, out_features 8): pyaccel modules need both >= 1; left as is"}


def test_tied_output_layer_reason_does_not_advise_quantizing():
    """A float layer tied to an embedding stays as is whatever the options: the
    report says so instead of suggesting quantize='int8' (which would skip it too)."""
    import pyaccel

    emb = torch.nn.Embedding(50, 64)
    head = torch.nn.Linear(64, 50, bias=False)
    head.weight = emb.weight
    for q in (None, "int8"):
        m = torch.nn.Sequential(emb, head)
        r = pyaccel.patch(m, quantize=q) if q else pyaccel.patch(m)
        by_path = {e.path: e.reason for e in r.entries}
        assert "tied to 0's" in by_path["1"] and "quantize" not in by_path["1"], by_path
        assert by_path["0"] == "no pyaccel kernel for Embedding"


def test_torch_ao_static_quantized_modules_are_reported():
    """A prepare / convert model said "0 swapped, 0 skipped": its quantized
    Linear / Conv2d (weight() a method) were not mentioned at all."""
    import torch.ao.quantization as tq

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.lin, self.dq = tq.QuantStub(), nn.Linear(16, 8), tq.DeQuantStub()

        def forward(self, x):
            return self.dq(self.lin(self.q(x)))

    m = M().eval()
    m.qconfig = tq.get_default_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings
        prepared = tq.prepare(m)
        prepared(torch.randn(4, 16))
        qm = tq.convert(prepared)
    report = pyaccel.patch(qm)
    (entry,) = [e for e in report.entries if e.path == "lin"]
    assert not entry.swapped and "torch.ao static quantized Linear" in entry.reason
    assert "quantize_dynamic" in entry.reason


def test_prune_says_when_it_prunes_nothing():
    """prune_24 / prune_blocks returned [] without a word when include matched
    nothing or the model was already patched."""
    from pyaccel.prune import prune_24, prune_blocks

    with pytest.warns(UserWarning, match=r"prune_24: include pattern 'encoder\.\*' matches no module path"):
        assert prune_24(_net(), include="encoder.*") == []
    patched = pyaccel.patch(_net().eval(), quantize="int8").model
    for fn, kw in ((prune_24, {}), (prune_blocks, {"sparsity": 0.5, "block": (4, 4)})):
        with pytest.warns(UserWarning, match=rf"{fn.__name__}: no layer to prune"):
            assert fn(patched, **kw) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prune_24(_net(), include="*.mlp.*")
