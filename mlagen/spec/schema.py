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

from mlagen import fp8_layout

DTYPES = ("bf16", "fp16", "fp32")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ROPE_LAYOUTS = ("half", "interleave")
FAMILIES = ("mla", "mha", "gqa", "mqa", "latent", "compressed")
# What a decode cache stores: the model's dtype, or FlashMLA's "FP8 with scale" layout.
CACHE_DTYPES = ("model", "fp8")


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


@dataclass(frozen=True, slots=True)
class Sparse:
    """DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): a lightning indexer scores every
    visible key of a query, and attention reads only the query's top_k keys."""

    index_heads: int  # H_I: the indexer's query heads (one key per token, shared by all of them)
    index_head_dim: int  # d_I; RoPE rotates its first qk_rope_head_dim dims
    top_k: int
    index_rope_layout: str = "half"  # DeepSeek-V3.2 rotates halves, GLM-5 interleaved pairs


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
    sparse: Sparse | None = None  # DeepSeek Sparse Attention (top-k keys per query)
    cache_dtype: str = "model"  # "fp8": FlashMLA's "FP8 with scale" cache layout

    def fields_dict(self) -> dict[str, Any]:
        # A spec without the optional blocks means what it meant before they existed, so it
        # keeps its hash (and its generated package stays byte-for-byte the same).
        data = SpecBase.fields_dict(self)
        if data["sparse"] is None:
            del data["sparse"]
        if data["cache_dtype"] == "model":
            del data["cache_dtype"]
        return data

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def cache_values_per_token(self) -> int:
        """The compressed cache: the latent plus the one rope key shared by all heads (plus
        the indexer's key when sparse)."""
        index = self.sparse.index_head_dim if self.sparse else 0
        return self.kv_lora_rank + self.qk_rope_head_dim + index

    def latent_cache_bytes(self) -> int:
        if self.cache_dtype == "fp8":
            return fp8_layout.latent_row_bytes(self.kv_lora_rank, self.qk_rope_head_dim)
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.dtype_bytes

    def index_cache_bytes(self) -> int:
        if self.sparse is None:
            return 0
        if self.cache_dtype == "fp8":
            return fp8_layout.index_row_bytes(self.sparse.index_head_dim)
        return self.sparse.index_head_dim * self.dtype_bytes

    def cache_bytes_per_token(self) -> int:
        return self.latent_cache_bytes() + self.index_cache_bytes()

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


@dataclass(frozen=True, slots=True)
class EntryIndexer:
    """CSA's lightning indexer: its own compressor makes one `head_dim`-wide key per
    compressed entry, `heads` query heads score them (sum_h w_h * ReLU(q_h . k)), and each
    query attends to its `top_k` best visible entries."""

    heads: int
    head_dim: int
    top_k: int


@dataclass(frozen=True, slots=True)
class Compression:
    """Every `rate` tokens become one learned KV entry: a softmax-gated sum of the window's
    projected rows, RMSNorm, RoPE at the window's first position. `overlap` (CSA): each token
    projects two series and entry w pools the previous window's first series with this
    window's second (2 * rate slots). `indexer`: attend to the top-k entries (CSA), else to
    every visible one (HCA)."""

    rate: int
    overlap: bool
    indexer: EntryIndexer | None

    @property
    def series(self) -> int:
        """Projected series per token: 2 with overlap, else 1."""
        return 2 if self.overlap else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressedSpec(SpecBase):
    """Sequence-compressed attention (DeepSeek-V4): one shared KV head with K = V, queries
    through q_a/q_b with a per-head unweighted RMSNorm, keys = the last `window` raw tokens
    plus compressed entries (none for sliding layers), a learned sink logit per head in the
    softmax, inverse RoPE on the output, a grouped low-rank output projection."""

    head_dim: int
    rope_head_dim: int  # RoPE rotates the last rope_head_dim dims (interleaved pairs, in place)
    rope: Rope
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    sinks: bool
    compression: Compression | None
    norm_eps: float
    page_size: int  # compressed entries per page of the decode cache

    @property
    def layer_type(self) -> str:
        """transformers' DeepseekV4 name for this layer's kind."""
        if self.compression is None:
            return "sliding_attention"
        if self.compression.indexer is not None:
            return "compressed_sparse_attention"
        return "heavily_compressed_attention"

    def cache_values_per_token(self) -> float:
        """Decode state that grows with the sequence, amortised per token: one head_dim entry
        per `rate` tokens, plus the indexer's key per entry (the window's rows and the
        unfinished window are a fixed cost whatever the length: fixed_cache_values)."""
        if self.compression is None:
            return 0.0
        index = self.compression.indexer.head_dim if self.compression.indexer else 0
        return (self.head_dim + index) / self.compression.rate

    def fixed_cache_values(self) -> int:
        """Values held whatever the length: the ring of the last `window` rows, and the raw
        projections of the unfinished window (and the overlap window) as kv + gate pairs."""
        values = self.window * self.head_dim
        compression = self.compression
        if compression is not None:
            slots = compression.rate * compression.series  # tokens whose projections are pending
            widths = self.head_dim + (compression.indexer.head_dim if compression.indexer else 0)
            values += slots * 2 * compression.series * widths
        return values

    def mha_cache_values_per_token(self) -> int:
        return 2 * self.heads * self.head_dim


Spec = MlaSpec | GqaSpec | LatentSpec | CompressedSpec
