"""What every Conv-shaped pyaccel module shares (the Conv-shaped base next to
:class:`~pyaccel.nn._packed.PackedLinear`).

* **Memory format.** The kernels compute in channels-last (NHWC). Modules take
  4-D ``[N, C, H, W]`` inputs in NCHW or ``torch.channels_last`` memory format
  (any strides: anything else is copied once) and return the output in the
  input's memory format. :func:`to_nhwc` / :func:`from_nhwc` do the two
  conversions (free for a channels_last input).
* **Geometry.** :class:`ConvGeometry` holds kernel size, stride, dilation and
  padding -- symmetric (PyTorch), explicit per side (``(top, bottom, left,
  right)``: asymmetric, as a ZeroPad2d in front of the conv gives) or
  ``"tf_same"`` (TensorFlow's "SAME": computed from the input size; stride 2 on
  an even input pads (0, 1), not (1, 1)) -- and gives the output size and the
  per-call padding of an input size.
* **Reading a conv.** :func:`conv_geometry` reads the geometry a Conv2d really
  computes with, including the subclasses of EfficientNet ports that pad on
  their own (``Conv2dStaticSamePadding``: a ZeroPad2d ``static_padding``
  module; ``Conv2dDynamicSamePadding``: TF "same" at every call). Any other
  Conv2d subclass that overrides ``forward`` (or ``_conv_forward``) raises
  :class:`ConvSkip` with the reason: pattern passes report it, never fuse it.
* **Lifecycle.** :class:`PackedConv2d` is a :class:`PackedModule` (repack on
  load/assign/.to, frozen fp32 buffers) whose eager path converts the input to
  NHWC, calls the subclass's native NHWC kernel and converts back; autograd,
  tracing, compiling and other devices go through the subclass's checked
  ``torch.ops`` op (``_checked_op``), torch.fx sees a leaf ``call_module``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from pyaccel import ops
from pyaccel.nn._packed import PackedModule, _fx_proxy, _is_compiling, _tracing_state, _grad_enabled

Pad4 = Tuple[int, int, int, int]
TF_SAME = "tf_same"
# modules whose Conv2dStaticSamePadding / Conv2dDynamicSamePadding are the
# TensorFlow-"same" EfficientNet ports conv_geometry reads
_SAME_PADDING_MODULES = frozenset({"efficientnet_lite_pytorch.utils", "efficientnet_pytorch.utils"})


class ConvSkip(ValueError):
    """A convolution pyaccel cannot take as it is (a ValueError); str(exc) is the reason for the report."""


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)  # SymInt: traced weight shapes


def _pair(v, name: str) -> Tuple[int, int]:
    if _is_int(v):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(i) for i in v):
        return (v[0], v[1])
    raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a 2-D convolution window.

    kernel, stride, dilation: (h, w) pairs of ints >= 1.
    padding: (top, bottom, left, right) zero padding, ints >= 0, or
    ``"tf_same"``: TensorFlow's SAME padding, computed per input size by
    :meth:`pads` (total = max((ceil(in / s) - 1) * s + (k - 1) * d + 1 - in, 0),
    the smaller half on top/left).
    """

    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    padding: Union[Pad4, str] = (0, 0, 0, 0)

    def __post_init__(self):
        for name in ("kernel", "stride", "dilation"):
            v = _pair(getattr(self, name), name)
            if min(v) < 1:
                raise ValueError(f"{name}: expected values >= 1, got {v}")
            object.__setattr__(self, name, v)
        p = self.padding
        if isinstance(p, str):
            if p != TF_SAME:
                raise ValueError(f"padding: expected (top, bottom, left, right) or {TF_SAME!r}, got {p!r}")
        else:
            if isinstance(p, int) and not isinstance(p, bool):
                p = (p, p, p, p)
            elif isinstance(p, (tuple, list)) and len(p) == 2:
                p = (p[0], p[0], p[1], p[1])
            if not (isinstance(p, (tuple, list)) and len(p) == 4 and all(_is_int(i) and i >= 0 for i in p)):
                raise ValueError(f"padding: expected 4 ints >= 0 (top, bottom, left, right), got {self.padding!r}")
            object.__setattr__(self, "padding", tuple(p))

    def pads(self, h: int, w: int) -> Pad4:
        """(top, bottom, left, right) zero padding for an h x w input."""
        if self.padding != TF_SAME:
            return self.padding  # type: ignore[return-value]
        out = []
        for size, k, s, d in ((h, self.kernel[0], self.stride[0], self.dilation[0]),
                              (w, self.kernel[1], self.stride[1], self.dilation[1])):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)  # ceil(size / s)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        """Output (height, width) for an h x w input; ValueError when the window does not fit."""
        t, b, l, r = self.pads(h, w)
        oh = (h + t + b - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + l + r - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"x: a {h}x{w} input is smaller than the {self.kernel[0]}x{self.kernel[1]} "
                             f"window (dilation {self.dilation}, padding {(t, b, l, r)})")
        return oh, ow

    def describe(self) -> str:
        pad = self.padding if self.padding == TF_SAME else "(%d, %d, %d, %d)" % self.padding
        return (f"kernel={self.kernel[0]}x{self.kernel[1]}, stride={self.stride}, dilation={self.dilation}, "
                f"padding={pad}")


