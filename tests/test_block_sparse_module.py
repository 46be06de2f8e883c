"""BlockSparseLinear, block pruning and patch's choice (the module contract
itself is in test_module_contract.py)."""
import io
import re

import pytest
import torch
from torch import nn

import pyaccel
import pyaccel.prune
from pyaccel import _sparse_choice
from pyaccel.formats import block_sparse as bsf
from pyaccel.nn import BlockSparseLinear, Sparse24Linear


def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 64))


def test_prune_blocks_masks_follow_training(gen):
    m = _mlp(gen)
    assert pyaccel.prune.prune_blocks(m, 0.75, block=(32, 32), include=["0", "2"]) == ["0", "2"]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        m(torch.randn(8, 256, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
    for i in (0, 2):
        assert bsf.zero_block_fraction(m[i].weight, (32, 32)) == 0.75
    assert bsf.zero_block_fraction(m[4].weight, (32, 32)) == 0.0
    pyaccel.prune.make_permanent(m)
    assert bsf.zero_block_fraction(m[0].weight, (32, 32)) == 0.75
    with pytest.raises(ValueError, match="sparsity"):
        pyaccel.prune.prune_blocks(m, -0.1)
    with pytest.raises(ValueError, match="block"):
        pyaccel.prune.prune_blocks(m, 0.5, block=(32,))


def test_prune_blocks_warns_when_blocks_are_too_few(gen):
    """2 blocks at sparsity 0.25 zero none: a warning names the layer and what
    was zeroed; a layer with enough blocks prunes silently."""
    import warnings

    model = nn.Sequential(nn.Linear(384, 1536), nn.Linear(1536, 384))
    with pytest.warns(UserWarning, match=r"prune_blocks: 0 has 2 blocks of 768x384: sparsity 0.25 zeroes 0"):
        pyaccel.prune.prune_blocks(model, 0.25, block=(768, 384), include="0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyaccel.prune.prune_blocks(model, 0.25, block=(32, 32), include="1")


def test_patch_swaps_only_where_measured_faster(gen, monkeypatch):
    m = _mlp(gen)
    pyaccel.prune.prune_blocks(m, 0.9, block=(32, 32), include=["0"])
    pyaccel.prune.prune_blocks(m, 0.5, block=(32, 32), include=["2"])
    x = torch.randn(5, 256, generator=gen)
    ref = m(x)
    # measurements are machine-dependent: fix them, check the rule
    fake = {0.9: 3.0, 0.5: 0.8}

    def speedups(w, b, cands, rows=(1, 64), rounds=3, baseline=None):
        z = round(bsf.zero_block_fraction(w, (32, 32)), 1)
        return {name: {r: fake[z] for r in rows} for name in cands}

    monkeypatch.setattr(_sparse_choice, "measured_speedups", speedups)
    report = pyaccel.patch(m)
    kinds = {e.path: (e.new_type, e.reason or e.backend) for e in report.entries}
    assert kinds["0"][0] == "BlockSparseLinear" and "90% zero 32x32 blocks" in kinds["0"][1]
    assert kinds["2"][0] is None and "50% zero 32x32 blocks" in kinds["2"][1] and "not taken" in kinds["2"][1]
    assert kinds["2"][1].startswith("50% zero 32x32 blocks")  # the finding first, then the dense layer's reason
    assert kinds["4"][0] is None
    assert isinstance(m[0], BlockSparseLinear) and m[0].block == (32, 32)
    assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-5)


def test_two_four_and_block_sparse_goes_to_the_faster(gen, monkeypatch):
    lin = nn.Linear(128, 128)
    with torch.no_grad():
        lin.weight.mul_(bsf.block_mask(lin.weight, (32, 32), 0.75))
        from pyaccel.formats.sparse24 import mask_24

        lin.weight.mul_(mask_24(lin.weight))
    for bsr_speed, expect in [(4.0, "BlockSparseLinear"), (1.2, "Sparse24Linear")]:
        monkeypatch.setattr(_sparse_choice, "measured_speedups",
                            lambda w, b, c, rows=(1, 64), rounds=3, baseline=None, s=bsr_speed: {
                                "block-sparse": {1: s, 64: s}, "2:4": {1: 2.0, 64: 2.0}})
        report = pyaccel.patch(nn.Sequential(lin), inplace=False)
        assert report.entries[0].new_type == expect


def test_real_measurement_runs(gen):
    """The unpatched measurement path, on a small layer (the decision itself is machine-dependent)."""
    w = torch.randn(64, 64, generator=gen)
    w *= bsf.block_mask(w, (16, 16), 0.9)
    speed = _sparse_choice.measured_speedups(w, None, {"bsr": BlockSparseLinear.from_dense(w, None, (16, 16))},
                                             rows=(1, 4), rounds=1)
    assert set(speed["bsr"]) == {1, 4} and all(s > 0 for s in speed["bsr"].values())
    assert _sparse_choice.candidate_block(w).block == (16, 16)
    assert _sparse_choice.candidate_block(torch.randn(64, 64, generator=gen)) is None


def test_bsr_tensor_in_and_out(gen):
    w = torch.randn(96, 64, generator=gen)
    w *= bsf.block_mask(w, (32, 16), 0.5)
    b = torch.randn(96, generator=gen)
    m = BlockSparseLinear.from_bsr(w.to_sparse_bsr((32, 16)), b)
    x = torch.randn(3, 64, generator=gen)
    assert torch.allclose(m(x), x @ w.t() + b, rtol=1e-5, atol=1e-5)
    t = m.to_bsr()
    assert t.layout == torch.sparse_bsr and torch.equal(t.to_dense(), w)
    padded = BlockSparseLinear.from_bsr(torch.nn.functional.pad(w[:90, :60], (0, 4, 0, 6)).to_sparse_bsr((32, 16)),
                                        shape=(90, 60))
    assert (padded.out_features, padded.in_features) == (90, 60)
    assert torch.allclose(padded(x[:, :60]), x[:, :60] @ w[:90, :60].t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sparse_bsr"):
        BlockSparseLinear.from_bsr(w)


def test_bsr_int8_round_trip_and_refusals(gen):
    """An int8 module's to_bsr() holds int8 blocks: from_bsr takes them back
    with their weight_scale (the same layer, bit for bit), refuses them
    without, and the fp32 class refuses integer blocks instead of reading
    them as floats; a padded BSR weight with a bias of the logical size and no
    `shape` names `shape`."""
    from pyaccel.nn import BlockSparseInt8Linear

    w = torch.randn(64, 96, generator=gen)
    w *= bsf.block_mask(w, (32, 32), 0.5)
    b = torch.randn(64, generator=gen)
    x = torch.randn(5, 96, generator=gen)
    q = BlockSparseInt8Linear.from_dense(w, b, (32, 32))
    t = q.to_bsr()
    assert t.layout == torch.sparse_bsr and t.values().dtype == torch.int8
    back = BlockSparseInt8Linear.from_bsr(t, b, weight_scale=q.weight_scale)
    assert torch.equal(back(x), q(x))
    with pytest.raises(ValueError, match="weight_scale"):
        BlockSparseInt8Linear.from_bsr(t, b)
    for bad in (q.weight_scale[:3], q.weight_scale[:, None], q.weight_scale.tolist(), q.weight_scale.long()):
        with pytest.raises(ValueError, match=r"weight_scale: expected a floating-point tensor of shape \(64,\)"):
            BlockSparseInt8Linear.from_bsr(t, b, weight_scale=bad)
    with pytest.raises(ValueError, match="weight_scale: expected finite scales"):
        BlockSparseInt8Linear.from_bsr(t, b, weight_scale=torch.full((64,), float("nan")))
    # a weight_scale that would be ignored (the blocks are quantized) is refused, naming the blocks' dtype
    ignored = r"weight_scale: given with {}, which are quantized here .* so it would be ignored"
    with pytest.raises(ValueError, match=ignored.format("torch.float32 blocks")):
        BlockSparseInt8Linear.from_bsr(w.to_sparse_bsr((32, 32)), b, weight_scale=q.weight_scale * 9)
    wi = (w * 4).round().to(torch.int16)  # integer blocks, but not int8: quantized like float ones
    with pytest.raises(ValueError, match=ignored.format(r"torch.int16 blocks \(an integer dtype, but not int8\)")):
        BlockSparseInt8Linear.from_bsr(wi.to_sparse_bsr((32, 32)), b, weight_scale=q.weight_scale)
    with pytest.raises(ValueError, match=ignored.format(r"torch.uint8 blocks \(an integer dtype, but not int8\)")):
        BlockSparseInt8Linear.from_bsr(wi.abs().to(torch.uint8).to_sparse_bsr((32, 32)), b,
                                       weight_scale=q.weight_scale)
    i16 = BlockSparseInt8Linear.from_bsr(wi.to_sparse_bsr((32, 32)), b)
    assert torch.equal(i16(x), BlockSparseInt8Linear.from_bsr(wi.float().to_sparse_bsr((32, 32)), b)(x))
    wb = w > 0  # bool blocks: not called 'an integer dtype'
    with pytest.raises(ValueError, match=ignored.format(r"torch.bool blocks \(booleans, taken as 0 / 1\)")):
        BlockSparseInt8Linear.from_bsr(wb.to_sparse_bsr((32, 32)), b, weight_scale=q.weight_scale)
    bb = BlockSparseInt8Linear.from_bsr(wb.to_sparse_bsr((32, 32)), b)
    assert torch.equal(bb(x), BlockSparseInt8Linear.from_bsr(wb.float().to_sparse_bsr((32, 32)), b)(x))
    with pytest.raises(ValueError, match=ignored.format("torch.float32 blocks")):
        BlockSparseInt8Linear.from_weight(bsf.compress(w, (32, 32)), b, weight_scale=q.weight_scale)
    with pytest.raises(ValueError, match="values: expected floating-point"):
        BlockSparseLinear.from_bsr(t, b)
    f = BlockSparseInt8Linear.from_bsr(w.to_sparse_bsr((32, 32)), b)  # float blocks: quantized
    assert torch.equal(f(x), q(x))
    padded = torch.nn.functional.pad(w[:60], (0, 0, 0, 4)).to_sparse_bsr((32, 32))
    with pytest.raises(ValueError, match="shape="):
        BlockSparseLinear.from_bsr(padded, b[:60])
    # shape takes ints only (15.5 was accepted, as 15 rows)
    for bad in ((60.5, 96), (60, 96.0), (True, 96), (60,), 60, "60, 96", (60, 96, 1)):
        with pytest.raises(ValueError, match=r"shape: expected \(out_features, in_features\), two ints, got"):
            BlockSparseLinear.from_bsr(padded, b[:60], shape=bad)
        with pytest.raises(ValueError, match=r"shape: expected \(out_features, in_features\), two ints, got"):
            BlockSparseInt8Linear.from_bsr(padded, b[:60], shape=bad)
    assert BlockSparseLinear.from_bsr(padded, b[:60], shape=torch.Size([60, 96])).out_features == 60


@pytest.mark.filterwarnings("ignore:Sparse")
def test_patch_reads_a_linear_with_a_bsr_weight(gen):
    """nn.Linear runs with a torch.sparse_bsr weight; patch reads it densely
    and swaps it like the dense layer."""
    w = torch.randn(128, 256, generator=gen)
    w *= bsf.block_mask(w, (32, 32), 0.75)
    lin = nn.Linear(256, 128)
    with torch.no_grad():
        lin.bias.copy_(torch.randn(128, generator=gen))
    lin.weight = nn.Parameter(w.to_sparse_bsr((32, 32)), requires_grad=False)
    model = nn.Sequential(lin).eval()
    x = torch.randn(4, 256, generator=gen)
    with torch.no_grad():
        rep = pyaccel.patch(model, block_sparse="always")
        assert isinstance(rep.model[0], BlockSparseLinear), str(rep)
        assert torch.allclose(rep.model(x), x @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)


def test_state_dict_is_compressed_and_loads_anywhere(gen):
    w = torch.randn(100, 70, generator=gen)
    w *= bsf.block_mask(w, (16, 16), 0.8)
    src = BlockSparseLinear.from_dense(w, None, (16, 16))
    sd = src.state_dict()
    assert set(sd) == {"values", "crow_indices", "col_indices"}
    assert sd["crow_indices"].dtype == torch.int32 and sd["values"].shape[0] == src.values.shape[0]
    assert sd["values"].numel() < 0.35 * w.numel()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = BlockSparseLinear(70, 100, bias=False, block=(32, 32))  # another block and nnzb: adopted
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 70, generator=gen)
    assert dst.block == (16, 16) and torch.equal(dst(x), src(x))


def test_edge_cases_and_errors(gen):
    x = torch.randn(3, 40, generator=gen)
    zero = BlockSparseLinear.from_dense(torch.zeros(24, 40), torch.ones(24), (16, 16))
    assert zero.values.shape[0] == 0 and torch.equal(zero(x), torch.ones(3, 24))
    full = torch.randn(24, 40, generator=gen)
    assert torch.allclose(BlockSparseLinear.from_dense(full, None, (16, 16))(x), x @ full.t(), atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        BlockSparseLinear.from_dense(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="block"):
        BlockSparseLinear(8, 8, block=(0, 4))
    with pytest.raises(ValueError, match="bias"):
        BlockSparseLinear.from_dense(full, torch.zeros(3), (16, 16))
    bad = BlockSparseLinear.from_dense(full, None, (8, 8)).state_dict()
    bad["col_indices"] = bad["col_indices"].flip(0)
    with pytest.raises(RuntimeError, match="col_indices"):
        BlockSparseLinear(40, 24, bias=False, block=(8, 8)).load_state_dict(bad)
    assert "block=16x16" in repr(zero) and "density=0.000" in repr(zero)


def test_2_4_module_unaffected_by_block_rule(gen):
    """A 2:4 layer with no zero blocks never pays for a measurement."""
    lin = nn.Linear(64, 64)
    pyaccel.prune.prune_24(nn.Sequential(lin))
    assert _sparse_choice.candidate_block(lin.weight.detach()) is None
    report = pyaccel.patch(nn.Sequential(lin))
    assert report.entries[0].new_type == Sparse24Linear.__name__


def test_quantize_int8_takes_block_sparse_int8(gen, monkeypatch):
    m = _mlp(gen)
    pyaccel.prune.prune_blocks(m, 0.9, block=(16, 16), include=["2"])
    x = torch.randn(5, 256, generator=gen)
    ref = m(x)
    seen = {}

    def speedups(w, b, cands, rows=(1, 64), rounds=3, baseline=None):
        seen["baseline"] = type(baseline).__name__
        return {name: {r: 3.0 for r in rows} for name in cands}

    monkeypatch.setattr(_sparse_choice, "measured_speedups", speedups)
    report = pyaccel.patch(m, quantize="int8")
    types = {e.path: e.new_type for e in report.entries}
    assert types == {"0": "Int8Linear", "2": "BlockSparseInt8Linear", "4": "Int8Linear"}
    assert seen["baseline"] == "Int8Linear" and report.entries[1].lossy
    from _helpers import sqnr_db

    assert sqnr_db(ref, m(x)) > 30


def test_filtered_layers_are_not_measured(gen, monkeypatch):
    m = _mlp(gen)
    pyaccel.prune.prune_blocks(m, 0.9, block=(32, 32))
    calls = []
    monkeypatch.setattr(_sparse_choice, "measured_speedups",
                        lambda w, b, c, rows=(1, 64), rounds=3, baseline=None: calls.append(1) or {
                            n: {r: 3.0 for r in rows} for n in c})
    report = pyaccel.patch(m, include=["2"])
    assert len(calls) == 1 and [e.new_type for e in report.entries] == [None, "BlockSparseLinear", None]
    assert all("excluded" in e.reason for e in report.entries if e.path != "2")


def test_block_sparse_modes_and_tied_weights(gen, monkeypatch):
    m = _mlp(gen)
    pyaccel.prune.prune_blocks(m, 0.5, block=(32, 32), include=["0"])
    monkeypatch.setattr(_sparse_choice, "measured_speedups",
                        lambda *a, **k: pytest.fail("'always' and 'never' do not measure"))
    r = pyaccel.patch(m, inplace=False, block_sparse="always")
    assert r.entries[0].new_type == "BlockSparseLinear" and "not measured" in r.entries[0].backend
    r = pyaccel.patch(m, inplace=False, block_sparse="never")
    assert r.entries[0].new_type is None
    with pytest.raises(ValueError, match="block_sparse"):
        pyaccel.patch(m, block_sparse="sometimes")
    # tied weights (an output layer sharing the embedding's Parameter) stay tied
    emb, head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    r = pyaccel.patch(nn.Sequential(emb, head), quantize="int8")
    assert r.entries[-1].new_type is None and "tied" in r.entries[-1].reason


def test_filter_fn_errors_do_not_abort(gen):
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 96))
    r = pyaccel.patch(model, quantize="int8", filter_fn=lambda m, p: 1 / (m.out_features - 64) > 0)
    assert [e.new_type for e in r.entries] == [None, None, None, "Int8Linear"]
    assert "filter_fn raised ZeroDivisionError" in r.entries[1].reason and "filtered out" in r.entries[2].reason


def test_wrong_shape_checkpoints_are_refused(gen):
    src = BlockSparseLinear.from_dense(torch.randn(128, 96, generator=gen), None, (32, 32))
    with pytest.raises(RuntimeError, match="past out_features"):
        BlockSparseLinear(90, 100, bias=False).load_state_dict(src.state_dict())
    from pyaccel.formats import sparse24 as s24

    w = torch.randn(16, 72, generator=gen)
    w *= s24.mask_24(w)
    with pytest.raises(RuntimeError, match="past in_features"):
        Sparse24Linear(70, 16, bias=False).load_state_dict(Sparse24Linear.from_dense(w).state_dict())


def test_inference_mode_modules_keep_the_fast_path(gen):
    w = torch.randn(64, 64, generator=gen)
    w *= bsf.block_mask(w, (16, 16), 0.5)
    with torch.inference_mode():
        m = BlockSparseLinear.from_dense(w, None, (16, 16))
    x = torch.randn(2, 64, generator=gen)
    assert m._plan is not None and not m._plan.stale()
    assert m._plan.forward(x) is not None and torch.allclose(m(x), x @ w.t(), atol=1e-5)


def test_review_fixes(gen):
    x = torch.randn(4, 64, generator=gen)
    op = torch.ops.pyaccel.block_sparse_linear
    v = torch.randn(2, 32, 32, generator=gen)
    with pytest.raises(ValueError, match="col_indices"):
        op(x, v, torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, -3000000], dtype=torch.int32), 64, 64,
           None, None)
    with pytest.raises(ValueError, match="crow_indices"):
        op(x, v, torch.tensor([0, 1, 2_000_000], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 64, 64,
           None, None)
    with pytest.raises(ValueError, match="values"):
        op(x, torch.randn(0, 0, 4), torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 64, 64,
           None, None)
    # a refused checkpoint of another block shape leaves the module as it was
    m = BlockSparseLinear.from_dense(torch.randn(64, 64, generator=gen), None, (16, 16))
    y = m(x)
    sd = BlockSparseLinear.from_dense(torch.randn(64, 64, generator=gen), None, (32, 32)).state_dict()
    sd["col_indices"][0] = 99
    with pytest.raises(RuntimeError, match="col_indices"):
        m.load_state_dict(sd)
    assert m.block == (16, 16) and torch.equal(m(x), y)
    # from_bsr copies: the caller's tensor stays the caller's
    w = torch.randn(64, 64, generator=gen)
    t = w.to_sparse_bsr((32, 32))
    m = BlockSparseLinear.from_bsr(t)
    t.values().mul_(0)
    assert torch.allclose(m(x), x @ w.t(), atol=1e-4)


def test_second_review_fixes(gen):
    from pyaccel.nn import Int8Linear

    x = torch.randn(3, 64, generator=gen)
    w = torch.randn(64, 64, generator=gen)
    w *= bsf.block_mask(w, (16, 16), 0.5)
    m = BlockSparseLinear.from_dense(w, torch.randn(64, generator=gen), (16, 16))
    m.values = nn.Parameter(m.values.clone(), requires_grad=False)  # stays a watched buffer
    assert "values" in m._buffers and not m._plan.stale()
    with torch.no_grad():
        m.values.mul_(0)
    assert torch.allclose(m(x), m.bias.expand(3, 64))
    # an in-place non-finite scale: the same non-finite outputs on every path, no error
    q = Int8Linear.from_float(nn.Linear(64, 32))
    with torch.no_grad():
        q.weight_scale[0] = float("nan")
    a, b2, c = q(x), q(nn.Parameter(x, requires_grad=False)), q(x)
    assert a[:, 0].isnan().all() and torch.equal(a.isnan(), b2.isnan()) and torch.equal(a.isnan(), c.isnan())
    # a checkpoint whose copy fails after its shapes were adopted leaves the module as it was
    m = BlockSparseLinear.from_dense(w, None, (16, 16))
    y = m(x)
    w2 = torch.zeros(64, 64)
    w2[:16, :16] = 1
    sd = {k: v.to("meta") for k, v in BlockSparseLinear.from_dense(w2, None, (16, 16)).state_dict().items()}
    with pytest.raises(RuntimeError):
        m.load_state_dict(sd)
    assert torch.equal(m(x), y) and m.crow_indices[0] == 0


def test_patch_names_block_sparsity_under_the_minimum_and_from_float_warns():
    """A layer with some zero 1x4 blocks, below the block-sparse minimum: the
    skip reason says how many; from_float with a block shape the zeros do not
    form warns that the result is dense."""
    import warnings

    import pyaccel
    from pyaccel.formats import block_sparse as bsf
    from pyaccel.nn import BlockSparseLinear

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with torch.no_grad():
        m[0].weight.mul_(bsf.block_mask(m[0].weight, (1, 4), 0.25))
    report = pyaccel.patch(m, inplace=False)
    assert "25% zero 1x4 blocks, under the 30% block-sparse minimum" in report.entries[0].reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BlockSparseLinear.from_float(m[0], (32, 32))
        BlockSparseLinear.from_float(m[0], (1, 4))
    msgs = [str(c.message) for c in caught if "from_float" in str(c.message)]
    assert len(msgs) == 1 and "no all-zero 32x32 block" in msgs[0]
    assert "(e.g. block=(1, 4))" in msgs[0]


def test_dense_result_warning_does_not_suggest_the_block_given():
    """from_float(w, block=(1, 4)) on a 2:4 weight told the user to pass
    block=(1, 4), which they had: it now points at the 2:4 module; for another
    weight it suggests a block other than the one given."""
    from pyaccel.formats import sparse24 as s24
    from pyaccel.nn import BlockSparseInt8Linear, BlockSparseLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    for cls, other in ((BlockSparseLinear, "Sparse24Linear"), (BlockSparseInt8Linear, "Sparse24Int8Linear")):
        with pytest.warns(UserWarning) as caught:
            cls.from_float(lin, block=(1, 4))
        (msg,) = [str(c.message) for c in caught]
        assert "no all-zero 1x4 block" in msg and "block=(1, 4)" not in msg, msg
        assert "the weight is 2:4 sparse" in msg.lower() and f"pyaccel.nn.{other}.from_float" in msg, msg
    dense = torch.nn.Linear(64, 32)
    with pytest.warns(UserWarning, match=r"no all-zero 1x4 block .* \(e\.g\. block=\(32, 32\)\)") as caught:
        BlockSparseLinear.from_float(dense, block=(1, 4))
    assert caught[0].filename == __file__


def test_pruning_leaves_tied_weights_alone(gen):
    """An output layer sharing the embedding's Parameter (GPT-2's lm_head and
    wte): prune_24 / prune_blocks skip it with a warning (a folded mask would
    zero the embedding too); a mask torch put there stays a mask in
    make_permanent, and patch leaves the layer as is."""
    from torch.nn.utils import prune as torch_prune

    def tied():
        emb, head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
        head.weight = emb.weight
        return nn.Sequential(emb, nn.Linear(32, 32), head)

    for call in (lambda m: pyaccel.prune.prune_24(m), lambda m: pyaccel.prune.prune_blocks(m, 0.5, block=(8, 8))):
        m = tied()
        with pytest.warns(UserWarning, match="2's weight is tied to 0's .*left unpruned"):
            assert call(m) == ["1"]
        assert not hasattr(m[2], "weight_orig") and bool((m[0].weight != 0).all())
    from pyaccel.formats.sparse24 import mask_24

    m = tied()
    torch_prune.custom_from_mask(m[2], "weight", mask_24(m[2].weight.detach()))  # a 2:4 mask: patch would swap it
    ids = torch.randint(0, 64, (5,), generator=gen)
    with torch.no_grad():
        before = m(ids)
    with pytest.warns(UserWarning, match="make_permanent: 2's pruned weight is tied to 0's"):
        assert pyaccel.prune.make_permanent(m) == []
    with torch.no_grad():
        assert torch.equal(m(ids), before) and bool((m[0].weight != 0).all())
    r = pyaccel.patch(m, inplace=False)
    entry = next(e for e in r.entries if e.path == "2")
    assert entry.new_type is None and "tied to 0's" in entry.reason, entry


def test_from_bsr_names_a_wrong_size_bias(gen):
    w = torch.randn(8, 8, generator=gen).to_sparse_bsr((4, 4))
    with pytest.raises(ValueError, match=r"bias: 3 entries for a BSR weight of 8 rows"):
        BlockSparseLinear.from_bsr(w, torch.zeros(3))


# ---- the speed check's baseline and block shapes (sparse_bsr weights, prune_blocks' shape) ----------

def _atol(k: int) -> float:
    """fp32 tolerance for sums of k products of O(1) terms."""
    return 8 * k * torch.finfo(torch.float32).eps


def _bsr_linear(w, b, blocksize):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        if b is not None:
            lin.bias.copy_(b)
    lin.weight = nn.Parameter(w.to_sparse_bsr(blocksize), requires_grad=False)
    return lin


def _recording(seen, speeds):
    """A measured_speedups stand-in: records the block shapes and the baseline
    it gets and runs the baseline once (patch must hand over a callable that
    computes the layer); speeds: candidate name -> speed-up (default 1.0)."""
    def speedups(w, b, cands, rows=(1, 64), rounds=3, baseline=None):
        seen.append({"blocks": {n: getattr(m, "block", None) for n, m in cands.items()}, "baseline": baseline,
                     "dtype": w.dtype})
        if baseline is not None:
            seen[-1]["probe"] = baseline(torch.ones(2, w.shape[1], dtype=w.dtype))
        return {n: {r: speeds.get(n, 1.0) for r in rows} for n in cands}
    return speedups


@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("faster", ["block-sparse", "block-sparse 16x16"])
def test_bsr_weight_measured_against_its_own_forward_with_its_blocksize(gen, monkeypatch, faster):
    """A Linear with a sparse_bsr weight runs torch's BSR kernels: patch times
    the candidates against that forward (not dense F.linear), says so, and
    scores the BSR's own block shape (48x48, no candidate) alongside the
    candidates' pick (16x16); the faster of the two is taken."""
    n, k = 96, 144
    zero = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)  # 2x3 blocks of 48x48: half zero
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w *= ~zero.repeat_interleave(48, 0).repeat_interleave(48, 1)
    b = torch.randn(n, generator=gen)
    model = nn.Sequential(_bsr_linear(w, b, (48, 48))).eval()  # torch's BSR F.linear takes square blocks only
    x = torch.randn(5, k, generator=gen)
    with torch.no_grad():
        ref = model(x)
    seen = []
    monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {faster: 3.0}))
    rep = pyaccel.patch(model, inplace=False)
    assert seen[0]["blocks"] == {"block-sparse": (48, 48), "block-sparse 16x16": (16, 16)}
    # the baseline is the layer as it is: torch's BSR F.linear
    ones = torch.ones(2, k)
    assert torch.allclose(seen[0]["probe"], ones @ w.t() + b, rtol=0, atol=_atol(k))
    e = rep.entries[0]
    assert e.new_type == "BlockSparseLinear", str(rep)
    taken, other = ("48x48", "16x16") if faster == "block-sparse" else ("16x16", "48x48")
    assert f"50% zero {taken} blocks, measured x3.00 at M=1 / x3.00 at M=64 over the layer's own forward " \
           "(torch sparse_bsr F.linear)" in e.backend, e.backend
    assert f"also measured 50% zero {other} blocks: x1.00 at M=1" in e.backend
    assert rep.model[0].block == tuple(int(v) for v in taken.split("x"))
    with torch.no_grad():
        assert torch.allclose(rep.model(x), ref, rtol=0, atol=_atol(k))
    assert model[0].weight.layout == torch.sparse_bsr  # inplace=False: the original keeps its BSR weight


