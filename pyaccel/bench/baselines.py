"""Baselines a user would run instead of pyaccel: torch fp32/bf16, torch.ao
dynamic int8, ONNX Runtime dynamic int8. Each builder returns a callable
x -> y (or None with the reason when the baseline is not installed)."""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn

# Environment caps of torch's bundled libraries, each read once, at its first use:
# FBGEMM (torch.ao quantized linear / conv), oneDNN (fp32 conv), MKL (sgemm),
# ATen's own vectorized kernels. ONNX Runtime's MLAS has no such cap.
CAP_VARS = ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
BASELINE_ISA_CAPS = {"avx2": dict(zip(CAP_VARS, ("AVX2", "AVX2", "AVX2", "avx2"))),
                     # an AVX-VNNI CPU: oneDNN has an AVX2 + VNNI level, FBGEMM, MKL's sgemm and ATen do not
                     "avx_vnni": dict(zip(CAP_VARS, ("AVX2", "AVX2_VNNI", "AVX2", "avx2"))),
                     # pyaccel below its AMX level on an AMX CPU: oneDNN (bf16 matmul, int8) without AMX too
                     "avx512_icl": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}}


def baseline_isa_caps(isa: str, detected: str, environ) -> dict:
    """Variables that cap torch's baselines at pyaccel's ISA `isa` when pyaccel
    runs below the CPU's (`detected`, e.g. PYACCEL_CPU_ISA=avx2 on AVX-512): {}
    at the native level, at levels without a cap, and when `environ` already
    sets any of them (the user's caps win)."""
    if isa == detected or any(k in environ for k in CAP_VARS):
        return {}
    return dict(BASELINE_ISA_CAPS.get(isa, {}))


def cap_baselines(info, native: bool = False, environ=None) -> str:
    """Cap torch's baselines at the ISA level pyaccel runs at (`info`:
    pyaccel.backend_info()) by setting baseline_isa_caps() in `environ`
    (os.environ by default) unless `native`; call it before torch's first
    quantized op, convolution or matmul. Returns the description the bench and
    demo headers print."""
    environ = os.environ if environ is None else environ
    caps = {} if native else baseline_isa_caps(info.cpu_isa, info.cpu_isa_detected, environ)
    environ.update(caps)
    user_caps = {k: environ[k] for k in CAP_VARS if k in environ and k not in caps}
    if caps:
        return f"torch capped at {info.cpu_isa} ({', '.join(f'{k}={v}' for k, v in caps.items())})"
    if user_caps:
        return f"torch as your environment sets it ({', '.join(f'{k}={v}' for k, v in user_caps.items())})"
    return f"torch at the CPU's full ISA ({info.cpu_isa_detected})"


def torch_ao_dynamic(linear: nn.Linear) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic with the x86 (fbgemm) engine."""
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


def onnxruntime_dynamic(linear: nn.Linear, threads: int) -> Tuple[Optional[Callable], str]:
    """ONNX Runtime, model quantized with onnxruntime.quantization.quantize_dynamic
    (QInt8 weights, per-tensor). The graph is built with onnx.helper (MatMul + Add)
    so no exporter is needed. Sessions never spin (allow_spinning = 0)."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort  # noqa: F401  (is it installed?)
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except Exception as exc:  # not installed
        return None, f"onnxruntime/onnx not available ({type(exc).__name__})"
    n, k = linear.weight.shape
    w_t = linear.weight.detach().t().contiguous().numpy().astype(np.float32)
    inits = [numpy_helper.from_array(w_t, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw" if linear.bias is not None else "y"])]
    if linear.bias is not None:
        inits.append(numpy_helper.from_array(linear.bias.detach().numpy().astype(np.float32), "B"))
        nodes.append(helper.make_node("Add", ["xw", "B"], ["y"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory() as d:
        fp, qp = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(model, fp)
        logging.disable(logging.WARNING)  # its "consider pre-processing" advice, once per model
        try:
            quantize_dynamic(fp, qp, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        sess = ort_session(qp, threads)
    return ort_runner(sess), "ok"


def ort_session(model, threads: int):
    """An ONNX Runtime CPU session of `model` (a path or serialized bytes) on
    `threads` intra-op threads whose threads never spin after a call
    (allow_spinning = 0: spinning threads slow torch in the same process)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_runner(sess) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (CPU float tensor, input "x") -> the session's first output as a tensor."""
    return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
