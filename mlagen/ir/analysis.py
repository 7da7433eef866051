"""Facts about a graph and its spec that the CLI reports: parameters and cache bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mlagen import fp8_layout
from mlagen.ir.ops import Graph, OpKind
from mlagen.spec import CompressedSpec, LatentSpec, MlaSpec, Spec


def parameter_count(graph: Graph) -> int:
    total = 0
    absorbed: set[str] = set()  # up-projections read per head (HEAD_MATMUL): each weight once
    for node in graph.nodes:
        if node.op is OpKind.HEAD_MATMUL and node.attr("param") not in absorbed:
            absorbed.add(node.attr("param"))
            latent = node.attr("in_features") if node.attr("transpose") else node.attr("out_features")
            total += node.attr("heads") * node.attr("rows_per_head") * latent
        elif node.op is OpKind.LAYER_NORM:  # weight and bias
            total += 2 * node.attr("dim")
        elif node.op is OpKind.LINEAR:
            total += node.attr("in_features") * node.attr("out_features")
            total += node.attr("out_features") if node.attr("bias") else 0
        elif node.op is OpKind.RMS_NORM and node.attr("param") is not None:  # None: unweighted
            total += node.attr("dim")
        elif node.op is OpKind.GROUPED_LINEAR:
            total += node.attr("groups") * node.attr("in_features") * node.attr("out_features")
        elif node.op is OpKind.COMPRESS:  # the position bias of every slot, and the entries' norm
            series = 2 if node.attr("overlap") else 1
            total += node.attr("rate") * series * node.attr("dim") + node.attr("dim")
        elif node.op is OpKind.PARAM:
            total += math.prod(int(d) for d in node.shape)
        elif node.op is OpKind.GATE:
            total += node.attr("heads")
    return total


@dataclass(frozen=True, slots=True)
class CacheReport:
    values_per_token: float
    bytes_per_token: float
    mha_values_per_token: int
    mha_bytes_per_token: int
    note: str
    storage: str = ""  # what the bytes are: the spec's dtype, or "fp8 rows"

    @property
    def ratio(self) -> float:
        return self.mha_bytes_per_token / self.bytes_per_token if self.bytes_per_token else math.inf


def cache_report(spec: Spec) -> CacheReport:
    """KV-cache size per token per layer, beside the MHA equivalent of the same model
    (every query head caching its own K and V at the spec's head dims)."""
    values = spec.cache_values_per_token()
    mha = spec.mha_cache_values_per_token()
    note = {
        "mla": "latent + shared rope key",
        "mha": "K and V per head",
        "gqa": "K and V per kv head",
        "mqa": "one K and V head",
    }.get(spec.family, "")
    if isinstance(spec, LatentSpec):
        if not spec.causal:
            note = "non-causal: no decode cache (the layer re-reads the whole sequence)"
        else:
            note = f"K/V of {spec.latent_tokens} latents per {spec.chunk_size}-token chunk, amortised"
            if spec.hybrid:
                fixed = spec.window * 2 * spec.heads * spec.head_dim
                note += f"; plus a fixed {fixed:,}-value window cache whatever the length"
    if isinstance(spec, CompressedSpec):
        note = _compressed_note(spec)
    if isinstance(spec, MlaSpec) and (spec.sparse is not None or spec.cache_dtype != "model"):
        storage = "fp8 rows" if spec.cache_dtype == "fp8" else spec.dtype
        return CacheReport(
            values, spec.cache_bytes_per_token(), mha, mha * spec.dtype_bytes, _sparse_note(spec), storage
        )
    return CacheReport(values, values * spec.dtype_bytes, mha, mha * spec.dtype_bytes, note, spec.dtype)


def _sparse_note(spec: MlaSpec) -> str:
    """What a sparse MLA token costs: the latent row and the indexer key, in either cache dtype."""
    assert spec.sparse is not None
    r, dr, index = spec.kv_lora_rank, spec.qk_rope_head_dim, spec.sparse.index_head_dim
    if spec.cache_dtype == "fp8":
        groups = fp8_layout.scale_groups(r)
        return (
            f"latent: {r} e4m3 + {groups} fp32 scale{'s' * (groups > 1)} + {dr} bf16 rope = "
            f"{spec.latent_cache_bytes()} B, indexer key: {index} e4m3 + fp32 scale = {spec.index_cache_bytes()} B"
        )
    fp8 = replace(spec, cache_dtype="fp8")  # the same layer with FP8 rows, for comparison
    return (
        f"latent {r} + shared rope key {dr} = {spec.latent_cache_bytes()} B, indexer key {index} = "
        f"{spec.index_cache_bytes()} B; cache_dtype fp8: {fp8.latent_cache_bytes()} + {fp8.index_cache_bytes()} = "
        f"{fp8.cache_bytes_per_token()} B"
    )


def _compressed_note(spec: CompressedSpec) -> str:
    fixed = f"a fixed {spec.fixed_cache_values():,} values per sequence (the last {spec.window} K = V rows"
    compression = spec.compression
    if compression is None:
        return f"sliding window only: nothing grows with the sequence; {fixed})"
    index = compression.indexer
    key = f" and its {index.head_dim}-value index key" if index else ""
    return (
        f"one {spec.head_dim}-value entry{key} per {compression.rate} tokens; plus {fixed} and the "
        "unfinished window's projections)"
    )