@pytest.mark.filterwarnings("ignore:Sparse")
def test_bsr_weight_real_measurement(gen):
    """The tester's case (48x64, 16x16 blocks, half zero), with the real timing:
    whatever it decides, the report says what it measured against, and the
    model computes what it did."""
    w = torch.randn(48, 64, generator=gen) / 8
    w *= bsf.block_mask(w, (16, 16), 0.5)
    b = torch.randn(48, generator=gen)
    model = nn.Sequential(_bsr_linear(w, b, (16, 16))).eval()
    x = torch.randn(3, 64, generator=gen)
    rep = pyaccel.patch(model, inplace=False)
    e = rep.entries[0]
    assert "50% zero 16x16 blocks" in (e.backend or e.reason), str(rep)
    assert "over the layer's own forward (torch sparse_bsr F.linear)" in (e.backend or e.reason), str(rep)
    with torch.no_grad():
        assert torch.allclose(rep.model(x), x @ w.t() + b, rtol=0, atol=_atol(64))


@pytest.mark.filterwarnings("ignore:Sparse")
def test_bsr_weight_with_few_zero_blocks_is_still_measured(gen, monkeypatch):
    """Under MIN_ZERO_BLOCKS a sparse weight would stay on torch's sparse
    kernels: it is measured (and swapped by block_sparse='always') whatever
    its zero blocks, unless the layer is quantized or 2:4 (it leaves torch's
    path then anyway); a dense weight with as few zero blocks is not measured."""
    w = torch.randn(64, 64, generator=gen) / 8
    b = torch.randn(64, generator=gen)
    x = torch.randn(4, 64, generator=gen)
    model = nn.Sequential(_bsr_linear(w, b, (16, 16))).eval()
    seen = []
    monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {"block-sparse": 2.0}))
    rep = pyaccel.patch(model, inplace=False)
    e = rep.entries[0]
    assert len(seen) == 1 and e.new_type == "BlockSparseLinear", str(rep)
    assert e.backend.endswith("0% zero 64x64 blocks, measured x2.00 at M=1 / x2.00 at M=64 over the layer's own "
                              "forward (torch sparse_bsr F.linear)"), e.backend
    with torch.no_grad():
        assert torch.allclose(rep.model(x), x @ w.t() + b, rtol=0, atol=_atol(64))
    monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {"block-sparse": 1.1}))
    e = pyaccel.patch(model, inplace=False).entries[0]
    assert e.new_type is None and e.reason.startswith("0% zero 64x64 blocks, block-sparse measured x1.10 at M=1")
    assert "not taken (it needs x1.15 at every measured M); otherwise float Linear with a torch sparse_bsr " \
           "weight (weights not 2:4 sparse)" in e.reason, e.reason
    monkeypatch.setattr(_sparse_choice, "measured_speedups", lambda *a, **k: pytest.fail("not measured"))
    e = pyaccel.patch(model, inplace=False, block_sparse="always").entries[0]
    assert e.new_type == "BlockSparseLinear" and "0% zero 64x64 blocks (block_sparse='always'" in e.backend
    assert pyaccel.patch(model, inplace=False, quantize="int8").entries[0].new_type == "Int8Linear"
    assert pyaccel.patch(model, inplace=False, block_sparse="never").entries[0].new_type is None
    dense = nn.Sequential(nn.Linear(64, 64))
    assert "dense float Linear" in pyaccel.patch(dense, inplace=False).entries[0].reason


