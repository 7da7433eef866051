"""Tensor descriptors (TMA on sm_90 and later) for the attention kernels' streamed operands.

A kernel streams one head's rows of a [B, S, H, D] tensor at a time. Its descriptor views the
tensor as a 2D table: one row per token (the row stride is the sequence stride, batch b
starting at row b * stride_b / stride_s) and the heads side by side in the columns (head h at
column h * stride_h). That covers the dense [B, S, H, D] layout, slices of a fused projection
and broadcast heads or batches (stride 0); layouts it does not cover take plain loads.
"""

from __future__ import annotations

import torch

from mlagen.runtime.launch import launch_arch

# Element sizes TMA reads here: 16-bit, and fp32 (tf32 dots). fp64 (gradcheck) keeps plain loads.
_DESCRIPTOR_ELEMENTS = (2, 4)


def uses_descriptors(device: torch.device) -> bool:
    """Whether launches on `device` read through descriptors: the datacenter parts from sm_90
    on. The sm_12x consumer Blackwells have TMA too, but at the tiles their 99 KB allow the
    descriptor path spills (104 bytes at d=128, measured with Triton 3.9): plain loads there."""
    arch = launch_arch(device)
    return arch is not None and arch >= 90 and arch // 10 != 12


def head_rows(tensor: torch.Tensor, block_rows: int, tile_width: int):
    """A TensorDescriptor of `block_rows` tokens x D of one head of `tensor` [B, S, H, D],
    or None when TMA cannot read it so: D narrower than the kernel's (power-of-two) tile,
    a base or sequence stride off 16 bytes, heads that do not lie inside one token's row,
    a batch stride that is not a whole number of rows, an element size TMA is not used
    for, or no element at all."""
    batch, seqlen, heads, width = tensor.shape
    stride_b, stride_s, stride_h, stride_d = tensor.stride()
    element = tensor.element_size()
    if width != tile_width or tensor.numel() == 0 or element not in _DESCRIPTOR_ELEMENTS:
        return None
    if stride_d != 1 or stride_s <= 0:
        return None
    if (width * element) % 16 or (stride_s * element) % 16 or tensor.data_ptr() % 16:
        return None
    if stride_h < 0 or (heads - 1) * stride_h + width > stride_s:
        return None
    if batch > 1 and (stride_b < 0 or stride_b % stride_s):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = (batch - 1) * (stride_b // stride_s) + seqlen
    columns = (heads - 1) * stride_h + width
    return TensorDescriptor(tensor, [rows, columns], [stride_s, 1], [block_rows, width])
