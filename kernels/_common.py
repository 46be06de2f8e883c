"""Helpers shared by the Triton kernel modules."""
import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, no libdevice, small tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