@pytest.mark.filterwarnings("ignore:Sparse")
def test_bsr_weight_whose_forward_raises_is_measured_against_dense(gen, monkeypatch):
    """torch has no bfloat16 sparse_bsr kernel on CPU: the layer's forward
    raises, so the baseline is dense F.linear, and the report says why."""
    w = torch.randn(64, 64, generator=gen) / 8
    w *= bsf.block_mask(w, (16, 16), 0.75)
    model = nn.Sequential(_bsr_linear(w.bfloat16(), None, (16, 16))).eval()
    with pytest.raises(Exception):
        model(torch.randn(2, 64).bfloat16())
    seen = []
    monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {"block-sparse": 0.5}))
    e = pyaccel.patch(model, inplace=False).entries[0]
    assert seen[0]["baseline"] is None and seen[0]["dtype"] == torch.bfloat16
    assert "over dense F.linear (the layer's own forward, torch sparse_bsr F.linear, raises NotImplementedError)" \
        in e.reason, e.reason
    monkeypatch.undo()
    bsr = BlockSparseLinear.from_dense(w, None, (16, 16))
    speed = _sparse_choice.measured_speedups(w.bfloat16(), None, {"bsr": bsr}, rows=(1, 4),
                                             rounds=1)  # bfloat16 inputs for a bfloat16 weight
    assert all(s > 0 for s in speed["bsr"].values())


