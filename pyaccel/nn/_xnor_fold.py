"""Folding a binary training layer's epilogue for the inference modules of
:mod:`pyaccel.nn.xnor`: an eval-mode BatchNorm into (scale, shift), the
activation that follows into the kernels' descriptor, nn.Conv2d's string
paddings into numbers. Each raises TypeError / ValueError naming the argument
(bn, act, padding) it cannot fold."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from pyaccel import ops_binary as ob
from pyaccel.formats import binary as bf


def check_batchnorm(bn, channels: int, want: type = nn.modules.batchnorm._BatchNorm,
                    device: Optional[torch.device] = None) -> None:
    """Raise TypeError / ValueError naming ``bn`` unless it is a `want` module
    (nn.BatchNorm2d after a conv, nn.BatchNorm1d after a linear layer) that an
    epilogue can fold: in eval mode (training mode normalizes with batch
    statistics), with running statistics (track_running_stats=True) over
    `channels` features, on `device` (the layer's) when given."""
    if not isinstance(bn, want):
        raise TypeError(f"bn: expected an nn.{want.__name__} or None, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn: in training mode (it normalizes with batch statistics there); call .eval() before "
                         "folding")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: no running statistics (track_running_stats=False: it normalizes with batch "
                         "statistics in eval mode too), so there is nothing to fold")
    if bn.num_features != channels or bn.running_mean.shape != (channels,) or bn.running_var.shape != (channels,):
        raise ValueError(f"bn: expected {channels} features (the layer's output channels), got num_features="
                         f"{bn.num_features}")
    if device is not None and bn.running_mean.device != device:
        raise ValueError(f"bn: on {bn.running_mean.device}, expected the layer's device {device}")


def fold_epilogue(alpha: Tensor, bias: Optional[Tensor], bn: Optional[nn.Module]) -> Tuple[Tensor, Optional[Tensor]]:
    """(scale, shift) float32 [OC] of alpha * dot + bias followed by an eval-mode BatchNorm
    (or none); alpha, bias: [OC]. TypeError / ValueError naming bn where it cannot be
    folded (:func:`check_batchnorm`)."""
    alpha = alpha.detach().float()
    shift = bias.detach().float() if bias is not None else None
    if bn is None:
        return alpha.clone(), None if shift is None else shift.clone()
    check_batchnorm(bn, alpha.numel())
    inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
    g = gamma * inv
    base = (shift if shift is not None else torch.zeros_like(inv)) - bn.running_mean.detach().float()
    return alpha * g, base * g + beta


def activation_of(act: Optional[nn.Module], oc: int) -> Tuple[str, float, float, Optional[Tensor]]:
    """(act, lo, hi, slope) epilogue descriptor of nn.ReLU / nn.Hardtanh (ReLU6) / nn.PReLU / None.
    ValueError naming act for another module, a Hardtanh whose bounds are not finite with
    min_val < max_val, or a PReLU with neither 1 nor oc slopes."""
    if act is None or isinstance(act, nn.Identity):
        return "none", 0.0, 0.0, None
    if isinstance(act, nn.ReLU):
        return "relu", 0.0, 0.0, None
    if isinstance(act, nn.Hardtanh):
        lo, hi = float(act.min_val), float(act.max_val)
        if ob.act_bounds_error("hardtanh", lo, hi) is not None:
            raise ValueError(f"act: {act!r}: expected finite bounds with min_val < max_val")
        return "hardtanh", lo, hi, None
    if isinstance(act, nn.PReLU):
        w = act.weight.detach().float()
        if w.numel() not in (1, oc):
            raise ValueError(f"act: PReLU with {w.numel()} slopes after {oc} channels (expected 1 or {oc})")
        return "prelu", 0.0, 0.0, w.expand(oc).clone()
    raise ValueError(f"act: expected nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU, nn.Identity or None, got "
                     f"{type(act).__name__}")


def numeric_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """conv.padding as (ph, pw): 'valid' is (0, 0); 'same' (stride 1 in torch) is
    d * (k - 1) / 2 per side where that is a whole number (odd dilated kernel
    extents), else ValueError: torch then pads one more pixel at the
    bottom / right, which the symmetric binary kernels do not express."""
    p = conv.padding
    if not isinstance(p, str):
        return tuple(p)
    return _string_padding(p, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))


def _folded(layer: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module], oc: int, groups: int,
            bn_type: type):
    """(weight_bits, scale, bias, slope, (act, lo, hi)) of a Binary* training layer with the BatchNorm
    and the activation that follow it folded in (from_binary of both classes). TypeError / ValueError
    naming bn or act where they cannot be folded."""
    if bn is not None:
        check_batchnorm(bn, oc, bn_type, layer.weight.device)
    scale, shift = fold_epilogue(layer.alpha(), layer.bias, bn)
    a, lo, hi, slope = activation_of(act, oc)
    bits, _ = bf.pack_conv_weight(layer.weight.detach(), groups)
    return bits, scale, shift, slope, (a, lo, hi)


def _string_padding(padding: str, kernel: Tuple[int, int], stride: Tuple[int, int],
                    dilation: Tuple[int, int]) -> Tuple[int, int]:
    """nn.Conv2d's string paddings as (ph, pw): 'valid' -> (0, 0); 'same' -> d * (k - 1) / 2
    per side (stride 1 only, as torch; ValueError where that is not a whole number)."""
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 or t < 0 for t in total):
        raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} pads unevenly; "
                         f"no binary kernel for that")
    return (total[0] // 2, total[1] // 2)
