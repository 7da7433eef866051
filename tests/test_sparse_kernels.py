"""The sparse attention kernels of tiny_dsa against their plain-torch references, under the
Triton interpreter: the indexer logits (prefill and over the paged cache, bf16 and FP8 keys),
sparse MLA forward (any head count; fp32 and fp16 against the fp64 golden), its backward
(fp64 gradcheck, and fp32 against autograd through the reference), paged sparse decode with
split-KV and 1 to 4 new tokens, the FP8 cache rows, and keys outside the selection, which must
not reach a query even when they hold NaN.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import triton
import triton.language as tl

from mlagen.runtime import fp8
from mlagen.runtime.mla_decode import CachedTokens
from mlagen.runtime.sparse import (
    SparseConfig,
    reference_index_scores,
    reference_index_scores_over_cache,
    reference_sparse_attention,
    reference_sparse_attention_over_cache,
    top_k,
)
from mlagen.runtime.sparse_cache import PagedSparseCache
from tests.helpers import ROOT, assert_close_to_golden, generated

PACKAGE = generated("tiny_dsa")
KERNELS = PACKAGE.kernels
LATENT, ROPE, INDEX_DIM = 32, 8, 32
SCALE = 0.2


def random_index(batch: int, seqlen_q: int, seqlen_k: int, keys: int, gen: torch.Generator) -> torch.Tensor:
    """Per query, `keys` distinct causal positions (the last query sees the last key), -1 past
    what is visible: what top_k gives."""
    index = torch.full((batch, seqlen_q, keys), -1, dtype=torch.int32)
    for b in range(batch):
        for s in range(seqlen_q):
            visible = s + seqlen_k - seqlen_q + 1
            chosen = torch.randperm(visible, generator=gen)[:keys]
            index[b, s, : len(chosen)] = chosen.to(torch.int32)
    return index


def operands(batch, seqlen_q, seqlen_k, heads, dtype, gen):
    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (
        draw(batch, seqlen_q, heads, LATENT),
        draw(batch, seqlen_q, heads, ROPE),
        draw(batch, seqlen_k, 1, LATENT),
        draw(batch, seqlen_k, 1, ROPE),
    )


def sparse(q_latent, q_rope, latent, rope_key, index):
    return KERNELS.SPARSE["sparse_mla_lat32_rope8"](
        q_latent, q_rope, latent, rope_key, latent, index=index, scale=SCALE
    )


def reference(q_latent, q_rope, latent, rope_key, index):
    return reference_sparse_attention(q_latent, q_rope, latent, rope_key, latent, index=index, scale=SCALE)


# --- the indexer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4])
def test_indexer_logits_match_the_reference(heads):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 37, heads, INDEX_DIM, generator=gen)
    key = torch.randn(2, 37, 1, INDEX_DIM, generator=gen)
    weights = torch.randn(2, 37, heads, generator=gen)
    got = KERNELS.SPARSE["indexer_logits_d32"](query, key, weights, scale=0.3, weight_scale=heads**-0.5)
    expected = reference_index_scores(query, key, weights, scale=0.3, weight_scale=heads**-0.5)
    assert torch.equal(got.isinf(), expected.isinf()), "the causal mask differs"
    finite = expected.isfinite()
    assert (got[finite] - expected[finite]).abs().max() <= 1e-5 * expected[finite].abs().max()


def paged_cache(
    cache_dtype: str, lengths: list[int], gen: torch.Generator, dtype=torch.float32
) -> PagedSparseCache:
    """A cache of random rows, written through the cache's own writers (pages of 4 tokens)."""
    cache = PagedSparseCache(
        len(lengths),
        40,
        latent_dim=LATENT,
        rope_dim=ROPE,
        index_dim=INDEX_DIM,
        page_size=4,
        dtype=dtype,
        cache_dtype=cache_dtype,
    )
    start = cache.reserve(lengths)
    for row, length in enumerate(lengths):
        positions = start[row].long() + torch.arange(length)
        cache.write_latent_rows(
            row,
            positions,
            torch.randn(length, LATENT, generator=gen),
            torch.randn(length, ROPE, generator=gen),
        )
        cache.write_index_keys(row, positions, torch.randn(length, INDEX_DIM, generator=gen))
    cache.commit(lengths)
    return cache


