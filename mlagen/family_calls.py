"""Launcher calls of the sparse (DeepSeek Sparse Attention: DeepSeek-V3.2, GLM-5) and compressed
(DeepSeek-V4) kernel families on meta tensors, for mlagen.aot to capture: what `mlagen inspect`
compiles for these specs, and what their arch tests compile, through one path.

    spec --IR--> the layer's kernels and widths (SparseUse, CompressedUse)
      + a Problem (batch, tokens, cached tokens, new tokens)
      --> one picklable call per pass of the layer: "forward" (compressors, indexer, attention),
          "backward" (their backward kernels), "decode" (one step over the paged cache)
      --> the generated launchers themselves, each picking its own config for the arch
          (mlagen.runtime.sparse, mlagen.runtime.compressed_kernels), as a launch on that GPU

The launchers of these families take no config from the tuning cache (only the dense
attention and MLA decode launchers look one up), so `mlagen tune` leaves them to their
defaults; role() names each kernel a pass launches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy
import torch

from mlagen.autotune import DTYPES
from mlagen.ir import lower
from mlagen.ir.ops import B, Node, OpKind, S, T
from mlagen.passes import run_pipeline
from mlagen.spec import CompressedSpec, MlaSpec, Spec

PASSES = ("forward", "backward", "decode")
PREFIXES = ("sparse_mla_", "compressed_attention_")  # the attention kernels of these families


@dataclass(frozen=True, slots=True)
class Problem:
    """The sizes one set of calls launches at: `batch` sequences of `seq_len` tokens (forward,
    backward), and a decode step of `new_tokens` per sequence after `context` cached ones."""

    batch: int
    seq_len: int
    context: int
    new_tokens: int = 1
    decode_batch: int | None = None  # default: batch
    heads: int | None = None  # query heads; default: the spec's
    cache_dtype: str | None = None  # sparse decode cache, "model" or "fp8"; default: the spec's

    @staticmethod
    def of(batch: int, seq_len: int, new_tokens: int = 1) -> Problem:
        """mlagen inspect's shape: prefill seq_len tokens; decode new_tokens over seq_len cached."""
        return Problem(batch, seq_len, max(seq_len - new_tokens, 0), new_tokens)

    @property
    def sequences(self) -> int:
        return self.decode_batch or self.batch


@dataclass(frozen=True, slots=True)
class SparseUse:
    """A sparse MLA attention node and its lightning indexer (DeepSeek-V3.2, GLM-5)."""

    node: str
    attention: str  # kernel names
    indexer: str
    heads: int
    latent: int
    rope: int
    index_heads: int
    index_dim: int
    top_k: int
    scale: float
    index_scale: float
    weight_scale: float
    page_size: int
    cache_dtype: str
    index_node: str

    @property
    def kernels(self) -> tuple[str, ...]:
        return (self.indexer, self.attention)


@dataclass(frozen=True, slots=True)
class Compressor:
    node: str
    kernel: str
    dim: int
    rope_dim: int
    rate: int
    overlap: bool
    width: int  # of the kv and gate projections: dim, or 2 * dim with overlap (two series)


@dataclass(frozen=True, slots=True)
class CompressedUse:
    """A compressed attention node (DeepSeek-V4) with its compressors and indexer."""

    node: str
    attention: str
    heads: int
    dim: int
    rope_dim: int
    window: int
    rate: int  # entries' compression rate; 0 without entries (sliding layers)
    top_k: int  # entries each query selects; 0 without an indexer
    scale: float
    sinks: bool
    page_size: int
    compressors: tuple[Compressor, ...] = ()
    indexer: str | None = None
    index_node: str = ""
    index_heads: int = 0
    index_dim: int = 0
    index_scale: float = 0.0
    weight_scale: float = 0.0

    @property
    def kernels(self) -> tuple[str, ...]:
        return (
            *(c.kernel for c in self.compressors),
            *(self.indexer,) * (self.indexer is not None),
            self.attention,
        )


FamilyUse = SparseUse | CompressedUse


def untuned(spec: Spec) -> str | None:
    """The line `mlagen tune` says about the spec's kernels it leaves to their defaults, if any."""
    names = list(dict.fromkeys(name for use in family_uses(spec) for name in use.kernels))
    if not names:
        return None
    return (
        f"not tuned: {', '.join(names)} and their backward and decode kernels: the sparse and compressed "
        "launchers take no config from the tuning cache, they run their defaults (mlagen/runtime/sparse.py, "
        "compressed_kernels.py), which `mlagen inspect` shows"
    )


