"""The GPU suite's DeepSeek attention families: DeepSeek Sparse Attention (V3.2, GLM-5) and
DeepSeek-V4's compressed attention. Problems (random operands at one shape, their FLOPs and
bytes, the fp64 golden and the eager answer) and the contenders that run them, in the shape
runner.run_contender expects (problems.py and contenders.py hold the dense ones).

Sparse attention is checked in two parts, because a selection is discrete: the indexer's
scores against the fp64 golden scores (and the mask of keys no query may see, exactly), and
the sparse attention kernel over the golden fp64 selection against the fp64 golden
attention. A selection that bf16 rounding reorders near the k-th score would change the
output by a key's weight without anything being wrong, so the timed step (indexer, top-k,
sparse attention) is not compared end to end. Compressed layers are checked whole: the
generated module against its plain-torch reference_forward, run in fp64 (golden) and in the
benchmark dtype (eager), on a prefix for prefill and on every checked sequence for decode.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from functools import cached_property

import torch

from mlagen.bench import flops as work
from mlagen.bench.contenders import Contender, Env, Prepared, Unavailable, _autograd_step, _leaves
from mlagen.bench.problems import Outputs
from mlagen.ir.lower import softmax_scale
from mlagen.runtime import fp8
from mlagen.runtime.mla_decode import CachedTokens
from mlagen.runtime.sparse import reference_index_scores, reference_sparse_attention, top_k
from mlagen.runtime.sparse_cache import PagedSparseCache

FP32_BYTES = 4


def _randn(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def _kernel(table: dict, prefix: str) -> str:
    names = [name for name in table if name.startswith(prefix)]
    if len(names) != 1:
        raise Unavailable(f"the generated package has {len(names)} kernels named {prefix}*")
    return names[0]


def _masked(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index scores compare as (finite scores with -inf as 0, the mask of -inf as 0/1): a key
    made visible or hidden by mistake shows as an error of 1 in the mask."""
    hidden = torch.isinf(scores)
    return scores.masked_fill(hidden, 0.0), hidden.to(scores.dtype)


# --- counting -----------------------------------------------------------------------------------------


def mean_selected(seq_len: int, top_k: int) -> float:
    """Average keys a causal query attends to under top-k: min(t + 1, top_k) over t < seq_len."""
    full = min(seq_len, top_k)  # queries 0 .. full-1 see t + 1 keys, the rest top_k
    return (full * (full + 1) / 2 + (seq_len - full) * top_k) / seq_len


def sparse_prefill_work(
    spec, batch: int, seq_len: int, elem: int, train: bool, heads: int | None = None
) -> tuple[float, float]:
    """(FLOPs, bytes) of indexer + top-k + sparse MLA over a causal sequence.

    Attention: 2 * B * H * S * mean(min(t + 1, k)) * (Dqk + Dv) with the absorbed widths
    (latent + rope, latent), as FlashMLA counts its sparse prefill; x 3.5 in training.
    Indexer: every visible (query, key) pair scored by H_I heads of d_I (2 * H_I * d_I) and
    weighted (2 * H_I), causal half. Bytes, a lower bound (what must cross HBM at least once):
    queries, keys and outputs once (the rows each query gathers are not counted again: a 16k
    latent fits in L2), the indexer's operands, and its [B, S, S] fp32 scores written once and
    read once by top-k (x 3 for the attention part in training)."""
    s = spec.sparse
    heads = heads or spec.heads
    dim_qk, dim_v = spec.kv_lora_rank + spec.qk_rope_head_dim, spec.kv_lora_rank
    keys = mean_selected(seq_len, s.top_k)
    attention = 2.0 * batch * heads * seq_len * keys * (dim_qk + dim_v)
    pairs = batch * seq_len * work.mean_keys(seq_len, seq_len, causal=True)
    indexer = pairs * 2.0 * s.index_heads * (s.index_head_dim + 1)
    tokens = batch * seq_len
    moved = elem * tokens * (heads * (dim_qk + dim_v) + dim_qk)
    index_bytes = elem * tokens * (
        s.index_heads * s.index_head_dim + s.index_head_dim
    ) + FP32_BYTES * tokens * (s.index_heads + 2 * seq_len)
    if train:
        return attention * work.TRAIN_FLOPS_FACTOR + indexer, moved * work.TRAIN_BYTES_FACTOR + index_bytes
    return attention + indexer, moved + index_bytes


def sparse_decode_work(
    spec, heads: int, batch: int, cache_len: int, seq_q: int, elem: int, fp8_cache: bool
) -> tuple[float, float]:
    """(FLOPs, bytes) of one sparse decode step: every new token scores all cached indexer keys
    (2 * H_I * (d_I + 1) per key) and attends to min(top_k, visible) selected rows
    (2 * H * (Dqk + Dv) per row). Bytes: the indexer keys of the cache once (132 B per key in
    FP8, else d_I values), the selected rows once per sequence (a lower bound: the new tokens
    of a sequence select mostly the same rows), the fp32 scores written and read by top-k,
    queries and outputs. The FP8 rows are 656 B (latent e4m3 + scales + bf16 rope)."""
    s = spec.sparse
    dim_qk, dim_v = spec.kv_lora_rank + spec.qk_rope_head_dim, spec.kv_lora_rank
    selected = min(s.top_k, cache_len)
    flops = batch * seq_q * (2.0 * s.index_heads * (s.index_head_dim + 1) * cache_len)
    flops += batch * seq_q * 2.0 * heads * selected * (dim_qk + dim_v)
    if fp8_cache:
        from mlagen.fp8_layout import index_row_bytes, latent_row_bytes

        row, key = (
            latent_row_bytes(spec.kv_lora_rank, spec.qk_rope_head_dim),
            index_row_bytes(s.index_head_dim),
        )
    else:
        row, key = elem * dim_qk, elem * s.index_head_dim
    queries = batch * seq_q * (elem * heads * (dim_qk + dim_v) + elem * s.index_heads * s.index_head_dim)
    moved = batch * (cache_len * key + selected * row) + queries + 2 * FP32_BYTES * batch * seq_q * cache_len
    return flops, float(moved)