def test_prune_masked_and_parametrized_layers_are_measured_as_they_run(gen, monkeypatch):
    """The baseline of a masked / parametrized layer is its own forward (the
    mask or parametrization recomputed each call), run as inference: the
    module is left as it was (the tensor the prune hook wrote, the training
    flags, spectral_norm's power-iteration state)."""
    k = 128
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    lin = nn.Linear(k, 64)
    pyaccel.prune.prune_blocks(nn.Sequential(lin), 0.75, block=(16, 16))
    lin(torch.randn(2, k, generator=gen)).sum().backward()  # a training forward: .weight is a non-leaf tensor now
    written = lin.__dict__["weight"]
    sn = nn.Linear(k, 64)
    with torch.no_grad():
        sn.weight.mul_(bsf.block_mask(sn.weight, (16, 16), 0.75))
    nn.utils.parametrizations.spectral_norm(sn)
    sn(torch.randn(2, k, generator=gen))  # one power iteration
    state = {kk: v.clone() for kk, v in sn.state_dict().items()}
    model = nn.Sequential(lin, sn)  # training mode
    seen = []
    monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {}))  # x1.00: declined
    rep = pyaccel.patch(model)
    ones = torch.ones(2, k)
    with torch.no_grad():
        want = [ones @ (lin.weight_orig * lin.weight_mask).t() + lin.bias, sn.eval()(ones)]
    sn.train()
    for s, ref in zip(seen, want):
        assert torch.allclose(s["probe"], ref, rtol=0, atol=_atol(k))
    reasons = [e.reason for e in rep.entries]
    assert "75% zero 16x16 blocks, block-sparse measured x1.00 at M=1 / x1.00 at M=64 over the layer's own " \
           "forward (prune mask on weight (CustomFromMask) + dense F.linear): not taken" in reasons[0], reasons[0]
    assert "over the layer's own forward (parametrization on weight + dense F.linear)" in reasons[1], reasons[1]
    assert lin.__dict__["weight"] is written and lin.training and sn.training
    assert all(m.training for m in sn.parametrizations.modules())
    assert all(torch.equal(state[kk], v) for kk, v in sn.state_dict().items())  # _u, _v not iterated