def family_uses(spec: Spec) -> list[FamilyUse]:
    """The sparse and compressed attention nodes of the spec's prefill graph, with what they need
    (a layer has one indexer and one selection, if any)."""
    if not isinstance(spec, MlaSpec | CompressedSpec):
        return []
    graph = run_pipeline(lower(spec), "prefill")
    nodes = {node.op: node for node in graph.nodes if node.op in (OpKind.INDEX_SCORES, OpKind.TOP_K)}
    uses: list[FamilyUse] = []
    for node in graph.nodes:
        if node.op is not OpKind.ATTENTION or not node.attr("kernel").startswith(PREFIXES):
            continue
        query = graph.node(node.inputs[0]).shape
        common = dict(
            node=node.name,
            attention=node.attr("kernel"),
            heads=int(query[2]),
            scale=float(node.attr("scale")),
        )
        index = nodes.get(OpKind.INDEX_SCORES)
        indexer = {}
        if index is not None:
            index_query = graph.node(index.inputs[0]).shape
            indexer = dict(
                indexer=index.attr("kernel"),
                index_node=index.name,
                index_heads=int(index_query[2]),
                index_dim=index.attr("d_a"),
                index_scale=float(index.attr("scale")),
                weight_scale=float(index.attr("weight_scale")),
            )
        top_k = _top_k(nodes.get(OpKind.TOP_K))
        if isinstance(spec, MlaSpec):
            uses.append(
                SparseUse(
                    **common,
                    latent=node.attr("d_a"),
                    rope=node.attr("d_b"),
                    top_k=top_k,
                    page_size=spec.page_size,
                    cache_dtype=spec.cache_dtype,
                    **indexer,
                )
            )
            continue
        compressors = tuple(
            Compressor(
                c.name,
                c.attr("kernel"),
                c.attr("dim"),
                c.attr("rope_dim"),
                c.attr("rate"),
                bool(c.attr("overlap")),
                int(graph.node(c.inputs[0]).shape[-1]),
            )
            for c in graph.nodes
            if c.op is OpKind.COMPRESS
        )
        uses.append(
            CompressedUse(
                **common,
                dim=node.attr("d_a"),
                rope_dim=node.attr("d_b"),
                window=node.attr("window"),
                rate=(node.attr("entry_rate") or 0) if node.attr("entries") else 0,
                top_k=top_k,
                sinks=bool(node.attr("sinks")),
                page_size=spec.page_size,
                compressors=compressors,
                **indexer,
            )
        )
    return uses


def _top_k(selection: Node | None) -> int:
    """The selection's length with the sequence far longer than any top-k: the top-k itself."""
    if selection is None:
        return 0
    return int(sympy.sympify(selection.shape[-1]).subs({B: 1, S: 1 << 40, T: 1 << 40}))


def node_of(use: FamilyUse, kernel: str) -> str:
    """The IR node a kernel of the layer computes: a compressor's, the indexer's, else attention's."""
    compressors = getattr(use, "compressors", ())
    names = [c.node for c in compressors if kernel.removesuffix("_bwd") == c.kernel]
    if names:
        return ", ".join(names)
    return use.index_node if "indexer_logits" in kernel else use.node


def role(part: str, kernel: str) -> str:
    """What a kernel launched by one pass does: forward, backward, backward_delta, decode,
    decode_append, decode_combine, indexer, decode_indexer, compressor, compressor_backward,
    decode_compressor."""
    if kernel == "_attention_bwd_delta":
        return "backward_delta"
    for suffix in ("_append", "_combine"):
        if kernel.endswith(suffix):
            return f"decode{suffix}"
    kind = "compressor" if kernel.startswith("compress_") else "indexer" if "indexer_logits" in kernel else ""
    if part == "decode":
        return f"decode_{kind}" if kind else "decode"
    if part == "backward":
        return f"{kind}_backward" if kind else "backward"
    return kind or "forward"


def calls(
    kernels_file: str, use: FamilyUse, problem: Problem, dtype: str, device: str = "meta"
) -> list[tuple[str, Callable[[], None]]]:
    """(pass, picklable call) for each pass of the layer: what mlagen.aot captures. On meta
    tensors nothing is allocated; `device` "cpu" gives real tensors (the test that meta tensors
    specialise as real ones do)."""
    if problem.heads is not None:
        use = replace(use, heads=problem.heads)
    return [
        (part, functools.partial(_launch, str(kernels_file), use, problem, dtype, part, device))
        for part in PASSES
    ]


