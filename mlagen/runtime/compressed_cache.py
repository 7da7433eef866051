"""The decode cache of a sequence-compressed (DeepSeek-V4) layer, and the operation table that
runs a generated forward against it.

Per sequence it holds
- a ring of the last `window` K = V rows (position p at slot p % window): all the raw keys a
  new token can still see;
- the raw projections (kv and gate, both series) of the tokens the compressor has not pooled
  for good: the unfinished window, and with overlap the window before it, whose first series
  the next entry still reads (position p at slot p % slots);
- the compressed entries, and with an indexer its keys, in pages of `page_size` entries of one
  pool (a page table row per sequence): the only state that grows, one entry per `rate` tokens.

What the pages cost per token is `bytes_per_token`; the ring and the pending projections are
a fixed cost per sequence (`fixed_bytes_per_sequence`). Bookkeeping is mirrored on the host,
so no step waits on the GPU to know where to write.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from mlagen.runtime.checks import expect_int, expect_int_list, shown
from mlagen.runtime.compressed import (
    ReferenceOps,
    attend_reference,
    compress_reference,
    index_scores_reference,
)

# The compressors of a layer, by the name its generated forward gives them (the IR node's).
COMPRESSORS = ("entries", "index_keys")


@dataclass(frozen=True, slots=True)
class CompressedCacheSpec:
    """The widths a cache needs, read from a generated module's SPEC."""

    head_dim: int
    window: int
    rate: int  # 0: no compression (sliding layers)
    overlap: bool
    index_dim: int  # 0: no indexer
    page_size: int

    @staticmethod
    def of(spec: dict[str, Any]) -> CompressedCacheSpec:
        compression = spec["compression"] or {}
        indexer = compression.get("indexer") or {}
        return CompressedCacheSpec(
            spec["head_dim"],
            spec["window"],
            compression.get("rate", 0),
            compression.get("overlap", False),
            indexer.get("head_dim", 0),
            spec["page_size"],
        )

    @property
    def series(self) -> int:
        return 2 if self.overlap else 1

    @property
    def pending_slots(self) -> int:
        """Tokens whose projections a later entry may still read."""
        return self.rate * self.series


@dataclass(frozen=True, slots=True)
class CompressorWrite:
    """Where a compressor launch reads earlier tokens and writes the entries a step closes."""

    pages: torch.Tensor  # [num_pages, page_size, dim]
    page_table: torch.Tensor  # [B, pages per sequence] int32
    page_size: int
    pending_kv: torch.Tensor  # [B, slots, C * dim]
    pending_gate: torch.Tensor
    first_new: torch.Tensor  # [B] int32: position of each sequence's first new token
    first_window: torch.Tensor  # [B] int32: its first window this step closes
    windows: torch.Tensor  # [B] int32: how many it closes
    max_windows: int