def _overrides(mod: nn.Module, base: type, name: str) -> bool:
    return getattr(type(mod), name, None) is not getattr(base, name, None)


def conv_geometry(conv: nn.Module) -> ConvGeometry:
    """The window geometry `conv` (an nn.Conv2d or a known self-padding subclass) computes with.

    Handles padding_mode "zeros", padding="same"/"valid"/ints, the EfficientNet
    ports' ``Conv2dStaticSamePadding`` (its ZeroPad2d/Identity ``static_padding``)
    and ``Conv2dDynamicSamePadding`` (TF "same"). Raises ConvSkip with the
    reason for other subclasses that override forward/_conv_forward, other
    padding modes or non-zero static padding values, TypeError for non-Conv2d.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv: expected a torch.nn.Conv2d, got {type(conv).__name__}")
    name = type(conv).__name__
    kernel, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
    if conv.padding_mode != "zeros":
        raise ConvSkip(f"{name} pads with padding_mode={conv.padding_mode!r}; only zero padding is fused")
    if type(conv) is not nn.Conv2d and (_overrides(conv, nn.Conv2d, "forward")
                                        or _overrides(conv, nn.Conv2d, "_conv_forward")):
        # the EfficientNet ports' classes, known by module and name (a user's class of the same
        # name may pad otherwise: it is reported, never assumed)
        known = type(conv).__module__ in _SAME_PADDING_MODULES
        if known and name == "Conv2dDynamicSamePadding":
            if tuple(conv.padding) != (0, 0):
                raise ConvSkip(f"{name} with padding={tuple(conv.padding)} besides its own 'same' padding")
            return ConvGeometry(kernel, stride, dilation, TF_SAME)
        sp = getattr(conv, "static_padding", None)
        if known and sp is not None and name == "Conv2dStaticSamePadding":
            base = tuple(conv.padding)
            if isinstance(sp, nn.Identity) or (type(sp).__name__ == "Identity" and not list(sp.parameters())
                                               and not list(sp.buffers()) and not list(sp.children())):
                pad = (0, 0, 0, 0)  # nn.Identity, or a port's own parameterless Identity
            elif isinstance(sp, (nn.ZeroPad2d, nn.ConstantPad2d)) and float(getattr(sp, "value", 0.0)) == 0.0:
                l, r, t, b = sp.padding  # F.pad order: left, right, top, bottom
                if min(l, r, t, b) < 0:
                    raise ConvSkip(f"{name} crops its input (static_padding {sp.padding})")
                pad = (t, b, l, r)
            else:
                raise ConvSkip(f"{name} pads with {type(sp).__name__} (not zero padding)")
            pad = (pad[0] + base[0], pad[1] + base[0], pad[2] + base[1], pad[3] + base[1])
            return ConvGeometry(kernel, stride, dilation, pad)
        raise ConvSkip(f"{name} (a Conv2d subclass) overrides forward(): it may pad or compute on its own; "
                       "not fused")
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            return ConvGeometry(kernel, stride, dilation, (0, 0, 0, 0))
        # PyTorch's 'same' (stride 1 only): the extra pixel goes bottom/right
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return ConvGeometry(kernel, stride, dilation, tuple(pads))
    return ConvGeometry(kernel, stride, dilation, (p[0], p[0], p[1], p[1]))


def conv_weights(conv: nn.Conv2d) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight, bias or None) a Conv2d computes with, detached (parametrizations
    and prune masks applied: reading ``conv.weight`` gives the effective weight).
    ConvSkip when they are not plain floating-point tensors on a real device."""
    w = conv.weight
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.is_meta:
        raise ConvSkip(f"{type(conv).__name__}.weight is not a floating-point tensor with data")
    b = conv.bias
    return w.detach(), (None if b is None else b.detach())


