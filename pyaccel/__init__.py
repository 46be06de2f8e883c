"""pyaccel: hand-written CPU (SIMD) and GPU (Triton) kernels for compressed PyTorch models.

    import pyaccel
    report = pyaccel.patch(model)                   # lossless swaps, in place
    report = pyaccel.patch(model, quantize="int8")  # also quantize float Linear layers
    print(report); pyaccel.backend_info()
"""
from pyaccel import _native  # noqa: F401  (loads torch, then the native library)
from pyaccel import ops  # noqa: F401  (registers torch.ops.pyaccel.*)
from pyaccel import ops_block_sparse  # noqa: F401
from pyaccel import ops_conv  # noqa: F401
from pyaccel import ops_binary  # noqa: F401
from pyaccel import nn  # noqa: F401
from pyaccel.backend import BackendInfo, backend_info, tune_malloc
from pyaccel.patch import PatchEntry, PatchReport, patch
from pyaccel.nn.binary import binarize

__version__ = "0.1.0"
__all__ = ["patch", "binarize", "PatchReport", "PatchEntry", "backend_info", "BackendInfo", "tune_malloc", "nn",
           "ops"]