# --- DeepSeek Sparse Attention: prefill and training ---------------------------------------------------


class SparsePrefillProblem:
    """Indexer + top-k + sparse MLA (absorbed) over one causal sequence per batch row:
    q_latent [B, S, H, r], q_rope [B, S, H, dr], latent [B, S, 1, r], rope_key [B, S, 1, dr],
    index query [B, S, H_I, d_I], index key [B, S, 1, d_I], head weights [B, S, H_I] (fp32,
    as transformers keeps weights_proj). Checked on the last `check_rows` queries."""

    def __init__(self, spec, package, batch, seq_len, dtype, device, *, train: bool, check_rows: int):
        self.spec, self.package, self.batch, self.seq_len, self.dtype, self.train = (
            spec,
            package,
            batch,
            seq_len,
            dtype,
            train,
        )
        s = spec.sparse
        self.check_rows = min(check_rows, seq_len)
        self.top_k = s.top_k
        self.scale = softmax_scale(spec.qk_head_dim, spec.rope)
        self.index_scale, self.weight_scale = s.index_head_dim**-0.5, s.index_heads**-0.5
        b, n, h, r, dr = batch, seq_len, spec.heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        self.q_latent = _randn((b, n, h, r), dtype, device)
        self.q_rope = _randn((b, n, h, dr), dtype, device)
        self.latent = _randn((b, n, 1, r), dtype, device)
        self.rope_key = _randn((b, n, 1, dr), dtype, device)
        self.index_query = _randn((b, n, s.index_heads, s.index_head_dim), dtype, device)
        self.index_key = _randn((b, n, 1, s.index_head_dim), dtype, device)
        self.index_weights = _randn((b, n, s.index_heads), torch.float32, device)
        self.grad_out = _randn((b, self.check_rows, h, r), dtype, device) if train else None
        self.timing_grad_out = _randn((b, n, h, r), dtype, device) if train else None
        self.indexer_name = _kernel(package.kernels.SPARSE, "indexer_logits_")
        self.sparse_name = _kernel(package.kernels.SPARSE, "sparse_mla_")
        self._expected: dict[torch.dtype, Outputs] = {}

    @property
    def output_names(self) -> tuple[str, ...]:
        names = ("index_scores", "index_mask", "out")
        return names + ("dq_latent", "dq_rope", "d_latent", "d_rope_key") if self.train else names

    @property
    def work(self) -> tuple[float, float]:
        return sparse_prefill_work(
            self.spec, self.batch, self.seq_len, self.q_latent.element_size(), self.train
        )

    @property
    def flops(self) -> float:
        return self.work[0]

    @property
    def bytes(self) -> float:
        return self.work[1]

    def shape(self) -> dict:
        return {
            "q_latent": list(self.q_latent.shape),
            "q_rope": list(self.q_rope.shape),
            "latent": list(self.latent.shape),
            "index_query": list(self.index_query.shape),
            "top_k": self.top_k,
            "checked_rows": self.check_rows,
        }

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, -self.check_rows :]

    def index_scores(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference scores of the checked rows, in fp32 (fp64 for the golden)."""
        return reference_index_scores(
            self.rows(self.index_query).to(dtype),
            self.index_key.to(dtype),
            self.rows(self.index_weights).to(torch.float64 if dtype == torch.float64 else torch.float32),
            scale=self.index_scale,
            weight_scale=self.weight_scale,
        )

    @cached_property
    def golden_selection(self) -> torch.Tensor:
        """The checked rows' top-k keys by the fp64 scores: the selection every attention check uses."""
        return top_k(self.index_scores(torch.float64), self.top_k)

    def attention_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(
            t.to(dtype)
            for t in (self.rows(self.q_latent), self.rows(self.q_rope), self.latent, self.rope_key)
        )

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype in self._expected:
            return self._expected[dtype]
        scores = _masked(self.index_scores(dtype))
        leaves = [t.detach().requires_grad_(self.train) for t in self.attention_operands(dtype)]
        index = self.golden_selection
        with torch.enable_grad():
            out = reference_sparse_attention(
                *leaves[:2], leaves[2], leaves[3], leaves[2], index=index, scale=self.scale
            )
            grads = torch.autograd.grad(out, leaves, self.grad_out.to(dtype)) if self.train else ()
        self._expected[dtype] = (*scores, out.detach(), *grads)
        return self._expected[dtype]

    # what the mlagen contender runs

    def select(self) -> torch.Tensor:
        scores = self.package.kernels.SPARSE[self.indexer_name](
            self.index_query,
            self.index_key,
            self.index_weights,
            scale=self.index_scale,
            weight_scale=self.weight_scale,
        )
        return top_k(scores, self.top_k)

    def attend(self, q_latent, q_rope, latent, rope_key, index) -> torch.Tensor:
        attention = self.package.kernels.SPARSE[self.sparse_name]
        return attention(q_latent, q_rope, latent, rope_key, latent, index=index, scale=self.scale)


def _mlagen_sparse_prefill(problem: SparsePrefillProblem, env: Env) -> Prepared:
    p = problem

    def check() -> Outputs:
        scores = p.package.kernels.SPARSE[p.indexer_name](
            p.index_query, p.index_key, p.index_weights, scale=p.index_scale, weight_scale=p.weight_scale
        )
        leaves = _leaves(p.attention_operands(p.dtype)) if p.train else p.attention_operands(p.dtype)
        with torch.set_grad_enabled(p.train):
            out = p.attend(*leaves, p.golden_selection)
            grads = torch.autograd.grad(out, leaves, p.grad_out) if p.train else ()
        return (*_masked(p.rows(scores)), out.detach(), *grads)

    if not p.train:
        return Prepared(
            torch.no_grad()(lambda: p.attend(p.q_latent, p.q_rope, p.latent, p.rope_key, p.select())), check
        )
    leaves = _leaves((p.q_latent, p.q_rope, p.latent, p.rope_key))

    def step():
        with torch.no_grad():  # the selection is not differentiable
            index = p.select()
        return _autograd_step(lambda *t: p.attend(*t, index), leaves, p.timing_grad_out)()

    return Prepared(step, check)


def _flash_mla_sparse_prefill(problem: SparsePrefillProblem, env: Env) -> Prepared:
    """FlashMLA's sparse prefill (flash_mla_sparse_fwd: the absorbed MQA form, q [S, H, 576],
    kv [T, 1, 576], indices [S, 1, k]) on each sequence of the batch, over the golden selection
    at the check and its own top-k of mlagen's indexer scores when timed (it has no indexer)."""
    try:
        import flash_mla
    except ImportError:
        raise Unavailable("not installed (FlashMLA: CUDA, sm_90 / sm_100, built from source)") from None
    if env.device.type != "cuda":
        raise Unavailable("FlashMLA needs a CUDA GPU")
    p = problem
    if p.train:
        raise Unavailable("FlashMLA's sparse kernels have no backward")
    sparse_forward = getattr(flash_mla, "flash_mla_sparse_fwd", None)
    if sparse_forward is None:
        raise Unavailable(f"flash_mla {getattr(flash_mla, '__version__', '?')} has no flash_mla_sparse_fwd")
    heads = p.spec.heads
    if heads not in (64, 128):
        raise Unavailable(f"FlashMLA's sparse prefill takes 64 or 128 heads, not {heads}")

    def run(q_latent, q_rope, latent, rope_key, index):
        outs = []
        for b in range(q_latent.shape[0]):
            q = torch.cat((q_latent[b], q_rope[b]), -1)
            kv = torch.cat((latent[b], rope_key[b]), -1)
            out = sparse_forward(
                q, kv, index[b].unsqueeze(1).to(torch.int32).contiguous(), p.scale, p.spec.kv_lora_rank
            )
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.stack(outs)

    def check() -> Outputs:
        golden = p.expected(torch.float64)
        out = run(*p.attention_operands(p.dtype), p.golden_selection)
        return (*golden[:2], out)  # no indexer: its scores are the golden's, so only `out` is judged

    step = torch.no_grad()(lambda: run(p.q_latent, p.q_rope, p.latent, p.rope_key, p.select()))
    return Prepared(step, check)


# --- DeepSeek Sparse Attention: decode over the paged latent cache -------------------------------------


def filled_sparse_cache(spec, batch, cache_len, dtype, device, cache_dtype: str) -> PagedSparseCache:
    """A paged sparse cache holding `cache_len` random rows (latent, rope key, indexer key) per
    sequence, bf16/fp32 or in the FP8 layout (quantised in chunks: a 32k x 64 cache is 2M rows)."""
    s = spec.sparse
    cache = PagedSparseCache(
        batch,
        cache_len,
        latent_dim=spec.kv_lora_rank,
        rope_dim=spec.qk_rope_head_dim,
        index_dim=s.index_head_dim,
        page_size=spec.page_size,
        dtype=dtype,
        device=device,
        cache_dtype=cache_dtype,
    )
    cache.reserve([cache_len] * batch)
    if cache_dtype == "fp8":
        rows = cache.buffer.view(-1, cache.buffer.shape[-1])
        keys = cache.index_buffer.view(-1, cache.index_buffer.shape[-1])
        chunk = 1 << 18
        for start in range(0, rows.shape[0], chunk):
            n = min(chunk, rows.shape[0] - start)
            rows[start : start + n] = fp8.pack_latent_rows(
                _randn((n, spec.kv_lora_rank), torch.float32, device),
                _randn((n, spec.qk_rope_head_dim), torch.float32, device),
            )
            keys[start : start + n] = fp8.pack_index_keys(
                _randn((n, s.index_head_dim), torch.float32, device)
            )
    else:
        cache.buffer.normal_()
        cache.index_buffer.normal_()
    cache.commit([cache_len] * batch)
    return cache


def exact_rows(cache: PagedSparseCache, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent | rope rows [T, r + dr], indexer keys [T, d]) of one sequence in fp64, exactly
    as stored (FP8 codes times their scales, without the model-dtype rounding of gather())."""
    if not cache.fp8:
        return cache.gather(row).double(), cache.gather_index_keys(row).double()
    latent, rope = fp8.unpack_latent_rows(cache._rows(cache.buffer, row), cache.latent_dim, cache.rope_dim)
    keys = fp8.unpack_index_keys(cache._rows(cache.index_buffer, row), cache.index_dim)
    return torch.cat((latent.double(), rope.double()), -1), keys.double()


class SparseDecodeProblem:
    """One sparse decode step: `seq_q` new tokens per sequence (the newest rows of a cache of
    `cache_len` rows), index scores over every cached indexer key, top-k, sparse attention
    over the selected rows. Checked on `check_batch` sequences spread over the batch."""

    def __init__(self, spec, package, cache: PagedSparseCache, seq_q, heads, dtype, device, check_batch):
        s = spec.sparse
        self.spec, self.package, self.cache, self.seq_q, self.heads, self.dtype = (
            spec,
            package,
            cache,
            seq_q,
            heads,
            dtype,
        )
        batch, self.cache_len = cache.batch_size, cache.host_lengths()[0]
        self.batch = batch
        count = min(check_batch, batch)
        self.checked_sequences = tuple(
            batch - 1 - (batch - 1) * i // max(count - 1, 1) for i in range(count)
        )[::-1]
        self.cached = CachedTokens(cache, cache.lengths - seq_q, (seq_q,) * batch)
        self.top_k = s.top_k
        self.scale = softmax_scale(spec.qk_head_dim, spec.rope)
        self.index_scale, self.weight_scale = s.index_head_dim**-0.5, s.index_heads**-0.5
        r, dr = spec.kv_lora_rank, spec.qk_rope_head_dim
        self.q_latent = _randn((batch, seq_q, heads, r), dtype, device)
        self.q_rope = _randn((batch, seq_q, heads, dr), dtype, device)
        self.index_query = _randn((batch, seq_q, s.index_heads, s.index_head_dim), dtype, device)
        self.index_weights = _randn((batch, seq_q, s.index_heads), torch.float32, device)
        self.ops = package.kernels.SPARSE_DECODE
        self._expected: dict[torch.dtype, Outputs] = {}
        self._golden: dict[int, tuple[torch.Tensor, ...]] = {}

    output_names = ("index_scores", "index_mask", "out")

    @property
    def work(self) -> tuple[float, float]:
        return sparse_decode_work(
            self.spec,
            self.heads,
            self.batch,
            self.cache_len,
            self.seq_q,
            self.q_latent.element_size(),
            self.cache.fp8,
        )

    @property
    def flops(self) -> float:
        return self.work[0]

    @property
    def bytes(self) -> float:
        return self.work[1]

    def shape(self) -> dict:
        return {
            "q_latent": list(self.q_latent.shape),
            "index_query": list(self.index_query.shape),
            "cache": list(self.cache.buffer.shape),
            "cache_dtype": self.cache.cache_dtype,
            "cache_len": self.cache_len,
            "top_k": self.top_k,
            "checked_sequences": list(self.checked_sequences),
        }

    def _scores(self, row: int, dtype: torch.dtype) -> torch.Tensor:
        rows, keys = exact_rows(self.cache, row)
        if dtype != torch.float64:  # eager: the cache as the reference path reads it
            keys = self.cache.gather_index_keys(row)
        one = slice(row, row + 1)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return reference_index_scores(
            self.index_query[one].to(dtype),
            keys.to(dtype)[None, :, None],
            self.index_weights[one].to(wide),
            scale=self.index_scale,
            weight_scale=self.weight_scale,
        )

    @cached_property
    def golden_selection(self) -> torch.Tensor:
        """[checked, Sq, k] positions by the fp64 scores."""
        return torch.cat(
            [top_k(self._scores(row, torch.float64), self.top_k) for row in self.checked_sequences]
        )

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype in self._expected:
            return self._expected[dtype]
        scores, outs = [], []
        r = self.cache.latent_dim
        for i, row in enumerate(self.checked_sequences):
            scores.append(self._scores(row, dtype))
            rows = exact_rows(self.cache, row)[0] if dtype == torch.float64 else self.cache.gather(row)
            rows = rows.to(dtype)[None, :, None]
            one = slice(row, row + 1)
            outs.append(
                reference_sparse_attention(
                    self.q_latent[one].to(dtype),
                    self.q_rope[one].to(dtype),
                    rows[..., :r],
                    rows[..., r:],
                    rows[..., :r],
                    index=self.golden_selection[i : i + 1],
                    scale=self.scale,
                )
            )
        self._expected[dtype] = (*_masked(torch.cat(scores)), torch.cat(outs))
        return self._expected[dtype]

    def checked(self, t: torch.Tensor) -> torch.Tensor:
        return t[list(self.checked_sequences)]

    def select(self) -> torch.Tensor:
        scores = self.ops.index_scores(
            self.index_query,
            self.index_weights,
            self.cached,
            scale=self.index_scale,
            weight_scale=self.weight_scale,
        )
        return top_k(scores, self.top_k)


def _mlagen_sparse_decode(problem: SparseDecodeProblem, env: Env) -> Prepared:
    p = problem

    def step():
        return p.ops.attend_sparse(p.q_latent, p.q_rope, p.cached, p.select(), scale=p.scale)

    def check() -> Outputs:
        scores = p.ops.index_scores(
            p.index_query, p.index_weights, p.cached, scale=p.index_scale, weight_scale=p.weight_scale
        )
        positions = top_k(scores, p.top_k)
        positions[list(p.checked_sequences)] = (
            p.golden_selection
        )  # attention judged over the golden selection
        out = p.ops.attend_sparse(p.q_latent, p.q_rope, p.cached, positions, scale=p.scale)
        return (*_masked(p.checked(scores)), p.checked(out))

    return Prepared(torch.no_grad()(step), torch.no_grad()(check))


def _flash_mla_sparse_decode(problem: SparseDecodeProblem, env: Env) -> Prepared:
    """FlashMLA's sparse decode (flash_mla_with_kvcache with indices, FP8 cache in the same
    656-byte layout, slots as page * 64 + offset) over mlagen's cache as is."""
    try:
        import flash_mla
    except ImportError:
        raise Unavailable("not installed (FlashMLA: CUDA, sm_90 / sm_100, built from source)") from None
    if env.device.type != "cuda":
        raise Unavailable("FlashMLA needs a CUDA GPU")
    p, cache = problem, problem.cache
    if not cache.fp8:
        raise Unavailable("FlashMLA's sparse decode reads the FP8 cache layout only")
    if p.heads not in (64, 128):
        raise Unavailable(f"FlashMLA's sparse decode takes 64 or 128 heads per rank, not {p.heads}")
    if cache.page_size != 64:
        raise Unavailable(f"FlashMLA reads pages of 64 tokens; this cache's page_size is {cache.page_size}")
    q = torch.cat((p.q_latent, p.q_rope), -1)
    pages = cache.buffer.view(torch.float8_e4m3fn).unsqueeze(2)
    try:
        metadata, splits = flash_mla.get_mla_metadata(
            cache.lengths, p.seq_q * p.heads, 1, p.heads, is_fp8_kvcache=True, topk=p.top_k
        )
    except TypeError as exc:
        raise Unavailable(f"this flash_mla's get_mla_metadata has no sparse options: {exc}") from None

    def attend(positions):
        slots = cache.slots_of(positions)
        out, _ = flash_mla.flash_mla_with_kvcache(
            q,
            pages,
            cache.page_table,  # the slots already name pages; passed as its dense decode takes them
            cache.lengths,
            cache.latent_dim,
            metadata,
            splits,
            softmax_scale=p.scale,
            causal=False,
            is_fp8_kvcache=True,
            indices=slots,
        )
        return out

    def check() -> Outputs:
        golden = p.expected(torch.float64)
        positions = p.select()
        positions[list(p.checked_sequences)] = p.golden_selection
        return (*golden[:2], p.checked(attend(positions)))  # no indexer: only `out` is judged

    return Prepared(torch.no_grad()(lambda: attend(p.select())), torch.no_grad()(check))