# ---- memory format ------------------------------------------------------------------------
def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also plainly contiguous,
    which for C == 1 or H == W == 1 it can be both). An empty tensor counts as
    contiguous in every format, so for one its strides decide."""
    if x.dim() != 4:
        return False
    if not x.is_contiguous():
        return x.is_contiguous(memory_format=torch.channels_last)
    # contiguous, which every empty tensor is (sizes are traced values under torch.jit.trace:
    # there the example input decides, as it does for the rest of the module's Python code)
    return _tracing_state() is None and x.numel() == 0 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(3) != 1


def in_format(y: Tensor, channels_last: bool) -> Tensor:
    """y [N, C, H, W] in channels_last memory format when `channels_last`, else
    contiguous (a copy only when y is not already so); an empty y gets that
    format's strides too (``contiguous`` leaves an empty tensor as it is)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if _tracing_state() is None and y.numel() == 0:  # a view with that format's strides: autograd stays connected
        return y.as_strided(y.shape, torch.empty(y.shape, memory_format=fmt).stride())
    return y.contiguous(memory_format=fmt)


def to_nhwc(x: Tensor) -> Tuple[Tensor, bool]:
    """(x as a contiguous [N, H, W, C] tensor, whether x was channels_last).
    No copy for a channels_last x."""
    cl = is_channels_last(x)
    return x.permute(0, 2, 3, 1).contiguous(), cl


def from_nhwc(y: Tensor, channels_last: bool) -> Tensor:
    """A contiguous [N, H, W, C] result back as [N, C, H, W]: in channels_last
    memory format when `channels_last`, else contiguous (one copy)."""
    y = y.permute(0, 3, 1, 2)
    return y if channels_last else y.contiguous()


