"""Tile arithmetic shared by the compiler and the runtime.

Plain integers only, so codegen can size kernels without importing torch or
triton, and the runtime can launch them without importing the compiler.
"""

from __future__ import annotations


def padded(dim: int) -> int:
    """Tile width for a head dim: a power of two, at least 16 (the tensor-core K step)."""
    return max(16, 1 << (dim - 1).bit_length()) if dim else 0
