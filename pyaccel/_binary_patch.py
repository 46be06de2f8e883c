"""patch's binary rules: eval-mode BinaryConv2d / BinaryLinear -> XnorConv2d /
XnorLinear, with a BatchNorm and an activation right after them folded into
the kernel's epilogue.

Sequences are matched inside nn.Sequential containers (nested ones too, since
every Sequential in the model is visited): ``binary layer -> [BatchNorm] ->
[ReLU | ReLU6 | Hardtanh | PReLU]``; the folded BatchNorm / activation are
replaced by nn.Identity, and the chain is one report entry (its span: the
binary layer's path, then the folded modules'). A binary layer outside a
Sequential (or followed by something else) is swapped alone by the handler.

Note for the integrator: issue 13's shared ``pyaccel/_pattern.py`` (chain
matching through torch.fx, BN folding helpers) was not available when this
was written; this module is binary-specific and can move onto it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from torch import nn

from pyaccel.nn.binary import BinaryConv2d, BinaryLinear
from pyaccel import ops_binary
from pyaccel.nn.xnor import XnorConv2d, XnorLinear, check_batchnorm, numeric_padding

_ACTS = (nn.ReLU, nn.Hardtanh, nn.PReLU)  # nn.ReLU6 is a Hardtanh


def unsupported_reason(mod: nn.Module) -> Optional[str]:
    """Why a Binary* layer cannot be swapped, or None."""
    if mod.training:
        return "in training mode: call model.eval() before patch (the inference module has no gradients)"
    if isinstance(mod, BinaryConv2d):
        if mod.padding_mode != "zeros":
            return f"padding_mode {mod.padding_mode!r}: no binary kernel (zeros, or binary_padding='ones')"
        try:
            pad = numeric_padding(mod)
        except ValueError as exc:
            return str(exc)
        if mod.binary_padding == "zeros" and max(pad) > 0 and max(mod.kernel_size) > 64:
            return "exact zero padding takes kernels up to 64 x 64"
    if mod.weight.device.type == "meta":
        return "weights on the meta device"
    return None


def _bn_ok(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether patch folds `bn` after `layer`: exactly the BatchNorm class, tracking running statistics,
    and one from_binary takes (check_batchnorm)."""
    want = nn.BatchNorm2d if isinstance(layer, BinaryConv2d) else nn.BatchNorm1d
    n = layer.out_channels if isinstance(layer, BinaryConv2d) else layer.out_features
    if type(bn) is not want or not bn.track_running_stats:
        return False
    try:
        check_batchnorm(bn, n, want, layer.weight.device)
    except ValueError:
        return False
    return True


def _act_ok(act: nn.Module, n: int) -> bool:
    if not isinstance(act, _ACTS) or type(act) not in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU):
        return False
    if isinstance(act, nn.Hardtanh):  # finite bounds, min_val < max_val: what the epilogue clamps to
        return ops_binary.act_bounds_error("hardtanh", float(act.min_val), float(act.max_val)) is None
    return not isinstance(act, nn.PReLU) or act.weight.numel() in (1, n)


def build(layer: nn.Module, bn: Optional[nn.Module] = None, act: Optional[nn.Module] = None) -> nn.Module:
    cls = XnorConv2d if isinstance(layer, BinaryConv2d) else XnorLinear
    new = cls.from_binary(layer, bn, act).to(layer.weight.device)
    new.train(layer.training)
    return new


def handle(mod: nn.Module):
    """patch's handler for one module: None (not a binary layer), a reason
    string, or an nn.Module (the replacement)."""
    if type(mod) not in (BinaryConv2d, BinaryLinear):
        if isinstance(mod, (BinaryConv2d, BinaryLinear)):
            return f"subclass {type(mod).__name__} of a pyaccel binary layer may change forward(); not swapped"
        return None
    why = unsupported_reason(mod)
    return why if why is not None else build(mod)


def fold_sequences(model: nn.Module, selected: Callable[[nn.Module, str], Optional[str]],
                   blocked: Callable[[nn.Module], Optional[str]]
                   ) -> List[Tuple[str, str, nn.Module, List[Tuple[str, str]]]]:
    """Swap binary -> BN -> act chains found in nn.Sequential containers.

    selected(module, path) -> None when the user's filters take the layer,
    else the reason; blocked(module) -> why a module cannot be replaced
    (hooks a swap would lose), else None. Returns [(path, old type name, new module,
    [(folded path, folded type name), ...])] for the report; the model is
    modified in place.
    """
    done = []
    for spath, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        i = 0
        while i < len(names):
            layer = seq._modules[names[i]]
            path = f"{spath}.{names[i]}" if spath else names[i]
            if type(layer) not in (BinaryConv2d, BinaryLinear) or unsupported_reason(layer) or selected(layer, path):
                i += 1
                continue
            n = layer.out_channels if isinstance(layer, BinaryConv2d) else layer.out_features
            bn = act = None
            j = i + 1
            if blocked(layer):
                i += 1
                continue
            if j < len(names) and _bn_ok(layer, seq._modules[names[j]]) and not blocked(seq._modules[names[j]]):
                bn = seq._modules[names[j]]
                j += 1
            if j < len(names) and _act_ok(seq._modules[names[j]], n) and not blocked(seq._modules[names[j]]):
                act = seq._modules[names[j]]
                j += 1
            if bn is None and act is None:
                i += 1
                continue  # nothing to fold: the per-module handler swaps it
            folded = [(f"{spath}.{names[k]}" if spath else names[k], seq._modules[names[k]]._get_name())
                      for k in range(i + 1, j)]
            new = build(layer, bn, act)
            seq._modules[names[i]] = new
            for k in range(i + 1, j):
                seq._modules[names[k]] = nn.Identity()
            done.append((path, layer._get_name(), new, folded))
            i = j
    return done


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks)


def link_handoffs(model: nn.Module, used_elsewhere: dict) -> List[Tuple[str, str]]:
    """Let adjacent XnorConv2d layers of an nn.Sequential (only nn.Identity
    between them: the BatchNorm / activation folded away) hand packed signs
    to each other (XnorConv2d.emit_bits / takes_bits) for float32
    channels_last inputs in eager mode without autograd (other inputs keep
    float activations): the next layer reads only sign(y), so nothing changes
    but the float output that is no longer written and re-read. Taken where the consumer has one group, the producer's
    channels per group are a multiple of 32 (or one group), both are on the
    CPU, and no module involved has hooks or sits at another path
    (`used_elsewhere`: id -> number of paths). Returns [(producer path,
    consumer path)]."""
    from pyaccel.nn.xnor import XnorConv2d

    links = []
    for spath, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        for i, name in enumerate(names):
            a = seq._modules[name]
            if type(a) is not XnorConv2d:
                continue
            j = i + 1
            while j < len(names) and type(seq._modules[names[j]]) is nn.Identity:
                j += 1
            if j == len(names) or type(seq._modules[names[j]]) is not XnorConv2d:
                continue
            b = seq._modules[names[j]]
            between = [seq._modules[names[k]] for k in range(i + 1, j)]
            if (a.out_channels != b.in_channels or b.groups != 1
                    or (a.groups > 1 and (a.out_channels // a.groups) % 32)
                    or not (a.weight_bits.is_cpu and b.weight_bits.is_cpu)
                    or any(_hooked(m) or used_elsewhere.get(id(m), 1) > 1 for m in [a, b] + between)):
                continue
            a.emit_bits = True
            b.takes_bits = True
            links.append((f"{spath}.{name}" if spath else name, f"{spath}.{names[j]}" if spath else names[j]))
    return links
