"""DeepSeek Sparse Attention at run time: the top-k selection, the plain-torch reference ops,
the autograd op of the sparse attention kernels, and the cache-side ops of decode.

Selections are key positions [B, S, K] int32, -1 where a query has fewer than K visible keys
(FlashMLA's convention); the paged kernels take them as cache slots (page * page_size + offset).
Semantics follow transformers' DeepseekV32Indexer / DeepseekV32Attention: the index scores
accumulate in fp32, the selection is the top index_topk visible keys (all of them when fewer
are visible), attention is the layer's MLA restricted to those keys, and no gradient flows
into the indexer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mlagen.runtime import reference
from mlagen.runtime.launch import (
    INTERPRETER_CONFIG,
    launch_arch,
    multiprocessor_count,
    programs_along_columns,
    smem_class,
    triton_version,
)
from mlagen.runtime.mla_decode import CachedTokens, DecodeOps
from mlagen.runtime.rope import apply_rope
from mlagen.runtime.sparse_cache import PagedSparseCache
from mlagen.tiles import padded

# --- launch settings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SparseConfig:
    """Tiles of the indexer and sparse attention kernels. block_m: query rows (prefill indexer),
    index heads (paged indexer) or attention heads per program; block_n: keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tokens: int = 4  # paged indexer: new tokens per program, which share each key tile read
    num_splits: int | None = None  # sparse decode: split-KV factor (None: sparse_split_count)
    # sparse forward: how programs keep the latent's output columns (runtime.launch.COLUMN_LAYOUTS)
    columns: str = "split"

    def __post_init__(self) -> None:
        programs_along_columns(self.columns)  # a known layout

    @property
    def column_programs(self) -> int:
        return programs_along_columns(self.columns)


# Small tiles under the interpreter keep tests fast and make test sequences span several tiles.
INTERPRETED = SparseConfig(
    INTERPRETER_CONFIG.block_m, INTERPRETER_CONFIG.block_n, INTERPRETER_CONFIG.num_warps, 1, tokens=2
)


def indexer_config(device: torch.device) -> SparseConfig:
    if launch_arch(device) is None:
        return INTERPRETED
    # [64, 128] queries and [128, 64] keys per head step, a [64, 64] fp32 sum: spill-free on sm_80 to sm_120.
    return SparseConfig(64, 64, 4, 2)


def paged_indexer_config(index_heads: int, device: torch.device, fp8: bool = False) -> SparseConfig:
    """Rows are (token, index head) pairs: every head of a token in one dot (64 for
    DeepSeek-V3.2), at least 64 rows where wgmma (sm_90) and tcgen05 (sm_100) want M=64: GLM-5's
    32 index heads take 2 tokens per dot (one in decode, the other half padding inside the
    program). FP8 keys hold codes and decoded values at once: half the keys per step."""
    rows = padded(index_heads)
    arch = launch_arch(device)
    if arch is None:
        return SparseConfig(rows, INTERPRETED.block_n, 1, 1, tokens=INTERPRETED.tokens)
    if smem_class(arch) == "large":
        rows = max(rows, 64)
    return SparseConfig(rows, 32 if fp8 else 64, 4 if rows <= 64 else 8, 2)


