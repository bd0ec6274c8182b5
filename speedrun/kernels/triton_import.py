"""The one import of Triton. Triton is optional: CPU installs and tests run every kernel's plain
PyTorch twin, so a missing Triton leaves ``triton`` and ``tl`` as None and ``HAS_TRITON`` False
(each kernel module defines its ``@triton.jit`` functions only when it is True)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
