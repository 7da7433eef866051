"""The spec: frozen dataclasses, one per family, plus the field tables that
the parser checks YAML against.

This layer knows nothing of torch, triton or the IR (see DESIGN.md, "Layers").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = ("bf16", "fp16", "fp32")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ROPE_LAYOUTS = ("half", "interleave")
FAMILIES = ("mla", "mha", "gqa", "mqa", "latent")


@dataclass(frozen=True, slots=True)
class Yarn:
    """YaRN context extension, with the field meanings of transformers' rope_scaling."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True, slots=True)
class Rope:
    theta: float
    layout: str = "half"
    scaling: Yarn | None = None


def softmax_scale(qk_head_dim: int, rope: Rope | None) -> float:
    """The attention softmax scale a spec implies: qk_head_dim**-0.5, times mscale**2 under yarn
    with mscale_all_dim (as transformers' DeepseekV3). Torch-free, so the compiler and the
    runtime (context parallelism) share one formula."""
    scale = qk_head_dim**-0.5
    scaling = rope.scaling if rope else None
    if scaling is not None and scaling.mscale_all_dim and scaling.factor > 1:
        mscale = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0
        scale *= mscale * mscale
    return scale


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecBase:
    name: str
    family: str
    d_model: int
    heads: int
    causal: bool
    dtype: str
    max_position: int
    # Where each field was written, for error messages from later stages:
    # (("kv_lora_rank", 7), ...). Not part of the spec's meaning or hash.
    source: str = field(default="<spec>", compare=False)
    field_lines: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def line_of(self, name: str) -> int | None:
        return dict(self.field_lines).get(name)

    def where(self, name: str) -> str:
        line = self.line_of(name)
        return self.source if line is None else f"{self.source}:{line}"

    def fields_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        data.pop("field_lines")
        return data

    @property
    def content_hash(self) -> str:
        """Hash of the spec's meaning (not its file bytes): comments and key order do not count."""
        canonical = json.dumps(self.fields_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class MlaSpec(SpecBase):
    """DeepSeek-V2/V3 Multi-head Latent Attention (low-rank joint KV compression)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: Rope
    norm_eps: float
    attention_bias: bool
    page_size: int  # tokens per page of the paged latent cache

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def cache_values_per_token(self) -> int:
        """The compressed cache: the latent plus the one rope key shared by all heads."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def mha_cache_values_per_token(self) -> int:
        return self.heads * (self.qk_head_dim + self.v_head_dim)


@dataclass(frozen=True, slots=True, kw_only=True)
class GqaSpec(SpecBase):
    """Llama-style attention; family mha (kv_heads == heads), gqa, or mqa (kv_heads == 1)."""

    kv_heads: int
    head_dim: int
    rope: Rope
    window: int | None
    attention_bias: bool

    def cache_values_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def mha_cache_values_per_token(self) -> int:
        return 2 * self.heads * self.head_dim


@dataclass(frozen=True, slots=True, kw_only=True)
class LatentSpec(SpecBase):
    """M learned latent tokens: tokens -> latents -> tokens, optionally plus local window attention.

    Non-causal: one set of latents summarises the whole sequence.
    Causal: the sequence is cut into chunks of `chunk_size`; each chunk gets its
    own latent summary, and a token reads only the summaries of earlier chunks,
    so no token sees the future through the latents.
    """

    head_dim: int
    latent_tokens: int
    self_attention: bool
    chunk_size: int | None
    window: int | None
    rope: Rope | None

    @property
    def hybrid(self) -> bool:
        return self.window is not None

    def cache_values_per_token(self) -> float:
        """Decode state that grows with the sequence, amortised per token: K and V of
        the M latents of each finished chunk. (The hybrid's window K/V is a fixed
        window * 2 * heads * head_dim values, whatever the length; non-causal specs
        have no decode cache.)"""
        if not self.chunk_size:
            return 0.0
        return 2 * self.heads * self.head_dim * self.latent_tokens / self.chunk_size

    def mha_cache_values_per_token(self) -> int:
        return 2 * self.heads * self.head_dim


Spec = MlaSpec | GqaSpec | LatentSpec
