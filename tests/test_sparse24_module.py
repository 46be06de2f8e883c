"""Sparse24Linear, 2:4 pruning (pyaccel.prune) and patch detection."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import pyaccel
import pyaccel.prune
from pyaccel import _native
from pyaccel.formats import sparse24 as s24
from pyaccel.nn import Sparse24Linear


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 33), nn.Linear(33, 5, bias=False))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_prune_then_patch_matches_masked_model(gen):
    net = _net()
    paths = pyaccel.prune.prune_24(net)
    assert paths == ["0", "2", "3"]
    x = torch.randn(7, 64, generator=gen)
    with torch.no_grad():
        ref = net(x)
        report = pyaccel.patch(net)
        assert [type(net[i]) for i in (0, 2, 3)] == [Sparse24Linear] * 3, str(report)
        assert all(not e.lossy for e in report.swapped)
        assert _rel(net(x), ref) <= 1e-5


def test_plain_zeros_are_detected_and_dense_layers_reported(gen):
    net = _net()
    with torch.no_grad():
        net[0].weight.mul_(s24.mask_24(net[0].weight))
    report = pyaccel.patch(net)
    assert type(net[0]) is Sparse24Linear
    reasons = {e.path: e.reason for e in report.skipped}
    assert "not 2:4" in reasons["2"]


def test_masks_stay_fixed_during_fine_tuning(gen):
    net = _net()
    pyaccel.prune.prune_24(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        loss = net(torch.randn(8, 64, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for i in (0, 2, 3):
        assert s24.is_24(net[i].weight)
    pyaccel.prune.make_permanent(net)
    assert not hasattr(net[0], "weight_mask") and s24.is_24(net[0].weight)
    pyaccel.patch(net)
    assert type(net[0]) is Sparse24Linear


def test_torch_prune_mask_combined_with_existing_mask(gen):
    lin = nn.Linear(16, 8)
    torch_prune.l1_unstructured(lin, "weight", amount=0.3)
    before = lin.weight_mask.clone()
    pyaccel.prune.prune_24(nn.Sequential(lin))
    assert s24.is_24(lin.weight)
    assert bool(((lin.weight_mask <= before)).all())


def test_state_dict_save_load_deepcopy(gen):
    net = _net()
    pyaccel.prune.prune_24(net)
    pyaccel.patch(net)
    sd = net.state_dict()
    assert set(sd) >= {"0.values", "0.metadata", "0.bias", "3.values", "3.metadata"}
    x = torch.randn(4, 64, generator=gen)
    y = net(x)
    other = _net()
    with torch.no_grad():
        for m in (other[0], other[2], other[3]):
            m.weight.mul_(s24.mask_24(m.weight))
    pyaccel.patch(other)
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(copy.deepcopy(net)(x), y)


def test_bf16_3d_and_compile(gen):
    net = _net()
    pyaccel.prune.prune_24(net)
    pyaccel.patch(net)
    x = torch.randn(2, 3, 64, generator=gen)
    y = net(x)
    assert y.shape == (2, 3, 5)
    yb = net(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), y, atol=0.05, rtol=0.05)
    compiled = torch.compile(net)
    assert torch.allclose(compiled(x), y, rtol=1e-5, atol=1e-5)


def test_errors(gen):
    with pytest.raises(ValueError, match="weight: not 2:4 sparse"):
        Sparse24Linear.from_float(nn.Linear(16, 4))
    with pytest.raises(TypeError, match="linear: expected torch.nn.Linear"):
        Sparse24Linear.from_float(nn.Conv2d(2, 2, 1))
    m = Sparse24Linear(16, 4)
    with pytest.raises(ValueError, match="x: expected last dimension K=16"):
        m(torch.randn(2, 15))
    assert "sparsity=2:4" in repr(m)


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0)])
def test_empty_weight_is_refused_naming_it(shape):
    """from_dense of a weight without rows or columns failed inside torch
    ("cannot reshape tensor of 0 elements into shape [0, -1, 4]"); the format
    functions take it (a 2:4 weight, vacuously)."""
    from pyaccel.nn import Sparse24Int8Linear

    w = torch.zeros(shape)
    for cls in (Sparse24Linear, Sparse24Int8Linear):
        with pytest.raises(ValueError, match=rf"weight: expected \[out_features, in_features\] with both >= 1, got "
                                             rf"shape \({shape[0]}, {shape[1]}\)"):
            cls.from_dense(w)
    assert s24.is_24(w) and s24.mask_24(w).shape == shape
    assert torch.equal(s24.decompress(s24.compress(w)), w)


def test_quantize_int8_on_2_4_model_uses_sparse_int8(gen):
    from pyaccel.nn import Sparse24Int8Linear

    from _helpers import sqnr_db

    net = _net()
    pyaccel.prune.prune_24(net)
    x_small = torch.randn(3, 64, generator=gen)
    x_big = torch.randn(13, 64, generator=gen)
    with torch.no_grad():
        ref_s, ref_b = net(x_small), net(x_big)
        report = pyaccel.patch(net, quantize="int8")
        assert [type(net[i]) for i in (0, 2, 3)] == [Sparse24Int8Linear] * 3, str(report)
        assert all(e.lossy for e in report.swapped)
        ys, yb = net(x_small), net(x_big)
    assert sqnr_db(ref_s, ys) > 25 and sqnr_db(ref_b, yb) > 25
    # both paths compute the same integers
    ys2 = net(torch.cat([x_small, x_big]))[:3]
    assert torch.allclose(ys2, ys, rtol=1e-6, atol=1e-6)
    sd = net.state_dict()
    assert {"0.values", "0.metadata", "0.weight_scale"} <= set(sd) and sd["0.values"].dtype == torch.int8
    c = copy.deepcopy(net)
    assert torch.equal(c(x_small), ys) and torch.equal(c(x_big), yb)


def test_non_tensor_input_is_a_type_error():
    m = Sparse24Linear(16, 4)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m([1.0] * 16)


@pytest.mark.skipif(not _native.available(), reason="native library not loaded")
def test_sparse_int8_switches_to_dense_where_the_kernel_says(isa, gen):
    """Where the selected 2:4 int8 kernel loses to dense int8 at many rows (the
    AVX-512 VNNI one without VBMI, the AVX-VNNI one, the ICL one against the AMX dense kernel),
    the module switches kernels from that row
    count: both compute the same integers."""
    from pyaccel.nn import Sparse24Int8Linear

    lin = torch.nn.Linear(72, 40)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    mod = Sparse24Int8Linear.from_float(lin)
    rows = _native.lib().s24i8_dense_from_rows()
    assert rows == {"avx512_amx": 9, "avx512_vnni": 8, "avx_vnni": 2}.get(isa, 0)
    # rows inside the switch window: from `rows` on (AVX-VNNI: up to 7 on this small layer)
    x = torch.randn(rows + 5 if isa == "avx_vnni" else 3 * max(rows, 8) + 1, 72, generator=gen)
    y_all = mod(x)
    assert (mod._dense is not None) == (rows > 0)
    if rows > 0:
        # the first switch attached the dense plan: the native forward now runs those rows itself
        assert mod._plan.dense is mod._dense[0]
        y_native = mod._plan.forward(x)
        assert y_native is not None and torch.equal(y_native, y_all)
    y_rows = torch.cat([mod(x[i:i + 1]) for i in range(x.shape[0])])  # 1 row: always the sparse kernel
    assert torch.equal(y_all, y_rows)
    assert torch.equal(mod(x.view(1, -1, 72)).view(-1, 40), y_all)  # 3-D input, same fast path
    # the AVX-VNNI kernel wins again at many rows (8 on layers under 4 Mi weights; bigger ones never switch):
    # past that window the native forward runs the 2:4 kernel, with the same integers
    p = _native.lib().kernel_params()["sparse24_int8"]
    big, small = p["sparse_from_rows_big"], p["sparse_from_rows_small"]
    assert (big, small, p["big_layer_weights"]) == ((2, 8, 1 << 22) if isa == "avx_vnni" else (0, 0, 1 << 22))
    wins = _native.lib().s24i8_dense_wins
    for m in range(1, 70):
        assert wins(m, 40, 72) == (0 < rows <= m and (small == 0 or m < small)), m
        assert wins(m, 2048, 2048) == (0 < rows <= m and (big == 0 or m < big)), m
    if small:
        # a sentinel dense plan (other weights, same scales and bias) shows which kernel ran
        from pyaccel.formats.int8 import pack_int8_weight

        other = pack_int8_weight(-mod.dense_int8_weight())
        sentinel = mod._make_plan("int8", other, mod.weight_scale)
        sentinel.max_rows = 1 << 62
        mod._plan.dense = sentinel
        for m, dense in ((rows, True), (small - 1, True), (small, False), (small + 7, False)):
            x = torch.randn(m, 72, generator=gen)
            y_plan = mod._plan.forward(x)
            y_sparse = torch.cat([mod._plan.forward(x[i:i + 1]) for i in range(m)])  # 1 row: the 2:4 kernel
            assert y_plan is not None and torch.equal(y_plan, y_sparse) != dense, m
        mod._plan.dense = mod._dense[0]


@pytest.mark.skipif(not _native.available(), reason="native library not loaded")
def test_sparse_int8_dense_plan_is_dropped_with_the_packing(gen):
    """The dense plan a 2:4 int8 plan runs past its switch point belongs to one
    packing: an in-place edit of the values makes both stale, the next call
    repacks (a new plan, no dense plan until the next switch), and the result
    follows the edit. A dense plan of another shape or kind is refused."""
    from pyaccel.nn import Sparse24Int8Linear

    lin = torch.nn.Linear(72, 40)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    mod = Sparse24Int8Linear.from_float(lin)
    x = torch.randn(5, 72, generator=gen)  # inside the avx_vnni switch window of this small layer (2 - 7 rows)
    with _native.isa_cap("avx_vnni"):
        if _native.lib().s24i8_dense_from_rows() == 0:
            pytest.skip("no 2:4 int8 kernel here switches to dense (this CPU lacks AVX-512 VNNI and AVX-VNNI)")
        mod(x)
        old_plan = mod._plan
        assert old_plan.dense is not None
        with torch.no_grad():
            mod.values.neg_()
        assert old_plan.stale() and old_plan.forward(x) is None
        y = mod(x)
        assert mod._plan is not old_plan
        ref = torch.nn.functional.linear(x, mod._dense_weight(), mod.bias)
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    from pyaccel.nn import Int8Linear

    with pytest.raises(ValueError, match="same n and k"):
        mod._plan.dense = Int8Linear.from_float(torch.nn.Linear(72, 48))._plan
    with pytest.raises(ValueError, match="same weight scales and bias"):  # another layer of the same shape
        mod._plan.dense = Int8Linear.from_float(torch.nn.Linear(72, 40))._plan
    with pytest.raises(TypeError, match="LinearPlan or None"):
        mod._plan.dense = 5


def test_int8_compile_matches_eager(gen):
    net = _net()
    pyaccel.prune.prune_24(net)
    pyaccel.patch(net, quantize="int8")
    x = torch.randn(2, 3, 64, generator=gen)
    y = net(x)
    compiled = torch.compile(net)
    assert torch.allclose(compiled(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_version_1_meta_key_still_loads(gen):
    """Checkpoints from before the buffer was renamed (meta -> metadata: torch.export's
    unlifted GraphModule reserves 'meta') load through the state_dict version."""
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    from pyaccel.nn import Sparse24Int8Linear, Sparse24Linear

    for cls in (Sparse24Linear, Sparse24Int8Linear):
        src = cls.from_float(lin)
        old = {("meta" if k == "metadata" else k): v for k, v in src.state_dict().items()}
        old = type(src.state_dict())(old)
        old._metadata = {"": {"version": 1}}
        dst = cls(40, 24)
        dst.load_state_dict(old)
        x = torch.randn(3, 40, generator=gen)
        assert torch.equal(dst(x), src(x))
        assert src.state_dict()._metadata[""]["version"] == 2