@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_paged_indexer_logits_match_the_reference_over_the_cache(cache_dtype):
    """Ragged rows (one with padding queries), pages of 4, 3 new tokens per row: each token
    sees the keys up to its own position."""
    gen = torch.Generator().manual_seed(1)
    lengths, new = [21, 9], (3, 2)
    cache = paged_cache(cache_dtype, lengths, gen)
    cached = CachedTokens(
        cache, torch.tensor([length - n for length, n in zip(lengths, new)], dtype=torch.int32), new
    )
    query = torch.randn(2, 3, 4, INDEX_DIM, generator=gen)
    weights = torch.randn(2, 3, 4, generator=gen)
    got = KERNELS.SPARSE_DECODE.index_scores(query, weights, cached, scale=0.3, weight_scale=0.5)
    expected = reference_index_scores_over_cache(query, weights, cached, scale=0.3, weight_scale=0.5)
    assert got.shape == (2, 3, 21)
    assert torch.equal(got.isinf(), expected.isinf()), "visibility differs"
    finite = expected.isfinite()
    assert (got[finite] - expected[finite]).abs().max() <= 1e-5 * expected[finite].abs().max()
    assert got[1, 2].isinf().all(), "a padding query (past the row's new tokens) sees nothing"


@pytest.mark.parametrize("rows", [16, 32])
def test_paged_indexer_packs_tokens_into_the_rows_of_its_dots(rows):
    """sm_90 and sm_100 give the dot at least 64 rows (GLM-5's 32 index heads: 2 tokens per
    dot). Here 4 index heads pad to 16 rows a token, 1 or 2 tokens per dot, 3 tokens per
    program (the second dot half padding): padding rows add nothing to the scores."""
    gen = torch.Generator().manual_seed(1)
    lengths, new = [21, 9], (3, 2)
    cache = paged_cache("model", lengths, gen)
    cached = CachedTokens(
        cache, torch.tensor([length - n for length, n in zip(lengths, new)], dtype=torch.int32), new
    )
    query = torch.randn(2, 3, 4, INDEX_DIM, generator=gen)
    weights = torch.randn(2, 3, 4, generator=gen)
    padded = SparseConfig(rows, 16, 1, 1, tokens=3)
    got = KERNELS.indexer_logits_d32_paged_launch(
        query, weights, cached, scale=0.3, weight_scale=0.5, config=padded
    )
    expected = KERNELS.SPARSE_DECODE.index_scores(query, weights, cached, scale=0.3, weight_scale=0.5)
    assert torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert (got[finite] - expected[finite]).abs().max() <= 1e-6 * expected[finite].abs().max()


def test_top_k_marks_missing_keys():
    scores = torch.tensor([[[0.5, float("-inf"), float("-inf")], [0.1, 0.3, float("-inf")]]])
    assert top_k(scores, 2).tolist() == [[[0, -1], [1, 0]]]
    assert top_k(scores, 5).shape == (1, 2, 3), "k is capped at the number of keys"


# --- sparse attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 3, 20])  # 20: two programs of 16 heads per query
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_attention_against_the_fp64_golden(heads, dtype):
    gen = torch.Generator().manual_seed(2)
    q_latent, q_rope, latent, rope_key = operands(2, 13, 13, heads, torch.float64, gen)
    index = random_index(2, 13, 13, 6, gen)
    golden = reference(q_latent, q_rope, latent, rope_key, index)
    low = [t.to(dtype) for t in (q_latent, q_rope, latent, rope_key)]
    got = sparse(*low, index)
    eager = reference(*low, index)
    assert got.dtype == dtype and got.shape == golden.shape
    assert_close_to_golden(
        got, eager, golden, atol=1e-6 if dtype == torch.float32 else 1e-3, what=f"{dtype} {heads}"
    )


