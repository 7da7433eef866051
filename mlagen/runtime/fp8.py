"""FP8 cache rows, packed and unpacked in torch (the kernels decode them themselves).

The latent row is FlashMLA's "FP8 with scale" layout, per token:

    [kv_lora_rank e4m3 codes][one fp32 scale per 128 of them][qk_rope_head_dim bf16]

(DeepSeek-V3.2: 512 + 16 + 128 = 656 bytes, against 1152 in bf16). The indexer's key row is
[index_head_dim e4m3 codes][one fp32 scale] (128 + 4 = 132 bytes). A scale is the group's
largest magnitude / 448, the largest e4m3 value, so every code is finite; codes round to
nearest even, as torch's float8_e4m3fn conversion does.
"""

from __future__ import annotations

import torch

from mlagen.fp8_layout import SCALE_BYTES, SCALE_GROUP, index_row_bytes, latent_row_bytes, scale_groups
from mlagen.runtime.launch import launch_arch

E4M3_MAX = 448.0


def hardware_e4m3(device: torch.device) -> bool:
    """Whether kernels launched on `device` may convert e4m3 in hardware (sm_89 and later:
    Triton's float8e4nv); sm_80 and the interpreter decode the bits with integer arithmetic."""
    arch = launch_arch(device)
    return arch is not None and arch >= 89


def quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (e4m3 codes [N, D] uint8, fp32 scales [N, ceil(D / group)]); the last group
    may be shorter."""
    rows, dim = x.shape
    groups = -(-dim // group)
    wide = torch.nn.functional.pad(x.float(), (0, groups * group - dim)).view(rows, groups, group)
    # An all-zero group keeps a tiny scale: its codes are zeros, not 0 / 0.
    scales = (wide.abs().amax(-1) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (wide / scales[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.view(rows, groups * group)[:, :dim].view(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `quantize`, in fp32."""
    values = codes.view(torch.float8_e4m3fn).float()
    return values * scales.repeat_interleave(group, dim=-1)[:, : values.shape[-1]]


def pack_latent_rows(latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """latent [N, r], rope key [N, dr] -> FP8 cache rows [N, fp8_latent_bytes(r, dr)] uint8."""
    codes, scales = quantize(latent, SCALE_GROUP)
    return torch.cat((codes, _bytes(scales), _bytes(rope.to(torch.bfloat16))), dim=-1)


def unpack_latent_rows(
    rows: torch.Tensor, latent_dim: int, rope_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 cache rows [N, bytes] -> (latent [N, r] fp32, rope key [N, dr] bf16)."""
    assert rows.shape[-1] == latent_row_bytes(latent_dim, rope_dim), rows.shape
    scales_end = latent_dim + SCALE_BYTES * scale_groups(latent_dim)
    scales = rows[:, latent_dim:scales_end].contiguous().view(torch.float32)
    latent = dequantize(rows[:, :latent_dim], scales, SCALE_GROUP)
    return latent, rows[:, scales_end:].contiguous().view(torch.bfloat16)


def pack_index_keys(keys: torch.Tensor) -> torch.Tensor:
    """Indexer keys [N, d] -> FP8 rows [N, d + 4] uint8 (one scale per key)."""
    codes, scales = quantize(keys, keys.shape[-1])
    return torch.cat((codes, _bytes(scales)), dim=-1)


def unpack_index_keys(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """FP8 indexer rows [N, d + 4] -> keys [N, d] fp32."""
    assert rows.shape[-1] == index_row_bytes(dim), rows.shape
    return dequantize(rows[:, :dim], rows[:, dim:].contiguous().view(torch.float32), dim)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes of each row of x [N, k] as uint8 [N, k * element size]."""
    return x.contiguous().view(torch.uint8)
