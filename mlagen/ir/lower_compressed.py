"""CompressedSpec -> Graph: DeepSeek-V4's attention layer (DESIGN.md section 6) written the
way transformers' DeepseekV4Attention computes it.

The keys are the raw tokens' K = V rows with the compressed entries appended along the
sequence, and a key mask says which of them each query sees (transformers' sliding mask
with its compressor's `block_bias` concatenated); the sinks join the softmax; the output's
rope dims are rotated back. Passes then turn this into one attention over the raw keys and
the entries, the mask folded into the attention's attributes and the inverse RoPE into its
epilogue (passes/attend_compressed_entries.py, passes/fuse_output_rope.py).
"""

from __future__ import annotations

from dataclasses import astuple

from mlagen.ir.lower import _Builder
from mlagen.ir.ops import B, Graph, OpKind, S
from mlagen.spec import CompressedSpec


def _rope_tail(
    g: _Builder, name: str, x: str, pos: str, spec: CompressedSpec, *, inverse: bool = False
) -> str:
    """RoPE on the last rope_head_dim dims of x, interleaved pairs rotated in place
    (`inverse`: by minus the angle)."""
    rope = spec.rope
    return g.add(
        name,
        OpKind.ROPE,
        (x, pos),
        "rope_head_dim",
        dim=spec.rope_head_dim,
        theta=rope.theta,
        layout=rope.layout,
        yarn=_yarn(spec),
        tail=True,
        inverse=inverse,
    )


def _compressor(
    g: _Builder, spec: CompressedSpec, x: str, prefix: str, dim: int, name: str, field: str
) -> str:
    """The entries [B, W, 1, dim] of the closed windows: the compressor's own projections of
    every token (two series with overlap), pooled, normalised and rotated."""
    compression = spec.compression
    assert compression is not None
    width = compression.series * dim
    param = prefix.replace("_", ".")
    kv = g.linear(f"{prefix}_kv", x, f"{param}.kv_proj", spec.d_model, width, field)
    gate = g.linear(f"{prefix}_gate", x, f"{param}.gate_proj", spec.d_model, width, field)
    rope = spec.rope
    return g.add(
        name,
        OpKind.COMPRESS,
        (kv, gate),
        "compression.rate",
        rate=compression.rate,
        overlap=compression.overlap,
        dim=dim,
        bias=f"{param}.position_bias",
        norm=f"{param}.kv_norm",
        eps=spec.norm_eps,
        rope_dim=spec.rope_head_dim,
        theta=rope.theta,
        yarn=_yarn(spec),
    )


def _yarn(spec: CompressedSpec) -> tuple | None:
    """(factor, original_max_position, beta_fast, beta_slow, mscale, mscale_all_dim) as the other
    families write it; the compressed family never scales cos/sin, so only the frequencies count."""
    return None if spec.rope.scaling is None else astuple(spec.rope.scaling)