@pytest.mark.parametrize("heads", [3, 20])
def test_outputs_stored_through_tensor_descriptors_match_pointer_stores(heads):
    """sm_90 and sm_100 store the output halves through tensor descriptors (TMA), which must not
    write the heads past `heads` that pad the program's rows (the next query's rows lie there);
    the interpreter runs that path when the launcher is told to."""
    gen = torch.Generator().manual_seed(2)
    q_latent, q_rope, latent, rope_key = operands(2, 7, 9, heads, torch.float32, gen)
    index = random_index(2, 7, 9, 6, gen)
    launch = KERNELS.sparse_mla_lat32_rope8_launch
    out, lse = launch(q_latent, q_rope, latent, rope_key, index, scale=SCALE, descriptors=True)
    plain_out, plain_lse = launch(q_latent, q_rope, latent, rope_key, index, scale=SCALE, descriptors=False)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    expected = reference(q_latent, q_rope, latent, rope_key, index)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()

    cache = paged_cache("model", [9, 9], gen)
    slots = cache.slots_of(index)
    paged = KERNELS.sparse_mla_lat32_rope8_paged_launch
    decoded = paged(q_latent, q_rope, cache, slots, scale=SCALE, num_splits=2, descriptors=True)
    plain = paged(q_latent, q_rope, cache, slots, scale=SCALE, num_splits=2, descriptors=False)
    assert torch.equal(decoded, plain)


@pytest.mark.parametrize("columns", ["halves", "whole"])
@pytest.mark.parametrize("heads", [3, 20])
def test_programs_keeping_all_columns_match_programs_splitting_them(heads, columns):
    """sm_100 splits the latent's output columns between two programs; the mma.sync parts keep
    both halves in one ("halves"), sm_90 one accumulator of all of them ("whole",
    runtime.sparse.sparse_config): prefill and paged decode give the same outputs every way,
    with missing keys (index -1) inside tiles and whole tiles of them."""
    gen = torch.Generator().manual_seed(2)
    q_latent, q_rope, latent, rope_key = operands(2, 7, 40, heads, torch.float32, gen)
    index = random_index(2, 7, 40, 20, gen)  # 20 keys: a whole tile of 16, then 4 of 16
    index[0, 3, :] = -1  # a query with no key at all
    index[1, 2, 5] = -1  # a missing key inside the first tile
    both = SparseConfig(16, 16, 1, 1, columns=columns)
    launch = KERNELS.sparse_mla_lat32_rope8_launch
    split_out, split_lse = launch(q_latent, q_rope, latent, rope_key, index, scale=SCALE)
    for descriptors in (False, True):  # the output stored through pointers or a TMA descriptor
        out, lse = launch(q_latent, q_rope, latent, rope_key, index, scale=SCALE, config=both, descriptors=descriptors)
        torch.testing.assert_close(out, split_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, split_lse, rtol=1e-6, atol=1e-6)
    for cache_dtype in ("model", "fp8"):
        cache = paged_cache(cache_dtype, [40, 40], gen)
        slots = cache.slots_of(index)
        paged = KERNELS.sparse_mla_lat32_rope8_paged_launch
        split = paged(q_latent, q_rope, cache, slots, scale=SCALE, num_splits=2)
        for descriptors in (False, True):
            decoded = paged(q_latent, q_rope, cache, slots, scale=SCALE, num_splits=2, config=both,
                            descriptors=descriptors)
            torch.testing.assert_close(decoded, split, rtol=1e-6, atol=1e-6)


def test_sparse_attention_gradcheck_fp64():
    gen = torch.Generator().manual_seed(3)
    tensors = [t.requires_grad_() for t in operands(2, 5, 5, 3, torch.float64, gen)]
    index = random_index(2, 5, 5, 3, gen)
    assert torch.autograd.gradcheck(lambda *t: sparse(*t, index), tensors, fast_mode=True)


