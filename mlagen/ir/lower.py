"""Spec -> Graph: the math of DESIGN.md written as ops, literally.

The lowering states the computation the way the papers and transformers do
(MLA's K is concat(k_nope, k_pe expanded over heads)); passes then rewrite it
into the form the kernels want. Shapes come from ir.shapes, never by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple
from typing import Any

import sympy

from mlagen.errors import ShapeError
from mlagen.ir.ops import B, Graph, Node, OpKind, S
from mlagen.ir.shapes import RuleViolation, infer
from mlagen.spec import CompressedSpec, GqaSpec, LatentSpec, MlaSpec, Spec
from mlagen.spec.schema import Rope, Sparse, softmax_scale

# transformers' DeepseekV32Indexer and DeepSeek's reference build the key norm as LayerNorm(eps=1e-6).
INDEX_KEY_NORM_EPS = 1e-6

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _Builder:
    def __init__(self, spec: Spec, mode: str = "prefill"):
        self.spec = spec
        self.mode = mode
        self.nodes: list[Node] = []
        self.dtype = DTYPE_NAMES[spec.dtype]

    def input(self, name: str, shape: tuple[Any, ...], integer: bool = False) -> str:
        dtype = "int64" if integer else self.dtype
        self.nodes.append(
            Node(name, OpKind.INPUT, (), tuple(sympy.sympify(d) for d in shape), dtype, field="d_model")
        )
        return name

    def param(self, name: str, shape: tuple[int, ...], field: str) -> str:
        self.nodes.append(
            Node(
                name,
                OpKind.PARAM,
                (),
                tuple(sympy.Integer(d) for d in shape),
                self.dtype,
                attrs=(("param", name),),
                field=field,
            )
        )
        return name

    def add(self, name: str, op: OpKind, inputs: tuple[str, ...], field: str, **attrs: Any) -> str:
        by_name = {node.name: node for node in self.nodes}
        try:
            shape, dtype = infer(op, attrs, tuple(by_name[i] for i in inputs))
        except RuleViolation as exc:
            location = self.spec.where(field.split(",")[0].strip())
            raise ShapeError(f"{location}: {field}: node {name!r} ({op.value}): {exc}") from None
        self.nodes.append(Node(name, op, inputs, shape, dtype, tuple(sorted(attrs.items())), field))
        return name

    def linear(
        self,
        name: str,
        x: str,
        param: str,
        in_features: int,
        out_features: int,
        field: str,
        bias: bool = False,
        dtype: str | None = None,
    ) -> str:
        """x @ W^T (+ b); `dtype` keeps a projection in its own dtype (input cast to it)."""
        return self.add(
            name,
            OpKind.LINEAR,
            (x,),
            field,
            param=param,
            in_features=in_features,
            out_features=out_features,
            bias=bias,
            **({"dtype": dtype} if dtype else {}),
        )

    def rope(
        self, name: str, x: str, positions: str, rope: Rope, dim: int, field: str, layout: str | None = None
    ) -> str:
        scaling = rope.scaling
        yarn = (
            None if scaling is None else astuple(scaling)
        )  # (factor, original_max_position, betas, mscales)
        return self.add(
            name,
            OpKind.ROPE,
            (x, positions),
            field,
            dim=dim,
            theta=rope.theta,
            layout=layout or rope.layout,
            yarn=yarn,
        )

    def graph(self, outputs: tuple[str, ...]) -> Graph:
        locations = tuple((name, self.spec.where(name)) for name, _ in self.spec.field_lines)
        return Graph(self.spec.name, self.mode, tuple(self.nodes), outputs, locations)


def _mla_query(g: _Builder, spec: MlaSpec, x: str, pos: str) -> tuple[str, str]:
    """q_nope [B, S, H, dn] and the rotated q_pe [B, S, H, dr]."""
    H, dn, dr = spec.heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim
    dqk = dn + dr
    if spec.q_lora_rank is None:
        q = g.linear("q", x, "q_proj", spec.d_model, H * dqk, "heads, qk_nope_head_dim, qk_rope_head_dim")
    else:
        rq = spec.q_lora_rank
        c_q = g.linear("q_a", x, "q_a_proj", spec.d_model, rq, "q_lora_rank", bias=spec.attention_bias)
        c_q = g.add(
            "c_q", OpKind.RMS_NORM, (c_q,), "q_lora_rank", param="q_a_layernorm", dim=rq, eps=spec.norm_eps
        )
        q = g.linear("q", c_q, "q_b_proj", rq, H * dqk, "heads, qk_nope_head_dim, qk_rope_head_dim")
    q = g.add("q_heads", OpKind.SPLIT_HEADS, (q,), "heads", heads=H, head_dim=dqk)
    q_nope = g.add("q_nope", OpKind.SLICE, (q,), "qk_nope_head_dim", start=0, stop=dn)
    q_pe = g.add("q_pe", OpKind.SLICE, (q,), "qk_rope_head_dim", start=dn, stop=dqk)
    return q_nope, g.rope("q_pe_rot", q_pe, pos, spec.rope, dr, "qk_rope_head_dim")


def _mla_inputs(g: _Builder, spec: MlaSpec) -> tuple[str, str, str, str]:
    """The forward() inputs, the query parts and kv_a = [latent | rope key] of the new tokens."""
    x = g.input("hidden_states", (B, S, spec.d_model))
    pos = g.input("position_ids", (B, S), integer=True)
    q_nope, q_pe = _mla_query(g, spec, x, pos)
    kv_a = g.linear(
        "kv_a",
        x,
        "kv_a_proj_with_mqa",
        spec.d_model,
        spec.kv_lora_rank + spec.qk_rope_head_dim,
        "kv_lora_rank, qk_rope_head_dim",
        bias=spec.attention_bias,
    )
    return pos, q_nope, q_pe, kv_a


def _rotate_leading(g: _Builder, spec: MlaSpec, prefix: str, x: str, pos: str, sparse: Sparse) -> str:
    """RoPE on the first qk_rope_head_dim dims of the indexer's vectors, the rest passed
    through (transformers' split, rotate, cat), in the indexer's own layout."""
    dr, dim = spec.qk_rope_head_dim, sparse.index_head_dim
    field = "sparse.index_head_dim"
    part = g.add(f"{prefix}_rope", OpKind.SLICE, (x,), field, start=0, stop=dr)
    part = g.rope(
        f"{prefix}_rot", part, pos, spec.rope, dr, "qk_rope_head_dim", layout=sparse.index_rope_layout
    )
    if dim == dr:
        return part
    rest = g.add(f"{prefix}_pass", OpKind.SLICE, (x,), field, start=dr, stop=dim)
    return g.add(prefix, OpKind.CONCAT, (part, rest), field)


def _index_key(g: _Builder, spec: MlaSpec, x: str, pos: str) -> str:
    """The indexer key of each token, [B, S, 1, d_I]: LayerNorm(wk(x)), rotated."""
    assert spec.sparse is not None
    dim = spec.sparse.index_head_dim
    key = g.linear("index_k", x, "indexer.wk", spec.d_model, dim, "sparse.index_head_dim")
    key = g.add(
        "index_k_normed",
        OpKind.LAYER_NORM,
        (key,),
        "sparse.index_head_dim",
        param="indexer.k_norm",
        dim=dim,
        eps=INDEX_KEY_NORM_EPS,
    )
    key = g.add(
        "index_k_one_head", OpKind.SPLIT_HEADS, (key,), "sparse.index_head_dim", heads=1, head_dim=dim
    )
    return _rotate_leading(g, spec, "index_key", key, pos, spec.sparse)


def _select_keys(g: _Builder, spec: MlaSpec, x: str, pos: str, keys: Callable[[], str]) -> str:
    """The lightning indexer (DESIGN.md section 5) and the top-k selection: per query, the
    positions of the top_k keys of I[s, t] = sum_h w[s, h] ReLU(q_I[s, h] . k_I[t]) d_I**-0.5.
    `keys()` lowers the keys scored (the new tokens', or the cache's); it runs between the
    query and the head weights, so parameters register in transformers' order."""
    sparse = spec.sparse
    assert sparse is not None and spec.q_lora_rank is not None
    heads, dim = sparse.index_heads, sparse.index_head_dim
    query = g.linear("index_q", "c_q", "indexer.wq_b", spec.q_lora_rank, heads * dim, "sparse.index_heads")
    query = g.add(
        "index_q_heads", OpKind.SPLIT_HEADS, (query,), "sparse.index_heads", heads=heads, head_dim=dim
    )
    query = _rotate_leading(g, spec, "index_query", query, pos, sparse)
    index_key = keys()
    # transformers keeps weights_proj in fp32 (`_keep_in_fp32_modules`), as DeepSeek's reference does.
    weights = g.linear(
        "index_weights", x, "indexer.weights_proj", spec.d_model, heads, "sparse.index_heads", dtype="float32"
    )
    scores = g.add(
        "index_scores",
        OpKind.INDEX_SCORES,
        (query, index_key, weights),
        "sparse.index_heads",
        scale=dim**-0.5,
        weight_scale=heads**-0.5,
    )
    return g.add("selected", OpKind.TOP_K, (scores,), "sparse.top_k", k=sparse.top_k)


def _mla_attention(
    g: _Builder, spec: MlaSpec, q_nope: str, q_pe: str, c_kv: str, k_pe: str, selected: str | None = None
) -> str:
    """Expand the latent per head (kv_b_proj), attend, project out: the form transformers
    writes, with K = concat(k_nope, k_pe expanded over heads). Sparse attention (`selected`)
    is the same attention with an index operand."""
    H, dn, dr, dv, r = (
        spec.heads,
        spec.qk_nope_head_dim,
        spec.qk_rope_head_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
    )
    kv = g.linear("kv", c_kv, "kv_b_proj", r, H * (dn + dv), "heads, qk_nope_head_dim, v_head_dim")
    kv = g.add("kv_heads", OpKind.SPLIT_HEADS, (kv,), "heads", heads=H, head_dim=dn + dv)
    k_nope = g.add("k_nope", OpKind.SLICE, (kv,), "qk_nope_head_dim", start=0, stop=dn)
    v = g.add("v", OpKind.SLICE, (kv,), "v_head_dim", start=dn, stop=dn + dv)
    query = g.add("query", OpKind.CONCAT, (q_nope, q_pe), "qk_nope_head_dim, qk_rope_head_dim")
    k_pe_all = g.add("k_pe_all_heads", OpKind.EXPAND_HEADS, (k_pe,), "heads", heads=H)
    key = g.add("key", OpKind.CONCAT, (k_nope, k_pe_all), "qk_nope_head_dim, qk_rope_head_dim")
    indexed = {"indexed": True} if selected is not None else {}
    o = g.add(
        "attn",
        OpKind.ATTENTION,
        (query, key, v) + ((selected,) if selected is not None else ()),
        "heads, v_head_dim",
        scale=softmax_scale(dn + dr, spec.rope),
        causal=spec.causal,
        window=None,
        group_mask=None,
        **indexed,
    )
    o = g.add("attn_merged", OpKind.MERGE_HEADS, (o,), "heads, v_head_dim")
    out = g.linear("out", o, "o_proj", H * dv, spec.d_model, "d_model", bias=spec.attention_bias)
    return g.add("output", OpKind.OUTPUT, (out,), "d_model")


def _lower_mla(spec: MlaSpec) -> Graph:
    g = _Builder(spec)
    dr, r = spec.qk_rope_head_dim, spec.kv_lora_rank
    pos, q_nope, q_pe, kv_a = _mla_inputs(g, spec)
    c_kv = g.add("c_kv_raw", OpKind.SLICE, (kv_a,), "kv_lora_rank", start=0, stop=r)
    c_kv = g.add(
        "c_kv", OpKind.RMS_NORM, (c_kv,), "kv_lora_rank", param="kv_a_layernorm", dim=r, eps=spec.norm_eps
    )
    k_pe = g.add("k_pe_raw", OpKind.SLICE, (kv_a,), "qk_rope_head_dim", start=r, stop=r + dr)
    k_pe = g.add("k_pe_one_head", OpKind.SPLIT_HEADS, (k_pe,), "qk_rope_head_dim", heads=1, head_dim=dr)
    k_pe = g.rope("k_pe", k_pe, pos, spec.rope, dr, "qk_rope_head_dim")
    selected = None
    if spec.sparse is not None:
        x = g.nodes[0].name
        selected = _select_keys(g, spec, x, pos, lambda: _index_key(g, spec, x, pos))
    return g.graph((_mla_attention(g, spec, q_nope, q_pe, c_kv, k_pe, selected),))


def _lower_mla_decode(spec: MlaSpec) -> Graph:
    """S new tokens against a paged cache of T tokens (the new ones included). The new
    tokens' latent is normalised, roped and written to the cache; attention reads the
    whole cached sequence. Written in the expanded form; the absorb pass rewrites it."""
    g = _Builder(spec, mode="decode")
    dr, r = spec.qk_rope_head_dim, spec.kv_lora_rank
    pos, q_nope, q_pe, kv_a = _mla_inputs(g, spec)
    # The cache rows take the same RoPE as the prefill's k_pe (cos/sin of the module's rotary table).
    cached = g.add(
        "cached",
        OpKind.CACHE_APPEND,
        (kv_a, pos),
        "kv_lora_rank, qk_rope_head_dim",
        width=r + dr,
        latent=r,
        norm="kv_a_layernorm",
        eps=spec.norm_eps,
        layout=spec.rope.layout,
    )
    c_kv = g.add("c_kv", OpKind.SLICE, (cached,), "kv_lora_rank", start=0, stop=r)
    k_pe = g.add("k_pe_cached", OpKind.SLICE, (cached,), "qk_rope_head_dim", start=r, stop=r + dr)
    k_pe = g.add("k_pe", OpKind.SPLIT_HEADS, (k_pe,), "qk_rope_head_dim", heads=1, head_dim=dr)
    selected = None
    if spec.sparse is not None:
        # The new tokens' indexer keys go into the cache beside their latent rows; the
        # indexer then scores each new token against every cached key.
        x = g.nodes[0].name

        def cached_keys() -> str:
            return g.add(
                "index_cached",
                OpKind.CACHE_WRITE,
                (_index_key(g, spec, x, pos), cached),
                "sparse.index_head_dim",
                width=spec.sparse.index_head_dim,
                buffer="index_keys",
            )

        selected = _select_keys(g, spec, x, pos, cached_keys)
    return g.graph((_mla_attention(g, spec, q_nope, q_pe, c_kv, k_pe, selected),))


def _lower_gqa(spec: GqaSpec) -> Graph:
    g = _Builder(spec)
    H, Hk, D = spec.heads, spec.kv_heads, spec.head_dim
    x = g.input("hidden_states", (B, S, spec.d_model))
    pos = g.input("position_ids", (B, S), integer=True)
    bias = spec.attention_bias
    q = g.linear("q", x, "q_proj", spec.d_model, H * D, "heads, head_dim", bias=bias)
    k = g.linear("k", x, "k_proj", spec.d_model, Hk * D, "kv_heads, head_dim", bias=bias)
    v = g.linear("v", x, "v_proj", spec.d_model, Hk * D, "kv_heads, head_dim", bias=bias)
    q = g.add("q_heads", OpKind.SPLIT_HEADS, (q,), "heads", heads=H, head_dim=D)
    k = g.add("k_heads", OpKind.SPLIT_HEADS, (k,), "kv_heads", heads=Hk, head_dim=D)
    v = g.add("v_heads", OpKind.SPLIT_HEADS, (v,), "kv_heads", heads=Hk, head_dim=D)
    q = g.rope("q_rot", q, pos, spec.rope, D, "head_dim")
    k = g.rope("k_rot", k, pos, spec.rope, D, "head_dim")
    o = g.add(
        "attn",
        OpKind.ATTENTION,
        (q, k, v),
        "kv_heads",
        scale=softmax_scale(D, None),
        causal=spec.causal,
        window=spec.window,
        group_mask=None,
    )
    o = g.add("attn_merged", OpKind.MERGE_HEADS, (o,), "heads, head_dim")
    out = g.linear("out", o, "o_proj", H * D, spec.d_model, "d_model", bias=bias)
    return g.graph((g.add("output", OpKind.OUTPUT, (out,), "d_model"),))


def _latent_attention(
    g: _Builder,
    prefix: str,
    queries: str,
    keys: str,
    spec: LatentSpec,
    *,
    causal: bool = False,
    window: int | None = None,
    group_mask: tuple[str, int, int] | None = None,
    rope_positions: str | None = None,
) -> str:
    """One attention block with its own q/k/v/o projections (Perceiver style)."""
    H, D, d = spec.heads, spec.head_dim, spec.d_model
    q = g.linear(f"{prefix}_q", queries, f"{prefix}.q_proj", d, H * D, "heads, head_dim")
    k = g.linear(f"{prefix}_k", keys, f"{prefix}.k_proj", d, H * D, "heads, head_dim")
    v = g.linear(f"{prefix}_v", keys, f"{prefix}.v_proj", d, H * D, "heads, head_dim")
    q = g.add(f"{prefix}_q_heads", OpKind.SPLIT_HEADS, (q,), "heads", heads=H, head_dim=D)
    k = g.add(f"{prefix}_k_heads", OpKind.SPLIT_HEADS, (k,), "heads", heads=H, head_dim=D)
    v = g.add(f"{prefix}_v_heads", OpKind.SPLIT_HEADS, (v,), "heads", heads=H, head_dim=D)
    if rope_positions is not None:
        assert spec.rope is not None
        q = g.rope(f"{prefix}_q_rot", q, rope_positions, spec.rope, D, "head_dim")
        k = g.rope(f"{prefix}_k_rot", k, rope_positions, spec.rope, D, "head_dim")
    o = g.add(
        f"{prefix}_attn",
        OpKind.ATTENTION,
        (q, k, v),
        "heads, head_dim",
        scale=softmax_scale(D, None),
        causal=causal,
        window=window,
        group_mask=group_mask,
    )
    return o


def _lower_latent(spec: LatentSpec) -> Graph:
    """DESIGN.md section 2. Causal specs keep one latent summary per chunk of `chunk_size`
    tokens; a token reads only the summaries of chunks that ended before its own."""
    g = _Builder(spec)
    H, D, M, d = spec.heads, spec.head_dim, spec.latent_tokens, spec.d_model
    x = g.input("hidden_states", (B, S, d))
    pos = g.input("position_ids", (B, S), integer=True)
    chunk = spec.chunk_size
    chunks = sympy.ceiling(S / chunk) if chunk else sympy.Integer(1)
    latents = g.param("latents", (M, d), "latent_tokens")
    lat = g.add("latents_per_chunk", OpKind.REPEAT_CHUNKS, (latents, x), "latent_tokens", chunks=chunks)

    # encode: each chunk's latents read that chunk's tokens (all tokens when non-causal).
    enc = _latent_attention(g, "encode", lat, x, spec, group_mask=("same", M, chunk) if chunk else None)
    enc = g.add("encode_merged", OpKind.MERGE_HEADS, (enc,), "heads, head_dim")
    enc = g.linear("encode_out", enc, "encode.o_proj", H * D, d, "d_model")
    lat = g.add("latents_encoded", OpKind.ADD, (lat, enc), "d_model")
    if spec.self_attention:
        proc = _latent_attention(g, "process", lat, lat, spec, group_mask=("same", M, M) if chunk else None)
        proc = g.add("process_merged", OpKind.MERGE_HEADS, (proc,), "heads, head_dim")
        proc = g.linear("process_out", proc, "process.o_proj", H * D, d, "d_model")
        lat = g.add("latents_processed", OpKind.ADD, (lat, proc), "d_model")

    # decode: tokens read the latents (of strictly earlier chunks when causal).
    o = _latent_attention(g, "decode", x, lat, spec, group_mask=("earlier", chunk, M) if chunk else None)
    if spec.hybrid:
        o = g.add("decode_gated", OpKind.GATE, (o,), "heads", param="global_gate", heads=H)
        local = _latent_attention(
            g, "local", x, x, spec, causal=True, window=spec.window, rope_positions=pos if spec.rope else None
        )
        o = g.add("mixed", OpKind.ADD, (local, o), "heads, head_dim")
    o = g.add("attn_merged", OpKind.MERGE_HEADS, (o,), "heads, head_dim")
    out = g.linear("out", o, "o_proj", H * D, d, "d_model")
    return g.graph((g.add("output", OpKind.OUTPUT, (out,), "d_model"),))


def lower(spec: Spec, mode: str = "prefill") -> Graph:
    """The graph of a spec: hidden_states [B, S, d_model] -> [B, S, d_model].

    mode "prefill": prefill and training, attention within the S tokens.
    mode "decode" (mla): S new tokens against the paged latent cache of T tokens.
    """
    if mode == "decode":
        assert isinstance(spec, MlaSpec), "decode graphs exist for mla specs"
        return _lower_mla_decode(spec)
    if isinstance(spec, MlaSpec):
        return _lower_mla(spec)
    if isinstance(spec, GqaSpec):
        return _lower_gqa(spec)
    if isinstance(spec, CompressedSpec):
        # Imported here: lower_compressed builds on this module's _Builder.
        from mlagen.ir.lower_compressed import lower_compressed

        return lower_compressed(spec)
    assert isinstance(spec, LatentSpec), type(spec)
    return _lower_latent(spec)
