"""A small binary CNN on scikit-learn's 8x8 digits: float first and last
layers, binary middle layers (pyaccel.nn.BinaryConv2d / BinaryLinear), trained
in seconds on 2 CPU threads. Used by tests/test_binary_digits.py and the demo:
``python -m pyaccel.binary_digits`` trains it, patches it and prints accuracy
and agreement of the patched (popcount kernels) and unpatched models.
"""
from __future__ import annotations

import time
from typing import Tuple

import torch
from torch import nn

import pyaccel
from pyaccel.nn import BinaryConv2d, BinaryLinear


def load_digits_split(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1437 / 360 images [N, 1, 8, 8] in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),           # float input layer
        BinaryConv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.Hardtanh(),
        nn.MaxPool2d(2),
        BinaryConv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.Hardtanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        BinaryLinear(64 * 4, 128, bias=False), nn.BatchNorm1d(128), nn.Hardtanh(),
        nn.Linear(128, 10))                                                           # float classifier


def train(epochs: int = 12, seed: int = 0) -> Tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = make_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is faster than two busy ones
    try:
        return _train(model, epochs, xtr, ytr, xte, yte)
    finally:
        torch.set_num_threads(threads)


def _train(model, epochs, xtr, ytr, xte, yte):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return model, {"test_accuracy": acc, "train_seconds": time.perf_counter() - t0, "x_test": xte, "y_test": yte}


def main() -> None:
    model, info = train()
    xte, yte = info["x_test"], info["y_test"]
    with torch.no_grad():
        pred = model(xte).argmax(1)
    report = pyaccel.patch(model)
    print(report)
    with torch.no_grad():
        pred_p = model(xte).argmax(1)
    print(f"trained in {info['train_seconds']:.1f} s; test accuracy {info['test_accuracy']:.3f} (unpatched), "
          f"{(pred_p == yte).float().mean().item():.3f} (patched); predictions equal: {bool(torch.equal(pred, pred_p))}")


if __name__ == "__main__":
    main()