# 40 tokens x 24 keys: each query's gradients sum over two key blocks of the backward
@pytest.mark.parametrize("heads, seqlen, keys", [(2, 11, 5), (20, 11, 5), (20, 40, 24)])
def test_sparse_attention_gradients_match_autograd_through_the_reference(heads, seqlen, keys):
    gen = torch.Generator().manual_seed(4)
    base = operands(2, seqlen, seqlen, heads, torch.float32, gen)
    index = random_index(2, seqlen, seqlen, keys, gen)
    grad_out = torch.randn(2, seqlen, heads, LATENT, generator=gen)
    grads = []
    for function in (sparse, reference):
        tensors = [t.clone().requires_grad_() for t in base]
        function(*tensors, index).backward(grad_out)
        grads.append([t.grad for t in tensors])
    for name, got, expected in zip(("q_latent", "q_rope", "latent", "rope_key"), *grads):
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), name


def test_keys_outside_the_selection_never_reach_a_query():
    """Keys 1 and 4 are selected by no query and hold NaN, then 1e30: every output and
    gradient equals that with those keys zeroed, in prefill, backward and paged decode."""
    gen = torch.Generator().manual_seed(5)
    q_latent, q_rope, latent, rope_key = operands(1, 9, 9, 4, torch.float32, gen)
    unselected = [1, 4]
    index = random_index(1, 9, 9, 4, gen)
    index = torch.where(torch.isin(index, torch.tensor(unselected)), -1, index)
    results = []
    for poison in (0.0, float("nan"), 1e30):
        lat, rope = latent.clone(), rope_key.clone()
        lat[0, unselected], rope[0, unselected] = poison, poison
        tensors = [t.clone().requires_grad_() for t in (q_latent, q_rope, lat, rope)]
        out = sparse(*tensors, index)
        out.backward(torch.ones_like(out))
        cache = PagedSparseCache(
            1, 9, latent_dim=LATENT, rope_dim=ROPE, index_dim=INDEX_DIM, page_size=4, dtype=torch.float32
        )
        positions = cache.reserve([9])[0].long() + torch.arange(9)
        cache.write_latent_rows(0, positions, lat[0, :, 0], rope[0, :, 0])
        cache.commit([9])
        cached = CachedTokens(cache, torch.zeros(1, dtype=torch.int32), (9,))
        decoded = KERNELS.SPARSE_DECODE.attend_sparse(q_latent, q_rope, cached, index, scale=SCALE)
        results.append((out.detach(), decoded, *(t.grad for t in tensors)))
    clean = results[0]
    for poisoned in results[1:]:
        for got, expected in zip(poisoned[:4], clean[:4]):  # outputs and the queries' gradients
            assert torch.equal(got, expected)
        for got, expected in zip(poisoned[4:], clean[4:]):  # the keys' gradients, but at the poison
            keep = torch.ones(9, dtype=torch.bool)
            keep[unselected] = False
            assert torch.equal(got[0, keep], expected[0, keep]) and not got[0, unselected].any()


# --- the paged cache (decode) -------------------------------------------------------------------------