def sparse_config(heads: int, latent: int, device: torch.device, fp8: bool = False) -> SparseConfig:
    """block_m heads of one query share every gathered row; `columns` says how programs keep the
    latent output columns (templates/_sparse_mla.jinja), as in the dense MLA decode kernel.
    Prefill and the split-KV decode (fp32 partials) take the same tiles. FP8 rows also hold
    their codes and decoded values: half the keys per step."""
    arch = launch_arch(device)
    if arch is None:
        return INTERPRETED
    # 64 heads make every dot M=64. Measured with Triton 3.9 at latent 512 (mlagen.aot):
    if smem_class(arch) == "large":
        # sm_90: one program keeps all 512 columns on two warpgroups, which split the N of every
        # dot (the MLA decode kernel's _step): the score tile once, 128 fp32 accumulator
        # registers a thread. Issue-clocks per 1K (head, key) pairs: 448 at 64 keys (254
        # registers, 224 KB; column-half programs: 1186 at 16 keys, each computing the score
        # tile), FP8 rows 910 at 32 keys (251 registers; 64 spill 32 B; halves: 1668).
        # sm_100: tcgen05 keeps the accumulator in tensor memory, column halves: 8 warps, 206-208
        # registers (243 with FP8 rows at 32 keys), 176 KB; 4 warps spill 8-80 bytes.
        # Triton 3.6 takes 32 keys on both: at 64 it spills 104 B of the sm_90 program, with
        # 19-22 local loads and stores in every step (32 keys: 0 spilled, 646; FP8 rows: 8 B kept
        # over the loop, none in it, 970), and lays the sm_100 one out in 312 KB (more than the
        # 227 a block may have; 192 KB at 32 keys).
        keys = 32 if fp8 or triton_version() < (3, 9) else 64
        return SparseConfig(64, keys, 8, 2, columns="whole" if arch // 10 == 9 else "split")
    # mma.sync: the [16 or 32, 512] accumulator fits, so one program keeps both column halves and
    # computes the score tile once (split in two, the tile and the FP8 decode run twice per
    # (head, key) pair: 1.25x the issue slots, 2.4x with sm_80's FP8 rows). 16-row steps, tiles
    # no taller than the heads; 32 heads x 32 keys: 169 registers on 8 warps, 74 KB (4 warps
    # spill on sm_120); FP8 rows spill at 32 heads.
    if fp8 or heads <= 16:
        return SparseConfig(16, 16 if fp8 else 32, 4, 2, columns="halves")
    return SparseConfig(32, 32, 8, 2, columns="halves")


def sparse_backward_config(heads: int, latent: int, device: torch.device) -> SparseConfig:
    """A program takes block_n of one query's selected keys x block_m of its heads and holds no
    accumulator through a loop (templates/_sparse_mla.jinja): its dots have block_m or block_n
    rows, 64 and 64 where wgmma (sm_90) and tcgen05 (sm_100) want M=64."""
    arch = launch_arch(device)
    if arch is None:
        return INTERPRETED
    if smem_class(arch) == "large":
        # 64-column chunks: 206 registers, 88 KB on sm_90; 232 on sm_100 (128-wide chunks spill 240-630 B)
        return SparseConfig(64, 64, 4, 2)
    # mma.sync: 32 heads x 64 keys on 8 warps, 226-238 registers, 32 KB (16 x 32 on 4 warps takes
    # 1.8x the issue slots per (head, key) pair; 32 x 64 on 4 warps spills 440 B)
    return SparseConfig(16 if heads <= 16 else 32, 64, 8, 2)


def output_rows(out: Tensor, config: SparseConfig, latent: int, descriptors: bool | None = None):
    """A TensorDescriptor (TMA store, sm_90 and sm_100) of the sparse forward's output `out`
    [..., H, latent] (contiguous) as [rows, H, latent] boxes of one query's config.block_m heads x
    one accumulator's columns (all of the latent with config.columns "whole", else half): heads
    past H are not written, so rows pad inside the program. None where the kernel
    stores through pointers: no descriptors on the device (descriptors=None), or a latent that is
    not its tile's width. (The pointer store's addresses, computed as the query loads' are, keep
    their registers live across the key loop: 8-16 bytes of spill on sm_90.)"""
    from mlagen.runtime.descriptors import uses_descriptors

    if descriptors is None:
        descriptors = uses_descriptors(out.device)
    if not descriptors or padded(latent) != latent or out.numel() == 0:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    heads = out.shape[-2]
    rows = out.view(-1, heads, latent)
    width = latent if config.columns == "whole" else latent // 2
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [1, config.block_m, width])