def _launch(kernels_file: str, use: FamilyUse, problem: Problem, dtype: str, part: str, device: str) -> None:
    from mlagen.aot import load_kernels_module

    kernels = load_kernels_module(kernels_file)
    run = _sparse if isinstance(use, SparseUse) else _compressed
    run(kernels, use, problem, DTYPES[dtype], part, torch.device(device))


def _empty(dtype: torch.dtype, device: torch.device) -> Callable[..., torch.Tensor]:
    def empty(*shape: int, type_: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=type_, device=device)

    return empty


# --- sparse MLA (templates/_sparse_mla.jinja, _indexer.jinja) ------------------------------------------------


def _sparse(
    kernels, use: SparseUse, problem: Problem, dtype: torch.dtype, part: str, device: torch.device
) -> None:
    # The launchers themselves: the kernel table's entries are custom ops, which meta tensors
    # would send to their fake implementations.
    empty = _empty(dtype, device)
    batch, seq, heads = problem.batch, problem.seq_len, use.heads
    attention = use.attention
    if part in ("forward", "backward"):
        q_latent, q_rope = empty(batch, seq, heads, use.latent), empty(batch, seq, heads, use.rope)
        latent, rope_key = empty(batch, seq, 1, use.latent), empty(batch, seq, 1, use.rope)
        index = empty(batch, seq, min(use.top_k, seq), type_=torch.int32)
        if part == "forward":
            getattr(kernels, f"{use.indexer}_launch")(
                empty(batch, seq, use.index_heads, use.index_dim),
                empty(batch, seq, 1, use.index_dim),
                empty(batch, seq, use.index_heads, type_=torch.float32),
                scale=use.index_scale,
                weight_scale=use.weight_scale,
            )
            getattr(kernels, f"{attention}_launch")(
                q_latent, q_rope, latent, rope_key, index, scale=use.scale
            )
        else:
            out, lse = empty(batch, seq, heads, use.latent), empty(batch, heads, seq, type_=torch.float32)
            getattr(kernels, f"{attention}_backward")(
                out, q_latent, q_rope, latent, rope_key, index, out, lse, scale=use.scale
            )
        return
    from mlagen.runtime.mla_decode import CachedTokens
    from mlagen.runtime.sparse_cache import PagedSparseCache

    rows, new = problem.sequences, problem.new_tokens
    cache = PagedSparseCache(
        rows,
        problem.context + new,
        latent_dim=use.latent,
        rope_dim=use.rope,
        index_dim=use.index_dim,
        page_size=use.page_size,
        dtype=dtype,
        device=device,
        cache_dtype=problem.cache_dtype or use.cache_dtype,
    )
    context = [problem.context] * rows
    cache.reserve(context)
    cache.commit(context)
    decode = kernels.SPARSE_DECODE
    if cache.fp8:  # FP8 rows are quantised in torch (runtime.sparse.SparseDecodeOps.append)
        cached = CachedTokens(cache, cache.reserve([new] * rows), (new,) * rows)
        cache.commit([new] * rows)
    else:
        rope = empty(rows, new, use.rope)
        cached = decode.append(
            empty(rows, new, use.latent + use.rope), empty(use.latent), 1e-6, rope, rope, cache, (new,) * rows
        )
    decode.index_scores(
        empty(rows, new, use.index_heads, use.index_dim),
        empty(rows, new, use.index_heads),
        cached,
        scale=use.index_scale,
        weight_scale=use.weight_scale,
    )
    slots = empty(rows, new, min(use.top_k, problem.context + new), type_=torch.int32)
    getattr(kernels, f"{attention}_paged_launch")(
        empty(rows, new, use.heads, use.latent),
        empty(rows, new, use.heads, use.rope),
        cache,
        slots,
        scale=use.scale,
    )


# --- compressed attention (templates/_compressor.jinja, _compressed_attention.jinja, _indexer.jinja) --------