@dataclass(frozen=True, slots=True)
class CachedEntries:
    """A sequence's compressed entries (or index keys) in the cache, as a step sees them."""

    pages: torch.Tensor
    page_table: torch.Tensor
    page_size: int
    first_new: torch.Tensor  # [B] int32
    entry_counts: torch.Tensor  # [B] int32: entries each sequence has after this step's writes
    max_entries: int
    host_counts: tuple[int, ...]

    def gather(self, row: int) -> torch.Tensor:
        """Row `row`'s entries [count, dim] (the reference path)."""
        count = self.host_counts[row]
        pages = self.pages[self.page_table[row, : -(-count // self.page_size)].long()]
        return pages.reshape(-1, self.pages.shape[-1])[:count]


@dataclass(frozen=True, slots=True)
class CachedAttention:
    """What an attention launch reads besides this step's rows: the ring and the entries' pages."""

    ring: torch.Tensor  # [B, window, head_dim]
    first_new: torch.Tensor
    entry_counts: torch.Tensor
    page_table: torch.Tensor
    page_size: int


class CompressedCache:
    def __init__(
        self,
        spec: CompressedCacheSpec,
        batch_size: int,
        max_tokens: int,
        *,
        page_size: int | None = None,
        num_pages: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        batch_size = expect_int("batch_size", batch_size, minimum=1)
        max_tokens = expect_int("max_tokens", max_tokens, minimum=1)
        page_size = expect_int("page_size", spec.page_size if page_size is None else page_size, minimum=1)
        self.spec, self.batch_size, self.max_tokens, self.page_size = spec, batch_size, max_tokens, page_size
        max_entries = max_tokens // spec.rate if spec.rate else 0
        self.pages_per_sequence = max(1, -(-max_entries // page_size))
        if num_pages is None:
            num_pages = batch_size * self.pages_per_sequence
        num_pages = expect_int("num_pages", num_pages, minimum=1)
        width = spec.series * spec.head_dim
        # Normal tensors even under torch.inference_mode(): steps update them in place.
        with torch.inference_mode(False):
            self.ring = torch.zeros(batch_size, spec.window, spec.head_dim, dtype=dtype, device=device)
            self.page_table = torch.zeros(
                batch_size, self.pages_per_sequence, dtype=torch.int32, device=device
            )
            self.entries = self.pending = self.index_keys = self.index_pending = None
            if spec.rate:
                slots = spec.pending_slots
                self.entries = torch.zeros(num_pages, page_size, spec.head_dim, dtype=dtype, device=device)
                self.pending = torch.zeros(
                    2, batch_size, slots, width, dtype=dtype, device=device
                )  # kv, gate
                if spec.index_dim:
                    index_width = spec.series * spec.index_dim
                    self.index_keys = torch.zeros(
                        num_pages, page_size, spec.index_dim, dtype=dtype, device=device
                    )
                    self.index_pending = torch.zeros(
                        2, batch_size, slots, index_width, dtype=dtype, device=device
                    )
        self.dtype, self.device = dtype, self.ring.device
        self._lengths = [0] * batch_size
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._free = deque(range(num_pages))

    # --- what it costs ---------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int | float:
        """Bytes each further token costs a sequence: its share of one entry (and index key);
        a whole number for DeepSeek-V4's widths and rates."""
        if not self.spec.rate:
            return 0
        element = torch.empty((), dtype=self.dtype).element_size()
        share = (self.spec.head_dim + self.spec.index_dim) * element / self.spec.rate
        return int(share) if share.is_integer() else share

    @property
    def fixed_bytes_per_sequence(self) -> int:
        """The ring and the pending projections: what a sequence holds whatever its length."""
        per_row = self.ring[0].numel() * self.ring.element_size()
        for pending in (self.pending, self.index_pending):
            if pending is not None:
                per_row += pending[:, 0].numel() * pending.element_size()
        return per_row

    def host_lengths(self) -> list[int]:
        return list(self._lengths)

    @property
    def is_empty(self) -> bool:
        return not any(self._lengths)

    # --- a step ----------------------------------------------------------------------------------

    def step(self, hidden_states: torch.Tensor, new_tokens, spec: CompressedCacheSpec) -> CacheStep:
        """Check and reserve room for this call's new tokens (raising, with nothing written, when
        a sequence would pass max_tokens or the page pool runs out)."""
        if spec != self.spec:
            raise ValueError(
                f"the cache was made for {self.spec} but this layer is {spec}: the cache belongs to another spec"
            )
        if hidden_states.dtype != self.dtype or hidden_states.device != self.device:
            raise ValueError(
                f"the cache is {self.dtype} on {self.device} but the input is {hidden_states.dtype} on "
                f"{hidden_states.device}; create the cache with new_cache()"
            )
        batch, seqlen = hidden_states.shape[:2]
        if batch != self.batch_size:
            raise ValueError(
                f"hidden_states has batch {batch} but the cache holds {self.batch_size} sequences; "
                "create the cache with new_cache(batch_size=...) for this batch"
            )
        if new_tokens is None:
            counts = (seqlen,) * batch
        else:
            counts = tuple(expect_int_list("new_tokens", new_tokens))
            if len(counts) != batch or any(not 0 <= n <= seqlen for n in counts):
                raise ValueError(
                    f"new_tokens must give, for each of the {batch} rows, a count in [0, {seqlen}]; got {counts}"
                )
        needed = []
        for row, (length, extra) in enumerate(zip(self._lengths, counts)):
            if length + extra > self.max_tokens:
                raise ValueError(
                    f"sequence {row} would hold {length + extra} tokens, more than the cache's "
                    f"max_tokens={self.max_tokens}; create a larger cache or free sequences"
                )
            entries = (length + extra) // self.spec.rate if self.spec.rate else 0
            needed.append(-(-entries // self.page_size) - len(self._pages[row]))
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
        return CacheStep(self, tuple(self._lengths), counts)

    def free(self, rows: list[int] | None = None) -> None:
        """Forget sequences (all by default) and return their pages to the pool."""
        rows = list(range(self.batch_size)) if rows is None else expect_int_list("rows", rows)
        if any(not 0 <= row < self.batch_size for row in rows) or len(set(rows)) != len(rows):
            raise ValueError(
                f"rows must be distinct sequence indices in [0, {self.batch_size}), got {shown(rows)}"
            )
        for row in rows:
            self._free.extend(self._pages[row])
            self._pages[row] = []
            self._lengths[row] = 0

    def __repr__(self) -> str:
        return (
            f"CompressedCache(batch={self.batch_size}, max_tokens={self.max_tokens}, window={self.spec.window}, "
            f"rate={self.spec.rate}, page_size={self.page_size}, lengths={self._lengths})"
        )


class CacheStep:
    """One forward's new tokens against the cache: its positions, and the operation table that
    reads and writes the cache around the base kernels (or reference)."""

    def __init__(self, cache: CompressedCache, starts: tuple[int, ...], new_tokens: tuple[int, ...]):
        self.cache, self.starts, self.new_tokens = cache, list(starts), new_tokens
        device = cache.device
        self.first_new = torch.tensor(starts, dtype=torch.int32, device=device)
        rate = cache.spec.rate
        self.entry_counts = tuple((s + n) // rate if rate else 0 for s, n in zip(starts, new_tokens))
        self.counts_tensor = torch.tensor(self.entry_counts, dtype=torch.int32, device=device)

    def ops(self, base) -> CachedOps:
        return CachedOps(base, self)

    def commit(self) -> None:
        self.cache._lengths = [s + n for s, n in zip(self.starts, self.new_tokens)]

    def entries(self, name: str) -> CachedEntries:
        """The pages of the compressor named `name` in the forward: the layer's entries, or the
        indexer's keys."""
        assert name in COMPRESSORS, name
        cache = self.cache
        pages = cache.entries if name == "entries" else cache.index_keys
        return CachedEntries(
            pages,
            cache.page_table,
            cache.page_size,
            self.first_new,
            self.counts_tensor,
            max(self.entry_counts, default=0),
            self.entry_counts,
        )


class CachedOps:
    """The operation table of a forward over the cache: each operation of `base` (KernelOps or
    ReferenceOps) given the cache's earlier state, and the cache updated with this step's."""

    def __init__(self, base, step: CacheStep):
        self.base, self.step = base, step
        self.reference = isinstance(base, ReferenceOps)

    def compress(self, name, kv, gate, bias, norm_weight, rotary, *, rate, overlap, eps, kernel):
        step, cache = self.step, self.step.cache
        pending = cache.pending if name == "entries" else cache.index_pending  # the names COMPRESSORS gives
        view = step.entries(name)
        first = [s // rate for s in step.starts]
        closes = [count - f for count, f in zip(step.entry_counts, first)]
        if max(closes, default=0) > 0:
            if self.reference:
                self._compress_reference(
                    view,
                    pending,
                    kv,
                    gate,
                    bias,
                    norm_weight,
                    rotary,
                    first,
                    closes,
                    rate=rate,
                    overlap=overlap,
                    eps=eps,
                )
            else:
                self._compress_kernel(
                    view,
                    pending,
                    kv,
                    gate,
                    bias,
                    norm_weight,
                    rotary,
                    first,
                    closes,
                    rate=rate,
                    overlap=overlap,
                    eps=eps,
                    kernel=kernel,
                )
        self._keep_pending(pending, kv, gate)
        return view

    def _compress_kernel(
        self, view, pending, kv, gate, bias, norm_weight, rotary, first, closes, *, rate, overlap, eps, kernel
    ):
        step = self.step
        longest = max(closes)
        device = kv.device
        firsts = torch.tensor(first, dtype=torch.int32, device=device)
        positions = (firsts[:, None] + torch.arange(longest, device=device)) * rate
        cos, sin = rotary(positions, kv.dtype)
        into = CompressorWrite(
            view.pages,
            view.page_table,
            view.page_size,
            pending[0],
            pending[1],
            step.first_new,
            firsts,
            torch.tensor(closes, dtype=torch.int32, device=device),
            longest,
        )
        launch, _ = self.base.compressors[kernel]
        launch(kv, gate, bias, norm_weight, cos, sin, rate=rate, overlap=overlap, eps=eps, into=into)

    def _compress_reference(
        self, view, pending, kv, gate, bias, norm_weight, rotary, first, closes, *, rate, overlap, eps
    ):
        slots = pending.shape[2]
        for row, (start, count, first_window, close) in enumerate(
            zip(self.step.starts, self.step.new_tokens, first, closes)
        ):
            if close <= 0:
                continue
            earliest = max((first_window - (1 if overlap else 0)) * rate, 0)
            earlier = torch.arange(earliest, start, device=kv.device) % slots
            tokens_kv = torch.cat((pending[0, row, earlier], kv[row, :count]))[None]
            tokens_gate = torch.cat((pending[1, row, earlier], gate[row, :count]))[None]
            entries = compress_reference(
                tokens_kv,
                tokens_gate,
                bias,
                norm_weight,
                rotary,
                rate=rate,
                overlap=overlap,
                eps=eps,
                first_window=first_window,
                start=earliest,
            )[0, :, 0]
            index = first_window + torch.arange(close, device=kv.device)
            pages = view.page_table[row, index // view.page_size].long()
            view.pages[pages, index % view.page_size] = entries[:close].to(view.pages.dtype)

    def _keep_pending(self, pending, kv, gate):
        """This step's projections into the pending ring (the last `slots` tokens of each row)."""
        slots = pending.shape[2]
        for row, (start, count) in enumerate(zip(self.step.starts, self.step.new_tokens)):
            keep = min(count, slots)
            if keep:
                index = torch.arange(start + count - keep, start + count, device=kv.device)
                pending[0, row, index % slots] = kv[row, count - keep : count].to(pending.dtype)
                pending[1, row, index % slots] = gate[row, count - keep : count].to(pending.dtype)

    def index_scores(self, query, keys, weights, *, scale, weight_scale, rate, kernel):
        step = self.step
        if not self.reference:
            launch = self.base.indexers[kernel]
            return launch(
                query, keys.pages, weights, scale=scale, weight_scale=weight_scale, rate=rate, cached=keys
            )
        batch, seqlen = query.shape[:2]
        out = torch.full(
            (batch, seqlen, keys.max_entries), float("-inf"), dtype=torch.float32, device=query.device
        )
        for row, start in enumerate(step.starts):
            gathered = keys.gather(row)[None, :, None]
            positions = start + torch.arange(seqlen, device=query.device)[None]
            scores = index_scores_reference(
                query[row : row + 1],
                gathered,
                weights[row : row + 1],
                positions,
                scale=scale,
                weight_scale=weight_scale,
                rate=rate,
            )
            out[row, :, : scores.shape[-1]] = scores[0].to(out.dtype)
        return out

    def top_k(self, scores, k):
        return self.base.top_k(scores, k)

    def attention(self, query, key, entries, selected, sinks, cos, sin, *, scale, window, rate, kernel):
        step, cache = self.step, self.step.cache
        if self.reference:
            out = self._attention_reference(
                query, key, entries, selected, sinks, cos, sin, scale=scale, window=window, rate=rate
            )
        else:
            cached = CachedAttention(
                cache.ring, step.first_new, step.counts_tensor, cache.page_table, cache.page_size
            )
            launch, _ = self.base.attentions[kernel]
            pages = None if entries is None else entries.pages
            out, _ = launch(
                query,
                key,
                pages,
                selected,
                sinks,
                cos,
                sin,
                scale=scale,
                window=window,
                rate=rate,
                cached=cached,
            )
        self._keep_rows(key)
        return out

    def _attention_reference(self, query, key, entries, selected, sinks, cos, sin, *, scale, window, rate):
        cache = self.step.cache
        out = torch.zeros_like(query)
        seqlen = query.shape[1]
        for row, (start, count) in enumerate(zip(self.step.starts, self.step.new_tokens)):
            if count == 0:
                continue
            earlier = torch.arange(max(start - cache.spec.window, 0), start, device=query.device)
            keys = torch.cat((cache.ring[row, earlier % cache.spec.window], key[row, :seqlen, 0]))[None]
            key_positions = torch.cat((earlier, start + torch.arange(seqlen, device=query.device)))[None]
            query_positions = start + torch.arange(seqlen, device=query.device)[None]
            gathered = counts = None
            if entries is not None:
                gathered = entries.gather(row)[None]
                counts = torch.tensor([gathered.shape[1]], device=query.device)
            out[row : row + 1] = attend_reference(
                query[row : row + 1],
                query_positions,
                keys.to(query.dtype),
                key_positions,
                gathered,
                counts,
                None if selected is None else selected[row : row + 1],
                sinks,
                cos[row : row + 1],
                sin[row : row + 1],
                scale=scale,
                window=window,
                rate=max(rate, 1),
            )
        return out

    def _keep_rows(self, key):
        """This step's K = V rows into the ring (the last `window` real tokens of each row)."""
        cache = self.step.cache
        window = cache.spec.window
        for row, (start, count) in enumerate(zip(self.step.starts, self.step.new_tokens)):
            keep = min(count, window)
            if keep:
                index = torch.arange(start + count - keep, start + count, device=key.device)
                cache.ring[row, index % window] = key[row, count - keep : count, 0].to(cache.ring.dtype)
