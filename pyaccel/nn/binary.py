"""Trainable binary layers: drop-in nn.Conv2d / nn.Linear subclasses (XNOR-Net).

Forward: input activations and weights are binarized with sign (sign(0) = +1,
as in the kernels) through a straight-through estimator (the gradient passes
where |v| <= 1, Hubara et al. 2016), and each output channel is scaled by
alpha = mean|w| over its weights (Rastegari et al., "XNOR-Net", ECCV 2016):

    y = conv(sign(x), sign(w)) * alpha + bias

The gradient reaches w through sign (STE) and through alpha, which is the
XNOR-Net weight gradient. The dot products are integers, exact in fp32, so
the inference modules that ``pyaccel.patch`` swaps in (popcount kernels)
give the same outputs bit for bit when no BatchNorm is folded in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized

from pyaccel.reference_binary import PADDING_MODES, pair


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """±1 (sign(0) = +1) with a straight-through gradient where |x| <= 1."""
    return _SignSTE.apply(x)


def weight_alpha(weight: Tensor) -> Tensor:
    """alpha [OC] = mean |w| over each output channel's weights."""
    return weight.abs().reshape(weight.shape[0], -1).mean(1)


class BinaryConv2d(nn.Conv2d):
    """nn.Conv2d with binary (±1) activations and weights, scaled per output channel.

    Same constructor as nn.Conv2d, plus ``binary_padding``: 'zeros' (default:
    exact zero padding, ``conv(sign(x), sign(w), padding=p)``) or 'ones' (pad
    the ±1 input with +1: cheaper kernels, a different function near the
    border). ``padding_mode`` other than 'zeros' pads sign(x) with that mode
    (training only: patch leaves such layers as they are, with the reason).

    Shapes as nn.Conv2d: x [N, C, H, W] or [C, H, W] -> [N, OC, OH, OW].
    """

    _pyaccel_trainable = True  # patch looks at it (a training module, not a swapped-in one)

    def __init__(self, *args, binary_padding: str = "zeros", **kwargs):
        super().__init__(*args, **kwargs)
        if binary_padding not in PADDING_MODES:
            raise ValueError(f"binary_padding: expected one of {PADDING_MODES}, got {binary_padding!r}")
        if binary_padding == "ones" and isinstance(self.padding, str):
            # 'valid' is (0, 0); 'same' only where torch pads evenly (odd dilated kernel extents)
            from pyaccel.nn.xnor import numeric_padding

            self.padding = numeric_padding(self)  # ValueError naming the uneven 'same' otherwise
            self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]
        self.binary_padding = binary_padding

    @classmethod
    def from_float(cls, conv: nn.Conv2d, binary_padding: str = "zeros") -> "BinaryConv2d":
        """A BinaryConv2d holding (sharing) conv's weight and bias Parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", binary_padding=binary_padding)
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def alpha(self) -> Tensor:
        return weight_alpha(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        sx = sign_ste(x)
        sw = sign_ste(self.weight)
        if self.binary_padding == "ones" and self.padding_mode == "zeros":
            ph, pw = pair(self.padding)
            y = F.conv2d(F.pad(sx, (pw, pw, ph, ph), value=1.0), sw, None, self.stride, 0, self.dilation,
                         self.groups)
        else:
            y = self._conv_forward(sx, sw, None)
        y = y * self.alpha().reshape(-1, 1, 1)  # broadcasts over [OC, H, W] and [N, OC, H, W]
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1, 1)
        return y

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", binary_padding={self.binary_padding!r}" if self.binary_padding != "zeros" else "")


class BinaryLinear(nn.Linear):
    """nn.Linear with binary (±1) activations and weights, scaled per output channel:
    ``y = (sign(x) @ sign(w)ᵀ) * alpha + bias``. Same constructor as nn.Linear;
    x [..., in_features] -> [..., out_features]."""

    _pyaccel_trainable = True  # patch looks at it (a training module, not a swapped-in one)

    @classmethod
    def from_float(cls, lin: nn.Linear) -> "BinaryLinear":
        """A BinaryLinear holding (sharing) lin's weight and bias Parameters."""
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        new.train(lin.training)
        return new

    def alpha(self) -> Tensor:
        return weight_alpha(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(sign_ste(x), sign_ste(self.weight)) * self.alpha()
        if self.bias is not None:
            y = y + self.bias
        return y


def default_binarize_filter(module: nn.Module, path: str) -> bool:
    """Every Conv2d / Linear is a candidate (first and last are excluded separately)."""
    return True


def _call_order(model: nn.Module) -> list:
    """Paths of the modules `model`'s forward calls, in call order, when
    torch.fx can trace it (nn layers are leaves); [] otherwise."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return []
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def _weight_not_plain(mod: nn.Module):
    """Why mod's weight is not a plain Parameter binarize can share (pruned by
    torch.nn.utils.prune, parametrized), or None."""
    if "weight_orig" in mod._parameters:
        return "pruned with torch.nn.utils.prune (weight_orig and weight_mask; torch.nn.utils.prune.remove)"
    if is_parametrized(mod, "weight"):
        return "parametrized (torch.nn.utils.parametrize; remove_parametrizations)"
    if not isinstance(mod._parameters.get("weight"), nn.Parameter):
        return "not an nn.Parameter"
    return None


def binarize(model: nn.Module, filter_fn=None, *, keep_first_last: bool = True,
             binary_padding: str = "zeros") -> nn.Module:
    """Turn float nn.Conv2d / nn.Linear layers of `model` into BinaryConv2d /
    BinaryLinear, in place (they keep the same Parameters, so an optimizer
    built before still trains them); returns the model.

    Args:
        filter_fn: ``filter_fn(module, path) -> bool`` choosing layers (default: all).
        keep_first_last: leave the first and the last convertible Conv2d/Linear
            float, as the BNN literature does (binarizing the input layer and the
            classifier costs most accuracy): first and last in the order forward
            calls them when torch.fx can trace the model, else in
            ``named_modules`` (registration) order.
        binary_padding: 'zeros' (exact) or 'ones' for the new BinaryConv2d layers.

    Only exact nn.Conv2d / nn.Linear instances are converted (not subclasses,
    not layers already binary). Raises TypeError for a non-Module model or a
    non-callable filter_fn, and ValueError naming the layer, before anything
    is converted, when a chosen layer's weight is not a plain Parameter
    (pruned by torch.nn.utils.prune, parametrized).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, path) -> bool, got {type(filter_fn).__name__}")
    if binary_padding not in PADDING_MODES:
        raise ValueError(f"binary_padding: expected one of {PADDING_MODES}, got {binary_padding!r}")
    # every path (remove_duplicate=False): a layer registered at two paths becomes one binary layer at both
    layers = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, (nn.Conv2d, nn.Linear))]
    convertible = [p for p, m in layers if type(m) in (nn.Conv2d, nn.Linear)]
    skip = set()
    if keep_first_last and convertible:
        called = _call_order(model)
        order = [p for p in called if p in set(convertible)] if called else []
        if not order:  # not traceable (or no layer called through fx): registration order
            order = convertible
        skip = {order[0], order[-1]}
    paths_of = {}
    for path, mod in layers:
        paths_of.setdefault(id(mod), []).append(path)
    chosen = []
    for path, mod in layers:
        if type(mod) not in (nn.Conv2d, nn.Linear):
            continue
        # a layer at several paths is converted at all of them or at none
        if any(p in skip or (filter_fn is not None and not filter_fn(mod, p)) for p in paths_of[id(mod)]):
            continue
        chosen.append((path, mod))
    for path, mod in chosen:  # before anything is converted: the model is never left half binarized
        why = _weight_not_plain(mod)
        if why is not None:
            raise ValueError(f"binarize: {path or '<root>'} ({type(mod).__name__}): its weight is {why}; binarize "
                             "shares plain weight Parameters (remove that first, or leave the layer out with "
                             "filter_fn)")
    made = {}
    for path, mod in chosen:
        new = made.get(id(mod))
        if new is None:
            new = made[id(mod)] = (BinaryConv2d.from_float(mod, binary_padding) if isinstance(mod, nn.Conv2d)
                                   else BinaryLinear.from_float(mod))
        if path == "":
            return new
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    return model