def test_tiling_block_finds_the_pruned_shape(gen):
    from pyaccel.formats.sparse24 import mask_24

    w = torch.randn(100, 70, generator=gen)  # neither side a multiple of 3: padded edge blocks
    w3 = w * bsf.block_mask(w, (3, 3), 0.9)
    assert _sparse_choice.tiling_block(w3) == (3, 3)
    assert _sparse_choice.tiling_block(w3.bfloat16()) == (3, 3)
    assert _sparse_choice.tiling_block(w * bsf.block_mask(w, (2, 8), 0.6)) == (2, 8)
    assert _sparse_choice.tiling_block(w * bsf.block_mask(w, (1, 2), 0.6)) is None  # under 4 entries
    for plain in (w, torch.zeros_like(w), w * mask_24(w), w * (torch.rand(w.shape, generator=gen) > 0.5)):
        assert _sparse_choice.tiling_block(plain) is None
    kept = w3.clone()
    kept[0:3, 0:3] = 1.0
    kept[1, 1] = 0.0  # an exact zero inside a kept block: only 1x1 tiles
    assert _sparse_choice.tiling_block(kept) is None
    cols = w.clone()
    cols[:, 9:18] = 0  # all rows alike: the candidates' shapes find zero columns
    assert _sparse_choice.tiling_block(cols) is None
    big = torch.randn(256, 256, generator=gen)
    big[:128, :128] = 0
    big[128:, 128:] = 0
    assert _sparse_choice.tiling_block(big) == (64, 64)  # 128 tiles; sides capped at MAX_TILING_SIDE
    assert _sparse_choice.shapes_with([(3, 3), None, (32, 32), (2, 2)])[:3] == ((64, 64), (32, 32), (16, 16))
    assert _sparse_choice.shapes_with([(3, 3), (2, 2)])[-4:] == ((3, 3), (1, 8), (2, 2), (1, 4))


