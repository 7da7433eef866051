"""Facts about a graph and its spec that the CLI reports: parameters and cache bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlagen.ir.ops import Graph, OpKind
from mlagen.spec import LatentSpec, Spec


def parameter_count(graph: Graph) -> int:
    total = 0
    for node in graph.nodes:
        if node.op is OpKind.LINEAR:
            total += node.attr("in_features") * node.attr("out_features")
            total += node.attr("out_features") if node.attr("bias") else 0
        elif node.op is OpKind.RMS_NORM:
            total += node.attr("dim")
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
    return CacheReport(values, values * spec.dtype_bytes, mha, mha * spec.dtype_bytes, note)
