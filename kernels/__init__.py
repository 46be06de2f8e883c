"""Triton GPU kernels (shipped in the wheel as ``pyaccel.kernels``).

Importing a module here needs Triton; nothing runs on a GPU at import time.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""