def test_prune_blocks_shape_is_a_candidate_also_after_a_state_dict_round_trip(gen, monkeypatch):
    """prune_blocks(block=(3, 3)): patch scores 3x3 (90 % zero) next to the
    candidates' pick (1x4, ~81 %) and takes the faster -- with the live mask,
    after make_permanent, and in a fresh model loaded from either state_dict."""
    k = 120

    def fresh():
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        return nn.Sequential(nn.Linear(k, 90), nn.ReLU(), nn.Linear(90, 40)).eval()

    model = fresh()
    pyaccel.prune.prune_blocks(model, 0.9, block=(3, 3), include="0")
    masked_sd = {kk: v.clone() for kk, v in model.state_dict().items()}
    x = torch.randn(6, k, generator=gen)
    with torch.no_grad():
        ref = model(x)

    def check(m, what):
        seen = []
        monkeypatch.setattr(_sparse_choice, "measured_speedups", _recording(seen, {"block-sparse": 2.0}))
        rep = pyaccel.patch(m, inplace=False)
        assert [s["blocks"] for s in seen] == [{"block-sparse": (3, 3), "block-sparse 1x4": (1, 4)}], what
        e = rep.entries[0]
        assert e.new_type == "BlockSparseLinear", what
        assert "90% zero 3x3 blocks, measured x2.00 at M=1 / x2.00 at M=64 over the layer's own forward (" \
            in e.backend, (what, e.backend)
        assert re.search(r"also measured 8\d% zero 1x4 blocks: x1\.00 at M=1", e.backend), e.backend
        assert rep.model[0].block == (3, 3)
        with torch.no_grad():
            assert torch.allclose(rep.model(x), ref, rtol=0, atol=_atol(k)), what

    check(model, "live mask")
    loaded = fresh()
    torch.nn.utils.prune.identity(loaded[0], "weight")  # what loading a masked state_dict takes
    loaded.load_state_dict(masked_sd)
    check(loaded, "masked state_dict")
    pyaccel.prune.make_permanent(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = fresh()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    check(loaded, "permanent state_dict")
