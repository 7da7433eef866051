"""MLA decode against the paged latent cache: appending new tokens and absorbed
attention, with the generated kernels or the plain-torch reference (same API)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlagen.runtime import reference
from mlagen.runtime.launch import launch_arch, smem_class
from mlagen.runtime.paged_cache import PagedLatentCache
from mlagen.runtime.rope import apply_rope
from mlagen.tiles import padded


@dataclass(frozen=True, slots=True)
class CachedTokens:
    """The result of an append: where each sequence's new tokens start in the cache."""

    cache: PagedLatentCache
    start: torch.Tensor  # [B] int32
    new_tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DecodeOps:
    write_rows: Callable  # (kv_a, norm_weight, eps, cos, sin, cache, start, new_tokens) -> None
    attention: Callable  # (q_latent, q_rope, cached: CachedTokens, *, scale, causal) -> [B, Sq, H, latent]

    def append(
        self,
        kv_a: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: PagedLatentCache,
        new_tokens: tuple[int, ...],
    ) -> CachedTokens:
        """Reserve pages (raising before anything is written), write the rows, count them."""
        start = cache.reserve(list(new_tokens))
        # The cache holds values, never a graph: the kernel writer cannot record one, and the
        # reference writer must not either (its buffer would require grad from then on).
        with torch.no_grad():
            self.write_rows(kv_a, norm_weight, eps, cos, sin, cache, start, new_tokens)
        cache.commit(list(new_tokens))
        return CachedTokens(cache, start, tuple(new_tokens))

    def attend(
        self,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        cached: CachedTokens,
        *,
        scale: float,
        causal: bool,
    ) -> torch.Tensor:
        return self.attention(q_latent, q_rope, cached, scale=scale, causal=causal)


def cache_descriptors(cache: PagedLatentCache, block_n: int, device: torch.device, *, halves: bool) -> tuple:
    """Tensor descriptors (TMA on sm_90 and sm_100) of the cache's rows for the decode kernel's
    full key tiles: (latent [block_n, latent], or a column half [block_n, latent / 2] where the
    kernel runs in column halves, rope key [block_n, rope]) boxes of the
    buffer seen as [pages * page_size, latent + rope]; (None, None) where the kernel reads with
    plain loads: sm_80, sm_89 and sm_12x, or when a tile is not one run of rows of one page, or a
    width is not its tile's (a power of two, at least 16). The interpreter takes them too, so CPU tests check that path."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    widths = (cache.latent_dim, cache.rope_dim)
    row = sum(widths)
    arch = launch_arch(device)
    if (
        (arch is not None and smem_class(arch) != "large")
        or cache.page_size % block_n
        or any(padded(width) != width for width in widths)
        or row * cache.buffer.element_size() % 16
    ):
        return None, None
    rows = cache.buffer.view(-1, row)
    boxes = (cache.latent_dim // 2 if halves else cache.latent_dim, cache.rope_dim)
    return tuple(TensorDescriptor(rows, list(rows.shape), [row, 1], [block_n, width]) for width in boxes)


def reference_write_rows(kv_a, norm_weight, eps, cos, sin, cache, start, new_tokens, *, layout: str) -> None:
    latent = reference.rms_norm(kv_a[..., : cache.latent_dim], norm_weight, eps)
    rope_key = apply_rope(kv_a[..., cache.latent_dim :].unsqueeze(2), cos, sin, layout)[:, :, 0]
    rows = torch.cat((latent, rope_key), dim=-1).to(cache.buffer.dtype)
    for seq, count in enumerate(new_tokens):
        positions = int(start[seq]) + torch.arange(count)
        pages = cache.page_table[seq, positions // cache.page_size].long()
        cache.buffer[pages, positions % cache.page_size] = rows[seq, :count]


def reference_attention(q_latent, q_rope, cached: CachedTokens, *, scale, causal):
    """Per sequence: gather its cached rows and attend (the oracle for the paged kernel).
    Query s of a sequence sits at position start + s; padding queries (s >= its new
    token count) give zeros."""
    out = torch.zeros_like(q_latent)
    for seq, count in enumerate(cached.new_tokens):
        rows = cached.cache.gather(seq).to(q_latent.dtype)
        latent, rope_key = (
            rows[None, :, None, : cached.cache.latent_dim],
            rows[None, :, None, cached.cache.latent_dim :],
        )
        # Causal masks align the last query with the last key: these `count` queries are the newest keys.
        out[seq, :count] = reference.attention(
            q_latent[seq : seq + 1, :count],
            q_rope[seq : seq + 1, :count],
            latent,
            rope_key,
            latent,
            scale=scale,
            causal=causal,
        )[0]
    return out