def test_fp8_rows_round_trip_through_the_kernels_decoder():
    """Every finite e4m3 code decodes in the kernels (integer bit arithmetic, no fp8 type) as
    torch's float8_e4m3fn cast does."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    decoded = torch.empty(codes.shape[0], dtype=torch.float32)

    @triton.jit
    def decode(CODES, OUT, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        bits = tl.load(CODES + offs, mask=offs < N, other=0)
        tl.store(OUT + offs, KERNELS._e4m3_to_float32(bits), mask=offs < N)

    decode[(1,)](codes, decoded, N=codes.shape[0], BLOCK=256)
    assert torch.equal(decoded, codes.view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("new_tokens", [1, 4])
@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_paged_sparse_decode_matches_the_reference_over_the_cache(cache_dtype, new_tokens):
    """Split-KV over the selected slots (one split per 16 selected keys under the interpreter),
    20 heads (two head blocks), ragged rows: the kernel reads FP8 rows as the reference
    dequantises them."""
    gen = torch.Generator().manual_seed(6)
    lengths = [37, 30]
    cache = paged_cache(cache_dtype, lengths, gen)
    counts = (new_tokens, max(new_tokens - 1, 1))
    cached = CachedTokens(
        cache, torch.tensor([n - c for n, c in zip(lengths, counts)], dtype=torch.int32), counts
    )
    q_latent = torch.randn(2, new_tokens, 20, LATENT, generator=gen)
    q_rope = torch.randn(2, new_tokens, 20, ROPE, generator=gen)
    positions = torch.stack([random_index(1, new_tokens, length, 24, gen)[0] for length in lengths])
    got = KERNELS.SPARSE_DECODE.attend_sparse(q_latent, q_rope, cached, positions, scale=SCALE)
    expected = reference_sparse_attention_over_cache(q_latent, q_rope, cached, positions, scale=SCALE)
    for row, count in enumerate(counts):
        assert (got[row, :count] - expected[row, :count]).abs().max() <= 1e-5 * expected.abs().max()


def test_fp8_cache_rows_hold_flashmla_layout():
    """DeepSeek-V3.2's widths: 656 bytes of latent row and 132 of indexer key per token, and
    the rows read back within e4m3's rounding (relative 2**-4 per value of its group's scale)."""
    cache = PagedSparseCache(
        1, 8, latent_dim=512, rope_dim=64, index_dim=128, page_size=4, dtype=torch.bfloat16, cache_dtype="fp8"
    )
    assert cache.buffer.shape[-1] == 656 and cache.index_buffer.shape[-1] == 132
    assert cache.bytes_per_token == 656 + 132
    gen = torch.Generator().manual_seed(7)
    latent, rope, keys = (torch.randn(3, n, generator=gen) for n in (512, 64, 128))
    start = cache.reserve([3])
    cache.write_latent_rows(0, start[0].long() + torch.arange(3), latent, rope)
    cache.write_index_keys(0, start[0].long() + torch.arange(3), keys)
    cache.commit([3])
    rows = cache.gather(0).float()
    group_max = latent.abs().view(3, 4, 128).amax(-1).repeat_interleave(128, -1)
    assert ((rows[:, :512] - latent).abs() <= group_max * 2.0**-4).all()
    assert torch.equal(rows[:, 512:], rope.to(torch.bfloat16).float())
    key_max = keys.abs().amax(-1, keepdim=True)
    assert ((cache.gather_index_keys(0).float() - keys).abs() <= key_max * 2.0**-4).all()
    codes, scales = fp8.quantize(latent, fp8.SCALE_GROUP)
    assert torch.equal(cache.buffer.view(-1, 656)[:3, :512], codes)


def test_fp8_cache_costs_at_most_e4m3_rounding_in_attention():
    """README's FP8 accuracy table, at test size: with the selection fixed, attention over FP8
    rows is within e4m3's unit roundoff (2**-4) of the fp64 golden in relative RMS, bf16 rows
    within bf16's (2**-8) times 2."""
    spec = importlib.util.spec_from_file_location(
        "fp8_cache_accuracy", ROOT / "examples" / "fp8_cache_accuracy.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    errors = example.random_data_errors(cached=256, queries=4, heads=8, keep=64)
    (bf16, _, _), (e4m3, changed, _) = errors["bf16"], errors["fp8"]
    assert bf16 <= 2 * 2.0**-8 and e4m3 <= 2.0**-4, errors
    assert e4m3 > 4 * bf16 and 0 <= changed < 0.1, errors


@pytest.mark.parametrize("version, keys", [("3.6.0", 32), ("3.9.0", 64), ("3.10.1", 64)])
def test_sparse_tiles_fit_the_triton_that_compiles_them(version, keys, monkeypatch):
    """Triton 3.6 lays sm_100's 64-key sparse program out in 312 KB of shared memory (227 KB is
    the most a block may have; 3.9: 176 KB), and sm_90's all-columns program at 64 keys spills
    104 B with local loads and stores in every step (3.9: none): under 3.9 both take 32 keys."""
    import triton

    from mlagen.runtime.launch import LaunchTarget, launching_for
    from mlagen.runtime.sparse import sparse_config

    monkeypatch.setattr(triton, "__version__", version)
    for arch, sms in ((100, 148), (90, 132)):
        with launching_for(LaunchTarget(arch, sms)):
            assert sparse_config(128, 512, torch.device("meta")).block_n == keys
            assert sparse_config(128, 512, torch.device("meta"), fp8=True).block_n == 32

