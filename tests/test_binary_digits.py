"""A small BNN (float first and last layers, binary middle layers) on
scikit-learn's digits, trained here (~10 s on 2 busy cores): >= 90 % test
accuracy (0.975 with the default seed on an AVX-512 Xeon, 0.986 with torch
held to AVX2: the README's figures), and the patched model
(XnorConv2d / XnorLinear, BN + Hardtanh folded) predicts exactly what the
unpatched one does."""
import pytest
import torch

import pyaccel
from pyaccel import _native

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set")


def test_digits_bnn_accuracy_and_patched_predictions():
    from pyaccel.binary_digits import train

    model, info = train()
    assert info["test_accuracy"] >= 0.90, info["test_accuracy"]
    xte = info["x_test"]
    with torch.no_grad():
        logits = model(xte)
    report = pyaccel.patch(model)
    swapped = {e.new_type for e in report.swapped}
    assert {"XnorConv2d", "XnorLinear"} <= swapped, str(report)
    if _native.available():
        assert "bconv" in str(report)
    with torch.no_grad():
        logits_p = model(xte)
    assert torch.equal(logits_p.argmax(1), logits.argmax(1))
    assert torch.allclose(logits_p, logits, rtol=1e-4, atol=1e-3)
    for isa in _native.ISA_LADDER:
        if _native.isa_supported(isa):
            with _native.isa_cap(isa), torch.no_grad():
                assert torch.equal(model(xte).argmax(1), logits.argmax(1)), isa