def _compressed(
    kernels, use: CompressedUse, problem: Problem, dtype: torch.dtype, part: str, device: torch.device
) -> None:
    from mlagen.runtime.compressed_cache import CachedAttention, CachedEntries, CompressorWrite

    empty = _empty(dtype, device)

    def ints(*shape: int) -> torch.Tensor:
        return empty(*shape, type_=torch.int32)

    ops, half = kernels.COMPRESSED_OPS, use.rope_dim // 2
    batch, seq, heads, rate = problem.batch, problem.seq_len, use.heads, use.rate
    windows = seq // rate if rate else 0
    sinks = empty(heads, type_=torch.float32) if use.sinks else None
    if part in ("forward", "backward"):
        for c in use.compressors:
            launch, backward = ops.compressors[c.kernel]
            kv, gate, bias = (
                empty(batch, seq, c.width),
                empty(batch, seq, c.width),
                empty(c.rate, c.width, type_=torch.float32),
            )
            norm, cos, sin = (
                empty(c.dim, type_=torch.float32),
                empty(batch, seq // c.rate, half),
                empty(batch, seq // c.rate, half),
            )
            flags = dict(rate=c.rate, overlap=c.overlap, eps=1e-6)
            if part == "forward":
                launch(kv, gate, bias, norm, cos, sin, **flags)
            else:
                backward(empty(batch, seq // c.rate, c.dim), kv, gate, bias, norm, cos, sin, **flags)
        entries = empty(batch, windows, 1, use.dim) if rate else None
        selected = ints(batch, seq, min(use.top_k, windows)) if use.top_k else None
        if use.indexer is not None and part == "forward":
            ops.indexers[use.indexer](
                empty(batch, seq, use.index_heads, use.index_dim),
                empty(batch, windows, 1, use.index_dim),
                empty(batch, seq, use.index_heads),
                scale=use.index_scale,
                weight_scale=use.weight_scale,
                rate=rate,
            )
        launch, backward = ops.attentions[use.attention]
        query, key = empty(batch, seq, heads, use.dim), empty(batch, seq, 1, use.dim)
        cos, sin = empty(batch, seq, half), empty(batch, seq, half)
        flags = dict(scale=use.scale, window=use.window, rate=max(rate, 1))
        if part == "forward":
            launch(query, key, entries, selected, sinks, cos, sin, **flags)
        else:
            out, lse = empty(batch, seq, heads, use.dim), empty(batch, seq, heads, type_=torch.float32)
            backward(out, query, key, entries, selected, sinks, cos, sin, out, lse, **flags)
        return
    # one decode step of `new` tokens per sequence after `context` (runtime.compressed_cache.CachedOps)
    rows, new, total = problem.sequences, problem.new_tokens, problem.context + problem.new_tokens
    for c in use.compressors:
        launch, _ = ops.compressors[c.kernel]
        pages, closes = -(-(total // c.rate) // use.page_size), max(1, -(-new // c.rate))
        slots = c.rate * (2 if c.overlap else 1)  # the unfinished window (and with overlap the one before)
        into = CompressorWrite(
            empty(rows * pages, use.page_size, c.dim),
            ints(rows, pages),
            use.page_size,
            empty(rows, slots, c.width),
            empty(rows, slots, c.width),
            ints(rows),
            ints(rows),
            ints(rows),
            closes,
        )
        bias, norm = empty(c.rate, c.width, type_=torch.float32), empty(c.dim, type_=torch.float32)
        launch(
            empty(rows, new, c.width),
            empty(rows, new, c.width),
            bias,
            norm,
            empty(rows, closes, half),
            empty(rows, closes, half),
            rate=c.rate,
            overlap=c.overlap,
            eps=1e-6,
            into=into,
        )
    entries = total // rate if rate else 0
    pages = max(1, -(-entries // use.page_size))
    if use.indexer is not None:
        cached = CachedEntries(
            empty(rows * pages, use.page_size, use.index_dim),
            ints(rows, pages),
            use.page_size,
            ints(rows),
            ints(rows),
            entries,
            (entries,) * rows,
        )
        ops.indexers[use.indexer](
            empty(rows, new, use.index_heads, use.index_dim),
            cached.pages,
            empty(rows, new, use.index_heads),
            scale=use.index_scale,
            weight_scale=use.weight_scale,
            rate=rate,
            cached=cached,
        )
    launch, _ = ops.attentions[use.attention]
    cached = CachedAttention(
        empty(rows, use.window, use.dim),
        ints(rows),
        ints(rows),
        ints(rows, pages),
        use.page_size if rate else 0,
    )
    launch(
        empty(rows, new, heads, use.dim),
        empty(rows, new, 1, use.dim),
        empty(rows * pages, use.page_size, use.dim) if rate else None,
        ints(rows, new, min(use.top_k, entries)) if use.top_k else None,
        sinks,
        empty(rows, new, half),
        empty(rows, new, half),
        scale=use.scale,
        window=use.window,
        rate=max(rate, 1),
        cached=cached,
    )