def sparse_split_count(queries: int, top_k: int, device: torch.device) -> int:
    """Split-KV factor of sparse decode: enough programs to fill the GPU when few queries
    decode (each reads top_k rows); under the interpreter one split per 16 selected keys (at
    most 4), so tests exercise the combine."""
    sms = multiprocessor_count(device)
    if sms is None:
        return max(1, min(4, -(-top_k // 16)))
    return max(1, min(-(-top_k // 256), -(-2 * sms // max(queries, 1)), 32))


# --- boundary checks ------------------------------------------------------------------------------


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _shape(tensor: object) -> object:
    return list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__


def check_indexer_operands(query: Tensor, key: Tensor, weights: Tensor, *, dim: int) -> None:
    _expect(
        isinstance(query, Tensor) and query.dim() == 4 and query.shape[-1] == dim,
        f"index query must be [B, S, index heads, {dim}], got {_shape(query)}",
    )
    _expect(
        isinstance(key, Tensor)
        and key.dim() == 4
        and key.shape[0] == query.shape[0]
        and key.shape[2:] == (1, dim),
        f"index key must be [{query.shape[0]}, T, 1, {dim}], got {_shape(key)}",
    )
    _expect(
        isinstance(weights, Tensor) and weights.shape == query.shape[:3],
        f"index head weights must be {list(query.shape[:3])}, got {_shape(weights)}",
    )
    _expect(key.dtype == query.dtype, f"index key is {key.dtype} but the query {query.dtype}; use one dtype")


def check_paged_indexer_operands(
    query: Tensor, weights: Tensor, cache: PagedSparseCache, *, dim: int
) -> None:
    _expect(
        isinstance(cache, PagedSparseCache),
        f"the cache must be a PagedSparseCache, got {type(cache).__name__}",
    )
    _expect(
        cache.index_buffer is not None,
        "this cache keeps no indexer keys (its layer reuses another's selection)",
    )
    _expect(
        cache.index_dim == dim,
        f"the cache holds {cache.index_dim}-wide indexer keys; this kernel reads {dim}",
    )
    _expect(
        isinstance(query, Tensor) and query.dim() == 4 and query.shape[-1] == dim,
        f"index query must be [B, S, index heads, {dim}], got {_shape(query)}",
    )
    _expect(
        query.shape[0] == cache.batch_size, f"batch {query.shape[0]}, but the cache holds {cache.batch_size}"
    )
    _expect(
        weights.shape == query.shape[:3],
        f"index head weights must be {list(query.shape[:3])}, got {_shape(weights)}",
    )


def check_sparse_operands(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    rope_key: Tensor,
    index: Tensor,
    *,
    latent_dim: int,
    rope_dim: int,
) -> None:
    for name, tensor, width in (("q_latent", q_latent, latent_dim), ("q_rope", q_rope, rope_dim)):
        _expect(
            isinstance(tensor, Tensor) and tensor.dim() == 4 and tensor.shape[-1] == width,
            f"{name} must be [B, S, heads, {width}], got {_shape(tensor)}",
        )
    _expect(
        q_rope.shape[:3] == q_latent.shape[:3],
        f"q_rope {list(q_rope.shape)} does not match q_latent {list(q_latent.shape)}",
    )
    batch = q_latent.shape[0]
    for name, tensor, width in (("latent", latent, latent_dim), ("rope_key", rope_key, rope_dim)):
        _expect(
            isinstance(tensor, Tensor)
            and tensor.dim() == 4
            and tensor.shape[0] == batch
            and tensor.shape[2:] == (1, width),
            f"{name} must be [{batch}, T, 1, {width}], got {_shape(tensor)}",
        )
        _expect(
            tensor.dtype == q_latent.dtype,
            f"{name} is {tensor.dtype} but q_latent {q_latent.dtype}; use one dtype",
        )
    _expect(
        rope_key.shape[1] == latent.shape[1],
        f"rope_key has {rope_key.shape[1]} tokens, latent {latent.shape[1]}",
    )
    _expect(
        isinstance(index, Tensor)
        and index.dim() == 3
        and index.shape[:2] == q_latent.shape[:2]
        and not index.is_floating_point(),
        f"index must be integer [B, S, K] for queries {list(q_latent.shape[:2])}, got {_shape(index)}",
    )


def check_paged_sparse_operands(
    q_latent: Tensor,
    q_rope: Tensor,
    cache: PagedSparseCache,
    slots: Tensor,
    *,
    latent_dim: int,
    rope_dim: int,
) -> None:
    _expect(
        isinstance(cache, PagedSparseCache),
        f"the cache must be a PagedSparseCache, got {type(cache).__name__}",
    )
    _expect(
        (cache.latent_dim, cache.rope_dim) == (latent_dim, rope_dim),
        f"the cache holds latent {cache.latent_dim} + rope {cache.rope_dim}; this kernel reads {latent_dim} + {rope_dim}",
    )
    for name, tensor, width in (("q_latent", q_latent, latent_dim), ("q_rope", q_rope, rope_dim)):
        _expect(
            isinstance(tensor, Tensor) and tensor.dim() == 4 and tensor.shape[-1] == width,
            f"{name} must be [B, S, heads, {width}], got {_shape(tensor)}",
        )
    _expect(q_latent.dtype == cache.dtype, f"queries are {q_latent.dtype} but the cache serves {cache.dtype}")
    _expect(
        isinstance(slots, Tensor)
        and slots.dtype == torch.int32
        and slots.dim() == 3
        and slots.shape[:2] == q_latent.shape[:2],
        f"slots must be int32 [B, S, K] for queries {list(q_latent.shape[:2])}, got {_shape(slots)}",
    )


# --- selection -------------------------------------------------------------------------------------


def top_k(scores: Tensor, k: int) -> Tensor:
    """The positions of the k best index scores [B, S, T] of each query, [B, S, min(k, T)]
    int32, -1 where fewer than k keys are visible (score -inf). torch.topk: see README
    ("top-k: torch.topk") for why not a Triton select."""
    values, positions = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return positions.to(torch.int32).masked_fill(values == float("-inf"), -1)


def selection_mask(index: Tensor, seqlen_k: int) -> Tensor:
    """index [B, S, K] positions (-1: none) -> bool [B, S, seqlen_k], True at the selected keys."""
    mask = torch.zeros(*index.shape[:2], seqlen_k + 1, dtype=torch.bool, device=index.device)
    # -1 lands in the extra last column, which is dropped.
    return mask.scatter(-1, torch.where(index >= 0, index, seqlen_k).long(), True)[..., :seqlen_k]


# --- reference ops (plain torch: the oracles of the kernels) --------------------------------------


def reference_index_scores(
    query: Tensor, key: Tensor, weights: Tensor, *, scale: float, weight_scale: float
) -> Tensor:
    """transformers' DeepseekV32Indexer scores: query [B, S, H_I, d], key [B, T, 1, d], weights
    [B, S, H_I] -> [B, S, T] fp32 (fp64 for fp64 inputs), -inf where the key is not visible
    (the last query sees the last key)."""
    wide = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = torch.relu(
        query.to(wide) @ key[:, :, 0].to(wide).transpose(-1, -2).unsqueeze(1) * scale
    )  # [B, S, H, T]
    scores = (weights.to(wide) * weight_scale).unsqueeze(-2) @ logits  # [B, S, 1, T]
    visible = reference.visible(
        query.shape[1], key.shape[1], causal=True, window=None, group_mask=None, device=query.device
    )
    return scores.squeeze(-2).masked_fill(~visible, float("-inf"))


def reference_sparse_attention(q_a, q_b, k_a, k_b, v, *, index: Tensor, scale: float) -> Tensor:
    """Absorbed sparse MLA in plain torch: each query attends to its selected keys only.
    q_a [B, S, H, r], q_b [B, S, H, dr], k_a = v [B, T, 1, r], k_b [B, T, 1, dr], index
    [B, S, K] (-1: none) -> [B, S, H, r]. A query that selects nothing gives zeros."""
    wide = torch.float64 if q_a.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bshd,btd->bhst", q_a.to(wide), k_a[:, :, 0].to(wide))
    scores = scores + torch.einsum("bshd,btd->bhst", q_b.to(wide), k_b[:, :, 0].to(wide))
    scores = (scores * scale).masked_fill(~selection_mask(index, k_a.shape[1])[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0))
    return torch.einsum("bhst,btd->bshd", probs.to(v.dtype), v[:, :, 0])


# --- the autograd op of the sparse attention kernels --------------------------------------------

_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {}
_OPS: dict[str, Callable] = {}


def sparse_attention_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """`mlagen::<name>`: (q_latent, q_rope, latent, rope_key, index, scale) -> (out, lse), with
    a fake implementation and autograd through the kernels' backward (runtime/ops.py does the
    same for dense attention). `forward`/`backward` are the generated launchers."""
    _IMPLEMENTATIONS[name] = (forward, backward)
    if name not in _OPS:
        _OPS[name] = _define(name)
    return _OPS[name]


def _define(name: str) -> Callable:
    @torch.library.custom_op(f"mlagen::{name}", mutates_args=())
    def sparse_attention(
        q_latent: Tensor, q_rope: Tensor, latent: Tensor, rope_key: Tensor, index: Tensor, scale: float
    ) -> tuple[Tensor, Tensor]:
        return _IMPLEMENTATIONS[name][0](q_latent, q_rope, latent, rope_key, index, scale=scale)

    @sparse_attention.register_fake
    def _(q_latent, q_rope, latent, rope_key, index, scale):
        batch, seqlen_q, heads, _ = q_latent.shape
        lse_type = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
        return q_latent.new_empty(q_latent.shape), q_latent.new_empty(
            (batch, heads, seqlen_q), dtype=lse_type
        )

    @torch.library.custom_op(f"mlagen::{name}_backward", mutates_args=())
    def sparse_attention_backward(
        grad_out: Tensor,
        q_latent: Tensor,
        q_rope: Tensor,
        latent: Tensor,
        rope_key: Tensor,
        index: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: float,
    ) -> list[Tensor]:
        grads = _IMPLEMENTATIONS[name][1](
            grad_out, q_latent, q_rope, latent, rope_key, index, out, lse, scale=scale
        )
        return list(grads)

    @sparse_attention_backward.register_fake
    def _(grad_out, q_latent, q_rope, latent, rope_key, index, out, lse, scale):
        return [t.new_empty(t.shape) for t in (q_latent, q_rope, latent, rope_key)]

    def setup_context(ctx, inputs, output):
        q_latent, q_rope, latent, rope_key, index, scale = inputs
        out, lse = output
        ctx.save_for_backward(q_latent, q_rope, latent, rope_key, index, out, lse)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        q_latent, q_rope, latent, rope_key, index, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = sparse_attention_backward(
            grad_out, q_latent, q_rope, latent, rope_key, index, out, lse, ctx.scale
        )
        return (*grads, None, None)

    sparse_attention.register_autograd(backward, setup_context=setup_context)
    return sparse_attention


def indexer_op(name: str, launch: Callable) -> Callable:
    """`mlagen::<name>`: the prefill index scores (query, key, weights, scale, weight_scale) ->
    [B, Sq, Sk], one opaque node for torch.compile and torch.export (no autograd: the
    selection is not differentiable). Called with keywords, as the kernel table's entry."""
    _IMPLEMENTATIONS[name] = (launch, None)
    if name not in _OPS:

        @torch.library.custom_op(f"mlagen::{name}", mutates_args=())
        def index_scores(
            query: Tensor, key: Tensor, weights: Tensor, scale: float, weight_scale: float
        ) -> Tensor:
            return _IMPLEMENTATIONS[name][0](query, key, weights, scale=scale, weight_scale=weight_scale)

        @index_scores.register_fake
        def _(query, key, weights, scale, weight_scale):
            wide = torch.float64 if query.dtype == torch.float64 else torch.float32
            return query.new_empty((query.shape[0], query.shape[1], key.shape[1]), dtype=wide)

        _OPS[name] = index_scores
    op = _OPS[name]
    return lambda query, key, weights, *, scale, weight_scale: op(query, key, weights, scale, weight_scale)


def sparse_attention_entry(op: Callable) -> Callable:
    """The kernel table's entry for sparse attention: the generated modules call it with the
    attention op's operands, keys and values both being the latent (the absorbed form)."""

    def sparse_attention(q_a, q_b, k_a, k_b, v, *, index, scale):
        assert v is k_a, "sparse attention is absorbed: the latent is the keys and the values"
        out, _ = op(q_a, q_b, k_a, k_b, index, scale)
        return out

    return sparse_attention


# --- decode over the paged sparse cache --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SparseDecodeOps(DecodeOps):
    """DecodeOps of a sparse layer: the latent append (FP8 rows are quantised in torch), the
    indexer keys beside them, the index scores over the cache and the sparse attention over
    the selected slots. The same API runs the generated kernels or plain torch."""

    index_scores_over_cache: Callable  # (query, weights, cached, *, scale, weight_scale) -> [B, S, T]
    sparse_attention: Callable  # (q_latent, q_rope, cached, positions, *, scale) -> [B, S, H, r]
    rope_layout: str  # the latent rope key's, for FP8 rows written in torch

    def append(self, kv_a, norm_weight, eps, cos, sin, cache, new_tokens) -> CachedTokens:
        if not getattr(cache, "fp8", False):
            return DecodeOps.append(self, kv_a, norm_weight, eps, cos, sin, cache, new_tokens)
        start = cache.reserve(list(new_tokens))
        with torch.no_grad():
            latent = reference.rms_norm(kv_a[..., : cache.latent_dim], norm_weight, eps)
            rope = apply_rope(kv_a[..., cache.latent_dim :].unsqueeze(2), cos, sin, self.rope_layout)[:, :, 0]
            for row, count in enumerate(new_tokens):
                positions = start[row].long() + torch.arange(count, device=kv_a.device)
                cache.write_latent_rows(row, positions, latent[row, :count], rope[row, :count])
        cache.commit(list(new_tokens))
        return CachedTokens(cache, start, tuple(new_tokens))

    def append_index_keys(self, keys: Tensor, cached: CachedTokens) -> CachedTokens:
        """Write the new tokens' indexer keys [B, S, 1, d] beside their latent rows."""
        with torch.no_grad():
            for row, count in enumerate(cached.new_tokens):
                positions = cached.start[row].long() + torch.arange(count, device=keys.device)
                cached.cache.write_index_keys(row, positions, keys[row, :count, 0])
        return cached

    def index_scores(
        self, query, weights, cached: CachedTokens, *, scale: float, weight_scale: float
    ) -> Tensor:
        return self.index_scores_over_cache(query, weights, cached, scale=scale, weight_scale=weight_scale)

    def attend_sparse(
        self, q_latent, q_rope, cached: CachedTokens, positions: Tensor, *, scale: float
    ) -> Tensor:
        return self.sparse_attention(q_latent, q_rope, cached, positions, scale=scale)


def paged_sparse_attention(launch: Callable) -> Callable:
    """The kernel path: positions become the cache slots the kernel reads."""

    def attend(q_latent, q_rope, cached: CachedTokens, positions: Tensor, *, scale: float) -> Tensor:
        return launch(q_latent, q_rope, cached.cache, cached.cache.slots_of(positions), scale=scale)

    return attend


def reference_index_scores_over_cache(query, weights, cached: CachedTokens, *, scale, weight_scale) -> Tensor:
    """Per sequence: its cached indexer keys, scored like the prefill; padding queries (s >= the
    row's new token count) and positions past the row's cache are -inf."""
    cache = cached.cache
    longest = max(cache.host_lengths())
    out = torch.full((*query.shape[:2], longest), float("-inf"), dtype=torch.float32, device=query.device)
    for row, count in enumerate(cached.new_tokens):
        keys = cache.gather_index_keys(row).to(query.dtype)
        scores = reference_index_scores(
            query[row : row + 1, :count],
            keys[None, :, None],
            weights[row : row + 1, :count],
            scale=scale,
            weight_scale=weight_scale,
        )
        out[row, :count, : keys.shape[0]] = scores[0].float()
    return out


def reference_sparse_attention_over_cache(
    q_latent, q_rope, cached: CachedTokens, positions, *, scale
) -> Tensor:
    out = torch.zeros_like(q_latent)
    cache = cached.cache
    for row, count in enumerate(cached.new_tokens):
        rows = cache.gather(row).to(q_latent.dtype)[None, :, None]
        latent, rope_key = rows[..., : cache.latent_dim], rows[..., cache.latent_dim :]
        out[row, :count] = reference_sparse_attention(
            q_latent[row : row + 1, :count],
            q_rope[row : row + 1, :count],
            latent,
            rope_key,
            latent,
            index=positions[row : row + 1, :count],
            scale=scale,
        )[0]
    return out