def _dense_decode_unavailable_for_fp8(prepare: Callable) -> Callable:
    """The dense absorbed decode kernel reads model-dtype rows: refuse an FP8 cache by name."""

    def guarded(problem, env: Env) -> Prepared:
        if getattr(problem.inputs.cached.cache, "fp8", False):
            raise Unavailable(
                "mlagen's dense absorbed decode reads model-dtype caches; FP8 rows are read by the sparse kernels only"
            )
        return prepare(problem, env)

    return guarded


# --- DeepSeek-V4 compressed attention ------------------------------------------------------------------


def _linear_weights(module: torch.nn.Module) -> int:
    """Weights of the projections (nn.Linear and the grouped o_a_proj), 2 FLOPs per token each."""
    total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "GroupedLinear":
            total += m.weight.numel()
    return total


def compressed_keys(spec, position: int) -> tuple[int, int, int]:
    """(raw window keys, attended entries, entries the indexer scores) of a query at `position`."""
    raw = min(spec.window, position + 1)
    c = spec.compression
    if c is None:
        return raw, 0, 0
    visible = (position + 1) // c.rate
    if c.indexer is None:
        return raw, visible, 0
    return raw, min(visible, c.indexer.top_k), visible


@functools.lru_cache(maxsize=256)  # the planner asks again for every contender of a point
def compressed_attention_work(spec, batch: int, start: int, seq_q: int) -> tuple[float, float]:
    """(attention FLOPs, indexer FLOPs) of `seq_q` queries at positions start..start+seq_q-1:
    per query 2 * H * (window keys + attended entries) * (D + D) (K = V, D = head_dim), and
    for CSA 2 * H_I * (d_I + 1) per scored entry; summed exactly over the positions."""
    attention = indexer = 0.0
    for position in range(start, start + seq_q):
        raw, attended, scored = compressed_keys(spec, position)
        attention += 2.0 * spec.heads * (raw + attended) * 2 * spec.head_dim
        if scored:
            i = spec.compression.indexer
            indexer += 2.0 * i.heads * (i.head_dim + 1) * scored
    return batch * attention, batch * indexer


