"""The compressed paged latent cache of an MLA layer.

Per token the cache holds one row of kv_lora_rank + qk_rope_head_dim values:
the normalised latent c_kv and the rotated rope key k_pe shared by all heads
(576 values, 1152 bytes in bf16 for DeepSeek-V3). Rows live in fixed-size
pages of one buffer [num_pages, page_size, width]; each sequence owns a list
of pages through its row of the page table, so sequences of different lengths
share one buffer, and freeing a sequence returns its pages to the pool.

Bookkeeping (free list, lengths) is mirrored on the host, so allocation never
synchronises with the GPU.
"""

from __future__ import annotations

from collections import deque

import torch

from mlagen.runtime.checks import expect_int, expect_int_list, shown


class PagedLatentCache:
    def __init__(
        self,
        batch_size: int,
        max_tokens: int,
        *,
        latent_dim: int,
        rope_dim: int,
        page_size: int = 64,
        num_pages: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        batch_size = expect_int("batch_size", batch_size, minimum=1)
        max_tokens = expect_int("max_tokens", max_tokens, minimum=1)
        page_size = expect_int("page_size", page_size, minimum=1)
        self.batch_size, self.max_tokens, self.page_size = batch_size, max_tokens, page_size
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.pages_per_sequence = -(-max_tokens // page_size)
        # A pool smaller than batch_size * pages_per_sequence is fine (sequences rarely all
        # reach max_tokens; reserve() says when it runs out), an empty one is not.
        if num_pages is None:
            num_pages = batch_size * self.pages_per_sequence
        num_pages = expect_int("num_pages", num_pages, minimum=1)
        # Normal tensors even when created under torch.inference_mode(): the cache is updated
        # in place, which inference tensors refuse outside inference mode (a later no_grad call).
        with torch.inference_mode(False):
            self.buffer = self._new_buffer(num_pages, page_size, dtype, device)
            self.page_table = torch.zeros(
                batch_size, self.pages_per_sequence, dtype=torch.int32, device=device
            )
            self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._lengths = [0] * batch_size
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._free = deque(range(num_pages))

    def _new_buffer(self, num_pages: int, page_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.zeros(num_pages, page_size, self.latent_dim + self.rope_dim, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the values the cache hands back (and of the modules it serves)."""
        return self.buffer.dtype

    @property
    def width(self) -> int:
        return self.latent_dim + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        return self.width * self.buffer.element_size()

    @property
    def is_empty(self) -> bool:
        return not any(self._lengths)

    def host_lengths(self) -> list[int]:
        return list(self._lengths)

    def reserve(self, new_tokens: list[int]) -> torch.Tensor:
        """Make room for new_tokens[b] more tokens in every sequence; returns their start
        positions [B] (int32, on the cache's device). Raises ValueError, changing
        nothing, when a sequence would pass max_tokens or the pool runs out of pages."""
        new_tokens = expect_int_list("new_tokens", new_tokens)
        if any(count < 0 for count in new_tokens):
            raise ValueError(f"new_tokens must be counts >= 0, got {shown(new_tokens)}")
        if len(new_tokens) != self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} sequences but the input has {len(new_tokens)}; "
                "create the cache with new_cache(batch_size=...) for this batch"
            )
        needed: list[int] = []
        for row, (length, extra) in enumerate(zip(self._lengths, new_tokens)):
            if length + extra > self.max_tokens:
                raise ValueError(
                    f"sequence {row} would hold {length + extra} tokens, more than the cache's "
                    f"max_tokens={self.max_tokens}; create a larger cache or free sequences"
                )
            needed.append(-(-(length + extra) // self.page_size) - len(self._pages[row]))
        if sum(needed) > len(self._free):
            raise ValueError(
                f"the cache needs {sum(needed)} more pages but {len(self._free)} are free; "
                "free finished sequences or create the cache with more num_pages"
            )
        for row, count in enumerate(needed):
            for _ in range(count):
                page = self._free.popleft()
                self.page_table[row, len(self._pages[row])] = page
                self._pages[row].append(page)
        return torch.tensor(self._lengths, dtype=torch.int32, device=self.buffer.device)

    def commit(self, new_tokens: list[int]) -> None:
        """Count appended tokens as cached (after their rows were written)."""
        self._lengths = [length + extra for length, extra in zip(self._lengths, new_tokens)]
        self.lengths.copy_(torch.tensor(self._lengths, dtype=torch.int32))

    def free(self, rows: list[int] | None = None) -> None:
        """Forget sequences (all by default) and return their pages to the pool. Rows are
        checked before anything is freed: a negative index would free another sequence."""
        if rows is None:
            rows = list(range(self.batch_size))
        rows = expect_int_list("rows", rows)
        if any(not 0 <= row < self.batch_size for row in rows) or len(set(rows)) != len(rows):
            raise ValueError(
                f"rows must be distinct sequence indices in [0, {self.batch_size}), got {shown(rows)}"
            )
        for row in rows:
            self._free.extend(self._pages[row])
            self._pages[row] = []
            self._lengths[row] = 0
        self.lengths.copy_(torch.tensor(self._lengths, dtype=torch.int32))

    def gather(self, row: int) -> torch.Tensor:
        """The cached rows of one sequence, [length, width] (for the reference path and tests)."""
        row = expect_int("row", row)
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row must be a sequence index in [0, {self.batch_size}), got {row}")
        length = self._lengths[row]
        pages = self.buffer[self.page_table[row, : -(-length // self.page_size)].long()]
        return pages.reshape(-1, self.width)[:length]

    def __repr__(self) -> str:
        return (
            f"PagedLatentCache(batch={self.batch_size}, max_tokens={self.max_tokens}, page_size={self.page_size}, "
            f"width={self.width}, pages={self.buffer.shape[0]} ({len(self._free)} free), "
            f"lengths={self._lengths})"
        )
