"""The paged cache of a sparse MLA layer (DeepSeek-V3.2, GLM-5).

Per token it holds the latent + rope key row of every MLA cache and, beside it in the same
page and slot, the lightning indexer's key: one page table serves both. Rows are in the
model's dtype, or FP8 (`cache_dtype="fp8"`): the latent row in FlashMLA's "FP8 with scale"
layout and the indexer key as e4m3 with one fp32 scale (runtime/fp8.py), 656 + 132 bytes per
token for DeepSeek-V3.2 against 1152 + 256 in bf16. A layer that reuses another layer's
selection (GLM-5's "shared" layers) keeps no indexer keys (index_dim 0).

A slot is page * page_size + offset, the row index FlashMLA's sparse kernels take.
"""

from __future__ import annotations

import torch

from mlagen.fp8_layout import SCALE_BYTES, index_row_bytes, latent_row_bytes, scale_groups
from mlagen.runtime import fp8
from mlagen.runtime.checks import expect_int
from mlagen.runtime.paged_cache import PagedLatentCache

CACHE_DTYPES = ("model", "fp8")


class PagedSparseCache(PagedLatentCache):
    def __init__(
        self,
        batch_size: int,
        max_tokens: int,
        *,
        latent_dim: int,
        rope_dim: int,
        index_dim: int,
        page_size: int = 64,
        num_pages: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        cache_dtype: str = "model",
    ):
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
        self.fp8 = cache_dtype == "fp8"
        self.cache_dtype = cache_dtype
        self.index_dim = expect_int("index_dim", index_dim, minimum=0)
        self._dtype = dtype
        super().__init__(
            batch_size,
            max_tokens,
            latent_dim=latent_dim,
            rope_dim=rope_dim,
            page_size=page_size,
            num_pages=num_pages,
            dtype=dtype,
            device=device,
        )
        self.index_buffer: torch.Tensor | None = None
        if self.index_dim:
            width = index_row_bytes(self.index_dim) if self.fp8 else self.index_dim
            with torch.inference_mode(False):
                self.index_buffer = torch.zeros(
                    self.buffer.shape[0],
                    self.page_size,
                    width,
                    dtype=torch.uint8 if self.fp8 else dtype,
                    device=self.buffer.device,
                )

    def _new_buffer(self, num_pages: int, page_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        if not self.fp8:
            return super()._new_buffer(num_pages, page_size, dtype, device)
        width = latent_row_bytes(self.latent_dim, self.rope_dim)
        return torch.zeros(num_pages, page_size, width, dtype=torch.uint8, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def bytes_per_token(self) -> int:
        index = (
            0 if self.index_buffer is None else self.index_buffer.shape[-1] * self.index_buffer.element_size()
        )
        return self.buffer.shape[-1] * self.buffer.element_size() + index

    # --- rows as the kernels read them ---------------------------------------------------------

    def latent_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent [slots, r], rope key [slots, dr], scales [slots, groups]) over the buffer. FP8:
        e4m3 codes (uint8), bf16 rope key, fp32 scales; otherwise model-dtype rows, and the
        scales are a stand-in the kernels do not read."""
        rows = self.buffer.view(-1, self.buffer.shape[-1])
        if not self.fp8:
            return rows[:, : self.latent_dim], rows[:, self.latent_dim :], rows[:, :1]
        end = self.latent_dim + SCALE_BYTES * scale_groups(self.latent_dim)
        return (
            rows[:, : self.latent_dim],
            rows[:, end:].view(torch.bfloat16),
            rows[:, self.latent_dim : end].view(torch.float32),
        )

    def index_key_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [slots, d], scales [slots, 1]) over the indexer buffer (FP8: codes and fp32
        scales; otherwise model-dtype keys and a stand-in for the scales)."""
        assert self.index_buffer is not None, "this layer reuses another layer's selection: no indexer keys"
        rows = self.index_buffer.view(-1, self.index_buffer.shape[-1])
        if not self.fp8:
            return rows, rows[:, :1]
        return rows[:, : self.index_dim], rows[:, self.index_dim :].view(torch.float32)

    def slots(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of sequence `row`'s token positions."""
        pages = self.page_table[row, positions // self.page_size].long()
        return pages * self.page_size + positions % self.page_size

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, S, K] of each sequence's tokens (-1: none) -> slots [B, S, K] int32 (-1: none)."""
        pages = self.page_table.long().gather(1, (positions.clamp(min=0) // self.page_size).flatten(1))
        slots = pages.view_as(positions) * self.page_size + positions % self.page_size
        return torch.where(positions >= 0, slots, -1).to(torch.int32)

    # --- writing new tokens (in torch: quantising is one pass over a few rows per step) ---------

    def write_latent_rows(
        self, row: int, positions: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor
    ) -> None:
        """Store sequence `row`'s normalised latent and rotated rope key at `positions`."""
        slots = self.slots(row, positions)
        flat = self.buffer.view(-1, self.buffer.shape[-1])
        if self.fp8:
            flat[slots] = fp8.pack_latent_rows(latent, rope)
        else:
            flat[slots] = torch.cat((latent, rope), dim=-1).to(self.buffer.dtype)

    def write_index_keys(self, row: int, positions: torch.Tensor, keys: torch.Tensor) -> None:
        assert self.index_buffer is not None, "this layer reuses another layer's selection: no indexer keys"
        flat = self.index_buffer.view(-1, self.index_buffer.shape[-1])
        slots = self.slots(row, positions)
        flat[slots] = fp8.pack_index_keys(keys) if self.fp8 else keys.to(flat.dtype)

    # --- reading back (the reference path and tests) ------------------------------------------

    def gather(self, row: int) -> torch.Tensor:
        """The cached [latent | rope key] rows of one sequence, [length, r + dr], in the model
        dtype (FP8 rows dequantised)."""
        if not self.fp8:
            return super().gather(row)
        latent, rope = fp8.unpack_latent_rows(self._rows(self.buffer, row), self.latent_dim, self.rope_dim)
        return torch.cat((latent, rope.float()), dim=-1).to(self._dtype)

    def gather_index_keys(self, row: int) -> torch.Tensor:
        """The cached indexer keys of one sequence, [length, d], in the model dtype."""
        assert self.index_buffer is not None, "this layer reuses another layer's selection: no indexer keys"
        rows = self._rows(self.index_buffer, row)
        return fp8.unpack_index_keys(rows, self.index_dim).to(self._dtype) if self.fp8 else rows

    def _rows(self, buffer: torch.Tensor, row: int) -> torch.Tensor:
        row = expect_int("row", row)
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row must be a sequence index in [0, {self.batch_size}), got {row}")
        length = self.host_lengths()[row]
        pages = buffer[self.page_table[row, : -(-length // self.page_size)].long()]
        return pages.reshape(-1, buffer.shape[-1])[:length]

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace("PagedLatentCache(", "PagedSparseCache(", 1)
            .replace(", lengths", f", index_dim={self.index_dim}, cache_dtype={self.cache_dtype}, lengths", 1)
        )