def compressed_weights(spec) -> int:
    """Projection weights of a DeepSeek-V4 layer from its spec (the planner's count; the problems
    count the module's own): q_a, q_b, kv, o_a (grouped: H * D x o_lora), o_b, and the
    compressor's and the indexer's kv / gate / query / head-weight projections."""
    s, c = spec, spec.compression
    weights = s.d_model * s.q_lora_rank + s.q_lora_rank * s.heads * s.head_dim + s.d_model * s.head_dim
    weights += s.heads * s.head_dim * s.o_lora_rank + s.o_groups * s.o_lora_rank * s.d_model
    if c is not None:
        weights += 2 * s.d_model * c.series * s.head_dim
        if c.indexer is not None:
            i = c.indexer
            weights += (
                2 * s.d_model * c.series * i.head_dim
                + s.q_lora_rank * i.heads * i.head_dim
                + s.d_model * i.heads
            )
    return weights


def _compressor_flops(spec, tokens: int) -> float:
    """The gated pooling: softmax over the slots and the weighted sum, ~4 FLOPs per slot value."""
    c = spec.compression
    if c is None:
        return 0.0
    widths = spec.head_dim + (c.indexer.head_dim if c.indexer else 0)
    return 4.0 * tokens * c.series * widths


class CompressedPrefillProblem:
    """The whole generated DeepSeek-V4 layer: hidden_states [B, S, d_model] -> [B, S, d_model],
    forward or forward + backward; checked on a prefix of `check_len` tokens."""

    def __init__(self, spec, package, batch, seq_len, dtype, device, *, train: bool, check_len: int):
        self.spec, self.batch, self.seq_len, self.dtype, self.train = spec, batch, seq_len, dtype, train
        self.check_len = min(check_len, seq_len)
        torch.manual_seed(0)
        self.module = _random_layer(package, dtype, device)
        self.x = _randn((batch, seq_len, spec.d_model), dtype, device)
        self.grad_out = _randn((batch, seq_len, spec.d_model), dtype, device) if train else None
        self._expected: dict[torch.dtype, Outputs] = {}

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("out", "d_hidden_states") if self.train else ("out",)

    @property
    def flops(self) -> float:
        """Attention over window + attended entries, the CSA indexer, the pooling, and 2 FLOPs
        per projection weight per token (training: attention x 3.5, projections x 3, the
        indexer and the pooling as forward + 2 x backward)."""
        attention, indexer = compressed_attention_work(self.spec, self.batch, 0, self.seq_len)
        tokens = self.batch * self.seq_len
        linears = 2.0 * tokens * _linear_weights(self.module)
        pooling = _compressor_flops(self.spec, tokens)
        if self.train:
            return attention * work.TRAIN_FLOPS_FACTOR + 3 * (linears + pooling) + indexer
        return attention + indexer + linears + pooling

    @property
    def bytes(self) -> float:
        """A lower bound: every weight once, the input read and the output written (x 3 in training)."""
        elem = self.x.element_size()
        moved = elem * (sum(p.numel() for p in self.module.parameters()) + 2 * self.x.numel())
        return moved * (work.TRAIN_BYTES_FACTOR if self.train else 1.0)

    def shape(self) -> dict:
        return {"hidden_states": list(self.x.shape), "checked_prefix": self.check_len}

    def prefix(self):
        x = self.x[:, : self.check_len]
        return x, None if self.grad_out is None else self.grad_out[:, : self.check_len]

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype not in self._expected:
            module = self.module if dtype == self.dtype else copy.deepcopy(self.module).to(dtype)
            x, grad_out = self.prefix()
            x = x.to(dtype)
            if not self.train:
                with torch.no_grad():
                    self._expected[dtype] = (module.reference_forward(x),)
            else:
                x = x.detach().requires_grad_()
                with torch.enable_grad():
                    out = module.reference_forward(x)
                    (grad_x,) = torch.autograd.grad(out, x, grad_out.to(dtype))
                self._expected[dtype] = (out.detach(), grad_x)
        return self._expected[dtype]


