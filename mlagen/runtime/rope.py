"""Rotary position embedding, computed exactly as transformers does (default and yarn).

Layouts: `half` rotates (i, i + d/2); `interleave` rotates (2i, 2i+1). Like
transformers' DeepseekV3 `rope_interleave`, the interleaved path first
de-interleaves the vector and then applies the half rotation, so its output
is in half layout; q and k get the same permutation, so scores are unchanged.
"""

from __future__ import annotations

import math

import torch

# (factor, original_max_position, beta_fast, beta_slow, mscale, mscale_all_dim)
YarnParams = tuple[float, int, float, float, float, float]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(dim: int, theta: float, yarn: YarnParams | None) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] in fp32 and the factor cos/sin are multiplied by."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    pos_freqs = theta**exponents
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    factor, original_max, beta_fast, beta_slow, mscale, mscale_all_dim = yarn
    if mscale and mscale_all_dim:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, dim] for integer positions [B, S], computed in fp32 (as transformers
    does) then cast; in fp64 for an fp64 module, so the golden reference stays exact."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = position_ids.to(compute)[..., None] * inv_freq.to(position_ids.device, compute)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate x [B, S, H, dim] by cos/sin [B, S, dim] (broadcast over heads)."""
    if layout == "interleave":
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
