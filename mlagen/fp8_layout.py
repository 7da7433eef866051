"""Sizes of the FP8 cache rows (FlashMLA's "FP8 with scale" layout) in plain integers, so the
spec can report cache bytes and the runtime can lay the rows out without importing each other.

    latent row:  [kv_lora_rank e4m3][fp32 scale per SCALE_GROUP values][qk_rope_head_dim bf16]
    indexer row: [index_head_dim e4m3][one fp32 scale]
"""

from __future__ import annotations

SCALE_GROUP = 128  # e4m3 values per fp32 scale (FlashMLA: 512 = 4 x 128)
SCALE_BYTES = 4  # fp32
ROPE_BYTES = 2  # the rope key stays bf16: it carries the rotation, which 3 mantissa bits would blur


def scale_groups(latent: int) -> int:
    return -(-latent // SCALE_GROUP)


def latent_row_bytes(latent: int, rope: int) -> int:
    """DeepSeek-V3.2: 512 + 4 * 4 + 64 * 2 = 656."""
    return latent + SCALE_BYTES * scale_groups(latent) + ROPE_BYTES * rope


def index_row_bytes(index_dim: int) -> int:
    """DeepSeek-V3.2: 128 + 4 = 132."""
    return index_dim + SCALE_BYTES
