"""Inference modules backed by pyaccel kernels."""
from pyaccel.nn._conv import ConvSkip  # noqa: F401
from pyaccel.nn.binary import BinaryConv2d, BinaryLinear  # noqa: F401
from pyaccel.nn.block_sparse_linear import BlockSparseInt8Linear, BlockSparseLinear  # noqa: F401
from pyaccel.nn.dws_conv import FusedDWSeparableConv2d  # noqa: F401
from pyaccel.nn.dws_conv_int8 import FusedDWSeparableInt8Conv2d  # noqa: F401
from pyaccel.nn.int8_linear import Int8Linear  # noqa: F401
from pyaccel.nn.sparse24_linear import Sparse24Int8Linear, Sparse24Linear  # noqa: F401
from pyaccel.nn.xnor import XnorConv2d, XnorLinear  # noqa: F401

__all__ = ["Int8Linear", "Sparse24Linear", "Sparse24Int8Linear", "BlockSparseLinear", "BlockSparseInt8Linear",
           "FusedDWSeparableConv2d", "FusedDWSeparableInt8Conv2d", "ConvSkip",
           "BinaryConv2d", "BinaryLinear", "XnorConv2d", "XnorLinear"]
