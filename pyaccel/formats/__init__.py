"""Compressed weight formats: pure functions from dense weights to compressed
forms and back. Canonical forms (what a state_dict stores) are machine
independent; packed layouts for the native kernels are derived at load time."""
from pyaccel.formats.int8 import (  # noqa: F401
    Int8Weight,
    dequantize_weight,
    pack_int8_weight,
    quantize_weight_per_channel,
    from_torch_ao_dynamic_linear,
)
