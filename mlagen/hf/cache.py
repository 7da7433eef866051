"""A transformers `Cache` that owns mlagen's caches for every patched attention layer.

MLA layers keep the compressed paged cache (runtime/paged_cache.py: the normalised
latent and the rotated rope key per token), never transformers' expanded K/V. GQA,
MHA and MQA layers keep their K/V per token. Either way a layer stores only real
tokens: left padding is dropped on the way in, so decode needs no padding mask and
each sequence's cached length is its own.

transformers still counts padding when it sizes masks and positions, so every layer
also keeps `seen`, the number of tokens transformers has passed through it
(padding included), which is what `get_seq_length` reports.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mlagen.runtime.compressed_cache import CompressedCache
from mlagen.runtime.paged_cache import PagedLatentCache

_WRITE_THROUGH = (
    "mlagen cache layers are written by the patched attention layers themselves; "
    "transformers' update() path is not used"
)


class _MlagenLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, batch_size: int, max_tokens: int):
        super().__init__()
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(_WRITE_THROUGH)

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # Older transformers 5 releases pass cache_position (one entry per new token), newer the count.
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_tokens

    get_max_cache_shape = get_max_length  # its name before transformers 5.2x

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "mlagen caches do not reorder rows (beam search); use greedy or sampling, or unpatch the model"
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "mlagen caches cannot drop tokens (assisted decoding); unpatch the model for that mode"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(
            "mlagen caches are sized for one batch; create the cache after expanding the batch"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("mlagen caches do not select rows; unpatch the model for that mode")


class LatentCacheLayer(_MlagenLayer):
    """One MLA layer: a PagedLatentCache, allocated on first use."""

    def __init__(
        self,
        make_storage: Callable[[], PagedLatentCache],
        batch_size: int,
        max_tokens: int,
        bytes_per_token: int,
    ):
        super().__init__(batch_size, max_tokens)
        self._make_storage = make_storage
        self._storage: PagedLatentCache | None = None
        self._bytes_per_token = bytes_per_token

    def storage(self) -> PagedLatentCache:
        if self._storage is None:
            self._storage = self._make_storage()
            self.is_initialized = True
        return self._storage

    def bytes_per_token(self) -> int:
        return self._bytes_per_token

    def reset(self) -> None:
        if self._storage is not None:
            self._storage.free()
        self.seen = 0

    def __repr__(self) -> str:
        return f"LatentCacheLayer(seen={self.seen}, {self._storage!r})"


class CompressedCacheLayer(_MlagenLayer):
    """One DeepSeek-V4 layer: a CompressedCache (ring of the window's rows, the unfinished
    window, paged compressed entries), allocated on first use."""

    def __init__(
        self,
        make_storage: Callable[[], CompressedCache],
        batch_size: int,
        max_tokens: int,
        bytes_per_token: float,
    ):
        super().__init__(batch_size, max_tokens)
        self._make_storage = make_storage
        self._storage: CompressedCache | None = None
        self._bytes_per_token = bytes_per_token

    def storage(self) -> CompressedCache:
        if self._storage is None:
            self._storage = self._make_storage()
            self.is_initialized = True
        return self._storage

    def bytes_per_token(self) -> float:
        return self._bytes_per_token

    def reset(self) -> None:
        if self._storage is not None:
            self._storage.free()
        self.seen = 0

    def __repr__(self) -> str:
        return f"CompressedCacheLayer(seen={self.seen}, {self._storage!r})"


class KVCacheLayer(_MlagenLayer):
    """One GQA/MHA/MQA layer: keys and values [B, max_tokens, kv_heads, head_dim] of the
    real tokens of each row, with per-row lengths kept on the host."""

    def __init__(
        self,
        batch_size: int,
        max_tokens: int,
        kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(batch_size, max_tokens)
        self.kv_heads, self.k_dim, self.v_dim = kv_heads, k_dim, v_dim
        self.dtype, self.device = dtype, device
        self.lengths = [0] * batch_size
        self.keys_buffer: torch.Tensor | None = None
        self.values_buffer: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, counts: tuple[int, ...]) -> list[int]:
        """Write counts[b] new tokens of row b (left-aligned in keys/values [B, S, Hk, D]);
        returns each row's length before the write. Raises before writing anything when a
        row would pass max_tokens."""
        if len(counts) != self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} sequences but the input has {len(counts)}; "
                "create the cache for this batch size"
            )
        for row, (length, extra) in enumerate(zip(self.lengths, counts)):
            if length + extra > self.max_tokens:
                raise ValueError(
                    f"sequence {row} would hold {length + extra} tokens, more than the cache's "
                    f"max_tokens={self.max_tokens}; create a larger cache"
                )
        if self.keys_buffer is None:
            shape = (self.batch_size, self.max_tokens, self.kv_heads)
            self.keys_buffer = torch.zeros(*shape, self.k_dim, dtype=self.dtype, device=self.device)
            self.values_buffer = torch.zeros(*shape, self.v_dim, dtype=self.dtype, device=self.device)
            self.is_initialized = True
        starts = list(self.lengths)
        if len(set(starts)) == 1 and len(set(counts)) == 1:  # one slice for the whole batch
            self.keys_buffer[:, starts[0] : starts[0] + counts[0]] = keys[:, : counts[0]]
            self.values_buffer[:, starts[0] : starts[0] + counts[0]] = values[:, : counts[0]]
        else:
            for row, (start, count) in enumerate(zip(starts, counts)):
                self.keys_buffer[row, start : start + count] = keys[row, :count]
                self.values_buffer[row, start : start + count] = values[row, :count]
        self.lengths = [length + extra for length, extra in zip(self.lengths, counts)]
        return starts

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.kv_heads * (self.k_dim + self.v_dim) * element

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size
        self.seen = 0

    def __repr__(self) -> str:
        return f"KVCacheLayer(seen={self.seen}, lengths={self.lengths})"


class MlagenCache(Cache):
    """The cache `generate()` uses on a model patched by mlagen.patch (created
    automatically there), or one to pass to the model's forward as `cache` (transformers
    5.24 and newer; `past_key_values` before):

        cache = MlagenCache(model, batch_size=4, max_tokens=4096)
        model(input_ids, attention_mask=mask, cache=cache)

    `max_tokens` bounds each row, padding included; `page_size`/`num_pages` size the MLA
    layers' page pools (default: the spec's page size, and every row at max_tokens);
    `cache_dtype="fp8"` stores sparse MLA layers' rows in FlashMLA's FP8 layout (default: the
    spec's cache_dtype)."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        max_tokens: int,
        *,
        page_size: int | None = None,
        num_pages: int | None = None,
        cache_dtype: str | None = None,
    ):
        from mlagen.hf.patch import patched_attention_layers

        layers = patched_attention_layers(model)
        if not layers:
            raise ValueError(
                "the model has no mlagen-patched attention layers; call mlagen.patch(model) first"
            )
        if batch_size < 1 or max_tokens < 1:
            raise ValueError(f"need batch_size and max_tokens >= 1, got {batch_size} and {max_tokens}")
        if cache_dtype is not None and not all(layer.sparse for layer in layers):
            raise ValueError(
                "cache_dtype applies to sparse MLA layers (DeepSeek-V3.2, GLM-5); leave it unset"
            )
        super().__init__(
            layers=[
                layer.new_cache_layer(batch_size, max_tokens, page_size, num_pages, cache_dtype)
                for layer in layers
            ]
        )

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over layers (what one more token costs)."""
        return sum(layer.bytes_per_token() for layer in self.layers)