def _random_layer(package, dtype, device) -> torch.nn.Module:
    """The layer with weights of unit-variance outputs, sinks and position biases included
    (zeros would leave the sink and the gate's bias untested)."""
    module = package.Attention(dtype=dtype, device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "position_bias" not in name:
                param.normal_(0.0, param.shape[-1] ** -0.5)
            else:
                param.normal_(0.0, 0.5 if "bias" in name or "sinks" in name else 0.1).add_(
                    1.0 if "norm" in name else 0.0
                )
    return module


def fill_compressed_cache(cache, lengths: list[int]) -> None:
    """Hold `lengths` tokens per sequence of random state (the ring, the pending projections,
    every entry and indexer key), pages reserved as steps would have: filling a 32k-token
    cache by running the layer would cost more than the whole suite."""
    generator_state = [
        t
        for t in (cache.ring, cache.pending, cache.entries, cache.index_keys, cache.index_pending)
        if t is not None
    ]
    for tensor in generator_state:
        tensor.normal_()
    rate = cache.spec.rate
    for row, length in enumerate(lengths):
        needed = -(-(length // rate) // cache.page_size) if rate else 0
        while len(cache._pages[row]) < needed:
            page = cache._free.popleft()
            cache.page_table[row, len(cache._pages[row])] = page
            cache._pages[row].append(page)
    cache._lengths = list(lengths)


class CompressedDecodeProblem:
    """One decode step of the whole layer: `seq_q` new tokens per sequence over a cache that
    holds cache_len - seq_q tokens (random state). The step writes the cache, so every call
    (timed or checked) starts from the same state again: the lengths, and the ring and pending
    rows the step overwrites (seq_q rows per sequence, put back inside the timed call: a copy
    of a few KB). Entries it closes are recomputed from those rows, so they come out the same."""

    def __init__(self, spec, package, batch, cache_len, seq_q, dtype, device, check_batch):
        self.spec, self.batch, self.cache_len, self.seq_q, self.dtype = spec, batch, cache_len, seq_q, dtype
        torch.manual_seed(0)
        self.module = _random_layer(package, dtype, device)
        self.cache = self.module.new_cache(batch, cache_len)
        self.start = cache_len - seq_q
        fill_compressed_cache(self.cache, [self.start] * batch)
        self._overwritten = {}  # state name -> (slots this step writes, their values before it)
        positions = torch.arange(self.start, cache_len, device=device)
        for name, tensor, slots in (
            ("ring", self.cache.ring, spec.window),
            ("pending", self.cache.pending, self.cache.spec.pending_slots),
            ("index_pending", self.cache.index_pending, self.cache.spec.pending_slots),
        ):
            if tensor is not None:
                index = positions % slots
                values = tensor[:, index].clone() if name == "ring" else tensor[:, :, index].clone()
                self._overwritten[name] = (index, values)
        self.x = _randn((batch, seq_q, spec.d_model), dtype, device)
        count = min(check_batch, batch)
        self.checked_sequences = tuple(
            batch - 1 - (batch - 1) * i // max(count - 1, 1) for i in range(count)
        )[::-1]
        self._expected: dict[torch.dtype, Outputs] = {}

    output_names = ("out",)

    @property
    def flops(self) -> float:
        attention, indexer = compressed_attention_work(self.spec, self.batch, self.start, self.seq_q)
        tokens = self.batch * self.seq_q
        return (
            attention
            + indexer
            + 2.0 * tokens * _linear_weights(self.module)
            + _compressor_flops(self.spec, tokens)
        )

    @property
    def bytes(self) -> float:
        """Weights once, and per sequence what its new tokens read of the cache: the ring, the
        pending projections, the attended entries (HCA: every visible one; CSA: the top-k) and
        for CSA every indexer key (the selected entries counted once per sequence: a lower bound)."""
        elem = self.x.element_size()
        s, c = self.spec, self.spec.compression
        per_sequence = s.window * s.head_dim
        if c is not None:
            per_sequence += 2 * c.rate * c.series * (s.head_dim + (c.indexer.head_dim if c.indexer else 0))
            _, attended, scored = compressed_keys(s, self.cache_len - 1)
            per_sequence += attended * s.head_dim + scored * (c.indexer.head_dim if c.indexer else 0)
        weights = sum(p.numel() for p in self.module.parameters())
        return float(elem * (weights + self.batch * per_sequence + 2 * self.x.numel()))

    def shape(self) -> dict:
        return {
            "hidden_states": list(self.x.shape),
            "cache_len": self.cache_len,
            "checked_sequences": list(self.checked_sequences),
        }

    def run(self, forward: Callable, cache) -> torch.Tensor:
        """The step from the state before it (the cache's own, or its fp64 copy's)."""
        cache._lengths = [self.start] * self.batch
        for name, (index, values) in self._overwritten.items():
            if name == "ring":
                cache.ring[:, index] = values.to(cache.dtype)
            else:
                getattr(cache, name)[:, :, index] = values.to(cache.dtype)
        return forward(self.x.to(cache.dtype), cache=cache)

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype not in self._expected:
            module = self.module if dtype == self.dtype else copy.deepcopy(self.module).to(dtype)
            cache = self.cache if dtype == self.dtype else _cache_in(self.cache, module, dtype)
            with torch.no_grad():
                out = self.run(module.reference_forward, cache)
            self._expected[dtype] = (out[list(self.checked_sequences)],)
        return self._expected[dtype]


def _cache_in(cache, module, dtype):
    """A copy of `cache` in `dtype` (its state, its pages and bookkeeping)."""
    copied = module.new_cache(cache.batch_size, cache.max_tokens)
    for name in ("ring", "pending", "entries", "index_keys", "index_pending"):
        tensor = getattr(cache, name)
        if tensor is not None:
            getattr(copied, name).copy_(tensor.to(dtype))
    copied.page_table.copy_(cache.page_table)
    copied._pages = [list(p) for p in cache._pages]
    copied._free = copy.copy(cache._free)
    copied._lengths = list(cache._lengths)
    return copied


def _compressed_module(use_reference: bool) -> Callable:
    def prepare(problem, env: Env) -> Prepared:
        module = problem.module
        forward = module.reference_forward if use_reference else module.forward
        if use_reference and env.device.type == "cuda":
            _refuse_huge_reference(problem)
        if isinstance(problem, CompressedDecodeProblem):
            step = torch.no_grad()(lambda: problem.run(forward, problem.cache))
            return Prepared(step, lambda: (step()[list(problem.checked_sequences)],))
        if not problem.train:
            if use_reference:  # one sequence at a time: the batch at once would hold B x the scores
                step = torch.no_grad()(lambda: torch.cat([forward(x) for x in problem.x.split(1)]))
            else:
                step = torch.no_grad()(lambda: forward(problem.x))
            return Prepared(step, torch.no_grad()(lambda: (forward(problem.prefix()[0]),)))
        x = problem.x.detach().requires_grad_()
        parameters = [p for p in module.parameters() if p.requires_grad]

        def step():
            out = forward(x)
            # allow_unused: the indexer's weights get no gradient (the selection is not differentiable)
            return out, torch.autograd.grad(out, [x, *parameters], problem.grad_out, allow_unused=True)

        def check():
            prefix, grad_out = problem.prefix()
            prefix = prefix.detach().requires_grad_()
            out = forward(prefix)
            return out, torch.autograd.grad(out, prefix, grad_out)[0]

        return Prepared(step, check)

    return prepare


REFERENCE_SCORE_BYTES = 12 << 30  # the eager reference's largest fp32 score matrix it is let allocate


def _refuse_huge_reference(problem) -> None:
    """The eager reference materialises [B, H, S, S + W] fp32 scores, and about five more tensors
    of that size (the mask, the entries' part, the sink column, the softmax): refuse by the size
    instead of running out of memory mid-suite. Prefill runs it one sequence at a time; training
    keeps every sequence's graph (and the scores' gradients) at once."""
    if isinstance(problem, CompressedDecodeProblem):
        return
    s = problem.spec
    entries = problem.seq_len // s.compression.rate if s.compression else 0
    sequences = problem.batch * 3 if problem.train else 1
    need = 4 * sequences * s.heads * problem.seq_len * (problem.seq_len + entries)
    if need > REFERENCE_SCORE_BYTES:
        raise Unavailable(
            f"the eager reference materialises [B, H, S, S + W] fp32 scores: {need / 2**30:.0f} GiB here "
            f"(the suite lets it take {REFERENCE_SCORE_BYTES >> 30} GiB, about a sixth of its peak)"
        )


def _flash_mla_model1(problem, env: Env) -> Prepared:
    try:
        import flash_mla
    except ImportError:
        raise Unavailable(
            "not installed (FlashMLA's MODEL1 kernels: CUDA, sm_90 / sm_100 / sm_120, built from source)"
        ) from None
    raise Unavailable(
        f"flash_mla {getattr(flash_mla, '__version__', '?')} imports, but the suite has no adapter for its MODEL1 "
        "(DeepSeek-V4) kernels yet: their compressed cache is the 584-byte FP8 entry layout, not mlagen's"
    )


# --- the contenders ------------------------------------------------------------------------------------


def _sparse(prefill: Callable, decode: Callable) -> Callable:
    def prepare(problem, env: Env) -> Prepared:
        return (decode if isinstance(problem, SparseDecodeProblem) else prefill)(problem, env)

    return prepare


def _dense_mla(problem, env: Env) -> Prepared:
    """The dense MLA path of the same shape: DeepSeek-V3's expanded prefill kernel (192/128 per
    head, what mlagen runs for V3), or the absorbed decode kernel over every cached row."""
    from mlagen.bench.contenders import _mlagen_attention, _mlagen_decode

    if hasattr(problem, "inputs"):  # AbsorbedDecodeProblem over the sparse layer's own cache
        return _dense_decode_unavailable_for_fp8(_mlagen_decode)(problem, env)
    return _mlagen_attention(problem, Env(problem.package, env.device, env.smoke))


SPARSE_CONTENDERS = (
    Contender(
        "mlagen",
        "sparse",
        "mlagen's lightning indexer kernel, torch.topk, and its sparse MLA kernel (prefill: absorbed, "
        "training: with its backward; decode: over the paged bf16 or FP8 cache, split-KV over the selection)",
        _sparse(_mlagen_sparse_prefill, _mlagen_sparse_decode),
    ),
    Contender(
        "dense-mlagen",
        "dense",
        "what DSA saves: mlagen's dense MLA at the same shape (prefill and training: DeepSeek-V3's expanded "
        "192/128 kernel; decode: the absorbed kernel over every cached row)",
        _dense_mla,
    ),
    Contender(
        "flashmla-sparse",
        "sparse",
        "FlashMLA's sparse kernels (flash_mla_sparse_fwd; flash_mla_with_kvcache with indices over the FP8 "
        "cache) on mlagen's selection",
        _sparse(_flash_mla_sparse_prefill, _flash_mla_sparse_decode),
    ),
)

COMPRESSED_CONTENDERS = (
    Contender(
        "mlagen",
        "compressed",
        "the generated DeepSeek-V4 layer: compressor, indexer (CSA) and window + entries attention in "
        "mlagen's kernels (decode: over its compressed cache)",
        _compressed_module(False),
    ),
    Contender(
        "reference",
        "compressed",
        "the same layer's reference_forward: compressor, indexer and attention in eager torch",
        _compressed_module(True),
    ),
    Contender(
        "flashmla-model1",
        "compressed",
        "FlashMLA's MODEL1 (DeepSeek-V4) kernels, where importable",
        _flash_mla_model1,
    ),
)