def lower_compressed(spec: CompressedSpec) -> Graph:
    g = _Builder(spec)
    H, D, d, rq = spec.heads, spec.head_dim, spec.d_model, spec.q_lora_rank
    eps = spec.norm_eps
    x = g.input("hidden_states", (B, S, d))
    pos = g.input("position_ids", (B, S), integer=True)

    # Queries: c_q = RMSNorm(q_a_proj(x)), q = q_b_proj(c_q) per head, unweighted RMSNorm, RoPE.
    c_q = g.linear("q_a", x, "q_a_proj", d, rq, "q_lora_rank")
    c_q = g.add("c_q", OpKind.RMS_NORM, (c_q,), "q_lora_rank", param="q_a_norm", dim=rq, eps=eps)
    q = g.linear("q", c_q, "q_b_proj", rq, H * D, "heads, head_dim")
    q = g.add("q_heads", OpKind.SPLIT_HEADS, (q,), "heads", heads=H, head_dim=D)
    q = g.add("q_normed", OpKind.RMS_NORM, (q,), "head_dim", param=None, dim=D, eps=eps)
    query = _rope_tail(g, "query", q, pos, spec)

    # One shared K = V head: RMSNorm(kv_proj(x)), RoPE.
    kv = g.linear("kv", x, "kv_proj", d, D, "head_dim")
    kv = g.add("kv_normed", OpKind.RMS_NORM, (kv,), "head_dim", param="kv_norm", dim=D, eps=eps)
    kv = g.add("kv_head", OpKind.SPLIT_HEADS, (kv,), "head_dim", heads=1, head_dim=D)
    key = _rope_tail(g, "key", kv, pos, spec)

    keys, mask_inputs, rate = key, (pos,), 0
    compression = spec.compression
    if compression is not None:
        rate = compression.rate
        entries = _compressor(g, spec, x, "compressor", D, "entries", "head_dim")
        indexer = compression.indexer
        if indexer is not None:
            hi, di = indexer.heads, indexer.head_dim
            field = "compression.indexer.head_dim"
            index_keys = _compressor(g, spec, x, "compressor_indexer", di, "index_keys", field)
            index_q = g.linear(
                "index_q", c_q, "compressor.indexer.q_b_proj", rq, hi * di, "compression.indexer.heads"
            )
            index_q = g.add(
                "index_q_heads",
                OpKind.SPLIT_HEADS,
                (index_q,),
                "compression.indexer.heads",
                heads=hi,
                head_dim=di,
            )
            index_q = _rope_tail(g, "index_query", index_q, pos, spec)
            weights = g.linear(
                "index_weights",
                x,
                "compressor.indexer.scorer.weights_proj",
                d,
                hi,
                "compression.indexer.heads",
            )
            scores = g.add(
                "index_scores",
                OpKind.INDEX_SCORES,
                (index_q, index_keys, weights),
                "compression.indexer.heads",
                scale=di**-0.5,
                weight_scale=hi**-0.5,
                rate=rate,
            )
            selected = g.add(
                "selected", OpKind.TOP_K, (scores,), "compression.indexer.top_k", k=indexer.top_k
            )
            mask_inputs = (pos, selected)
        keys = g.add("keys", OpKind.CONCAT, (key, entries), "compression.rate", axis=1)
    mask = g.add("mask", OpKind.KEY_MASK, mask_inputs, "window", window=spec.window, rate=rate)
    operands = (query, keys, keys, mask)
    if spec.sinks:
        operands += (g.param("sinks", (H,), "sinks"),)
    o = g.add(
        "attn",
        OpKind.ATTENTION,
        operands,
        "heads, head_dim",
        scale=D**-0.5,
        causal=False,  # the key mask says what each query sees
        window=None,
        group_mask=None,
        masked=True,
        sinks=spec.sinks,
    )
    # K = V carries the keys' RoPE into the output: rotate it back at the query's position.
    o = _rope_tail(g, "attn_unrotated", o, pos, spec, inverse=True)

    # Grouped low-rank output projection: o_a_proj per group of heads, then o_b_proj.
    G, r_o = spec.o_groups, spec.o_lora_rank
    o = g.add("attn_merged", OpKind.MERGE_HEADS, (o,), "heads, head_dim")
    o = g.add("attn_groups", OpKind.SPLIT_HEADS, (o,), "o_groups", heads=G, head_dim=H * D // G)
    o = g.add(
        "o_a",
        OpKind.GROUPED_LINEAR,
        (o,),
        "o_groups, o_lora_rank",
        param="o_a_proj",
        groups=G,
        in_features=H * D // G,
        out_features=r_o,
    )
    o = g.add("o_a_merged", OpKind.MERGE_HEADS, (o,), "o_groups, o_lora_rank")
    out = g.linear("out", o, "o_b_proj", G * r_o, d, "d_model")
    return g.graph((g.add("output", OpKind.OUTPUT, (out,), "d_model"),))