class PackedConv2d(PackedModule):
    """A Conv-shaped pyaccel module: 4-D NCHW / channels_last input and output
    (the output in the input's memory format), packed NHWC kernels.

    Subclasses set ``in_channels``, ``out_channels``, ``geometry``
    (:class:`ConvGeometry` of the window the input sees) and define

    * ``_native_nhwc_into(x_nhwc, y_nhwc, pad_t, pad_l)``: the native kernel on
      a contiguous float32 [N, H, W, C] CPU tensor into y (called only with a
      valid packing; the input is checked once per shape and strides);
    * ``_op(x, bias)``: the checked ``torch.ops.pyaccel`` op on [N, C, H, W]
      (argument checks, CPU/CUDA/fake kernels, autograd to x);
    * the PackedModule hooks (``WEIGHT_NAMES``, ``_canonical_error``, ``_pack``).

    Modules of this kind have no Linear ``_plan``; the eager fast path is
    ``_general`` -> ``_native_nchw``.
    """

    in_channels: int
    out_channels: int
    geometry: ConvGeometry

    def _native_nhwc_into(self, xn: Tensor, y: Tensor, pad_t: int, pad_l: int) -> None:  # pragma: no cover
        """Run the native kernel: xn contiguous float32 [N, H, W, C] -> y float32
        [N, OH, OW, Cout] (allocated by the caller), with pad_t/pad_l zero rows/columns
        before the input (the geometry's padding for this input size)."""
        raise NotImplementedError

    def _check_input(self, x) -> None:
        """TypeError/ValueError naming x for a bad input."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        ops.require_strided(x)
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"x: expected float32 or bfloat16, got {x.dtype} ({type(self).__name__} computes in "
                            "fp32; its buffers stay fp32 under .double() / .half())")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [N, {self.in_channels}, H, W] (or unbatched [{self.in_channels}, H, W]), "
                             f"got shape {tuple(x.shape)}")
        self.geometry.out_size(x.shape[2], x.shape[3])

    def out_shape(self, x_shape) -> Tuple[int, int, int, int]:
        oh, ow = self.geometry.out_size(x_shape[2], x_shape[3])
        return (x_shape[0], self.out_channels, oh, ow)

    _MAX_SHAPE_SPECS = 16

    def _repack(self) -> None:
        self.__dict__.pop("_shape_specs", None)  # output sizes and pads of the geometry packed before
        super()._repack()

    def _native_nchw(self, x: Tensor) -> Tensor:
        """The native kernel on a CPU float x [N, C, H, W] (checked here, once
        per shape and strides): NHWC in (no copy for channels_last), the
        output in x's memory format and dtype."""
        key = (x.shape, x.stride(), x.dtype)
        specs = self.__dict__.setdefault("_shape_specs", {})
        spec = specs.get(key)
        if spec is None:
            self._check_input(x)
            n, _, h, w = x.shape
            oh, ow = self.geometry.out_size(h, w)
            t, _, l, _ = self.geometry.pads(h, w)
            if len(specs) >= self._MAX_SHAPE_SPECS:
                specs.clear()
            spec = specs[key] = (is_channels_last(x), (n, oh, ow, self.out_channels), t, l, x.numel() == 0)
        cl, yshape, pad_t, pad_l, empty = spec
        f32 = x.dtype is torch.float32
        if empty:
            return in_format(torch.empty(yshape, dtype=x.dtype, device=x.device).permute(0, 3, 1, 2), cl)
        xn = (x if f32 else x.float()).permute(0, 2, 3, 1)
        if not cl:
            xn = xn.contiguous()
        y = torch.empty(yshape) if torch.get_default_dtype() is torch.float32 else torch.empty(
            yshape, dtype=torch.float32)
        if not y.is_cpu:  # a default-device context (torch.device("meta"), ...)
            y = torch.empty(yshape, dtype=torch.float32, device="cpu")
        self._native_nhwc_into(xn, y, pad_t, pad_l)
        y = y.permute(0, 3, 1, 2)
        if not cl:
            y = y.contiguous()
        return y if f32 else y.to(x.dtype)

    def _native_ok(self) -> bool:  # pragma: no cover - overridden
        return self._packed is not None

    def _general(self, x) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes it
            return self._general(x.unsqueeze(0)).squeeze(0)
        if type(x) is not Tensor:
            if _fx_proxy(x):  # torch.fx: a leaf call_module node
                tracer = x.tracer
                return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
            self._check_input(x)
            self._refresh()
            return self._checked_op(x)
        self._refresh()
        if (x.is_cpu and not _is_compiling() and not (x.requires_grad and _grad_enabled())
                and _tracing_state() is None and self._native_ok()):
            return self._native_nchw(x)
        y = self._checked_op(x)
        if _tracing_state() is None and not _is_compiling() and x.numel() == 0:
            y = in_format(y, is_channels_last(x))  # the op's empty result follows torch's format rules
        return y

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C, H, W] (float32 or bfloat16, NCHW or channels_last) -> y [N,
        Cout, OH, OW] in x's dtype and memory format (the class docstring gives
        OH, OW and the errors); an unbatched x [C, H, W] gives y [Cout, OH, OW],
        as nn.Conv2d does."""
        return self._general(x)
