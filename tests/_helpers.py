"""Test helpers (importable: pyproject puts tests/ on sys.path)."""
import torch


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-300)))
