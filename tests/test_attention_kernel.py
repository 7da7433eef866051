"""The generated forward attention kernel against the plain-torch reference, for
every family and flag combination, in fp32 and fp16 under the interpreter.

Golden: the reference in fp64. Eager: the reference in the kernel's dtype.
A kernel passes when its error is at most 2x eager's plus a small atol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mlagen.runtime import reference
from mlagen.runtime.launch import INTERPRETER_CONFIG
from tests.helpers import assert_close_to_golden, generated, max_error

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@dataclass(frozen=True)
class Case:
    id: str
    package: str = "tiny_gqa"  # whose generated kernel: tiny_gqa (qk 16, v 16), tiny_mla (16 + 8, v 24)
    heads_q: int = 2
    heads_k: int = 2
    seqlen_q: int = 37
    seqlen_k: int = 37
    causal: bool = True
    window: int | None = None
    group_mask: tuple | None = None
    shared_rope_key: bool = True  # tiny_mla: k_b has one head (MLA), or one per kv head


CASES = [
    Case("mha-causal"),
    Case("mha-bidirectional", causal=False),
    Case("gqa-causal", heads_q=4, heads_k=2),
    Case("mqa-causal", heads_q=4, heads_k=1),
    Case("gqa-sliding-window", heads_q=4, heads_k=2, window=7),
    Case("window-wider-than-sequence", window=100),
    Case("window-of-one", window=1),
    Case("cross-attention-more-keys", causal=False, seqlen_q=9, seqlen_k=45),
    Case("cross-attention-fewer-keys", causal=False, seqlen_q=45, seqlen_k=9),
    Case("causal-continuing-a-prefix", seqlen_q=7, seqlen_k=40),
    Case("causal-more-queries-than-keys", seqlen_q=40, seqlen_k=7),
    Case("latent-encode-same-chunk", causal=False, seqlen_q=12, seqlen_k=37, group_mask=("same", 4, 8)),
    Case("latent-decode-earlier-chunks", causal=False, seqlen_q=37, seqlen_k=20, group_mask=("earlier", 8, 4)),
    Case("latent-self-attention-per-chunk", causal=False, seqlen_q=20, seqlen_k=20, group_mask=("same", 4, 4)),
    Case("mla-split-dots-causal", package="tiny_mla", heads_q=4, heads_k=4),
    Case("mla-split-dots-bidirectional", package="tiny_mla", heads_q=4, heads_k=4, causal=False),
    Case("mla-split-dots-single-token", package="tiny_mla", heads_q=4, heads_k=4, seqlen_q=1, seqlen_k=1),
    Case("split-dots-per-head-second-key", package="tiny_mla", heads_q=4, heads_k=2, shared_rope_key=False),
    Case("split-dots-window", package="tiny_mla", heads_q=4, heads_k=4, window=5),
]


def _operands(case: Case, dtype: torch.dtype, scale_logits: float = 1.0, batch: int = 2):
    kernel = next(iter(generated(case.package).ATTENTION.items()))
    name = kernel[0]
    split = "_rope" in name
    d_a = 16
    d_b = 8 if split else 0
    d_v = 24 if split else 16
    b = batch
    q_a = torch.randn(b, case.seqlen_q, case.heads_q, d_a) * scale_logits
    k_a = torch.randn(b, case.seqlen_k, case.heads_k, d_a)
    v = torch.randn(b, case.seqlen_k, case.heads_k, d_v)
    q_b = k_b = None
    if split:
        q_b = torch.randn(b, case.seqlen_q, case.heads_q, d_b) * scale_logits
        k_b = torch.randn(b, case.seqlen_k, 1 if case.shared_rope_key else case.heads_k, d_b)
    as_dtype = [None if t is None else t.to(dtype) for t in (q_a, q_b, k_a, k_b, v)]
    return kernel[1], as_dtype


def _run(case: Case, dtype: torch.dtype, scale_logits: float = 1.0):
    entry, operands = _operands(case, dtype, scale_logits)
    options = dict(scale=1 / math.sqrt(16 + (8 if operands[1] is not None else 0)), causal=case.causal,
                   window=case.window, group_mask=case.group_mask)
    out = entry(*operands, **options)
    golden = reference.attention(*[None if t is None else t.double() for t in operands], **options)
    eager = reference.attention(*operands, **options)
    return out, eager, golden, operands, options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_matches_reference(case, dtype):
    out, eager, golden, _, _ = _run(case, dtype)
    assert out.dtype == dtype and out.shape == golden.shape
    assert not out.isnan().any()
    assert_close_to_golden(out, eager, golden, atol=ATOL[dtype], what=f"{case.id} {dtype}")


@pytest.mark.parametrize("case", CASES[:4] + CASES[9:15], ids=[c.id for c in CASES[:4] + CASES[9:15]])
def test_kernel_log_sum_exp_matches_reference(case):
    entry, operands = _operands(case, torch.float32)
    kernel = generated(case.package).kernels
    launch = getattr(kernel, next(iter(kernel.ATTENTION)) + "_launch")
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    _, lse = launch(*operands, **options)
    _, golden_lse = reference.attention(*[None if t is None else t.double() for t in operands], **options,
                                        return_lse=True)
    finite = golden_lse.isfinite()
    assert torch.equal(finite, lse.isfinite()), "rows with no visible key must have lse -inf"
    assert max_error(lse[finite], golden_lse[finite]) < 1e-4


def test_fully_masked_rows_give_zeros_not_nan():
    # Queries before the first key (causal, more queries than keys) and tokens of the
    # first chunk (latent decode) see nothing: their output is exactly zero.
    for case in (CASES[10], CASES[12]):
        out, _, golden, _, _ = _run(case, torch.float32)
        empty = golden.abs().sum(-1) == 0
        assert empty.any()
        assert not out.isnan().any()
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_large_logits_do_not_overflow(dtype):
    # Scores near fp16's limit: the kernel works in fp32 after the dot, with the running max subtracted.
    out, eager, golden, _, _ = _run(Case("large-logits", heads_q=4, heads_k=2), dtype, scale_logits=40.0)
    assert out.isfinite().all()
    assert_close_to_golden(out, eager, golden, atol=ATOL[dtype], what="large logits")


def test_strided_and_broadcast_operands():
    # Views straight out of a fused projection (head-strided, not contiguous) and a
    # batch-broadcast query (stride 0) are read in place, and match contiguous copies.
    entry = generated("tiny_gqa").ATTENTION["attention_fwd_qk16_v16"]
    fused = torch.randn(2, 30, 3 * 4 * 16)
    q, k, v = (t.unflatten(-1, (4, 16)) for t in fused.split(64, dim=-1))
    assert not q.is_contiguous()
    latents = torch.randn(1, 30, 4, 16).expand(2, -1, -1, -1)
    for query in (q, latents):
        out = entry(query, None, k, None, v, scale=0.25, causal=True)
        expected = reference.attention(query.contiguous(), None, k.contiguous(), None, v.contiguous(), scale=0.25,
                                       causal=True)
        assert max_error(out, expected) < 1e-5
    rows = torch.randn(2, 30, 4, 32)[..., ::2]  # last dim strided: copied, still correct
    out = entry(rows, None, k, None, v, scale=0.25, causal=False)
    assert max_error(out, reference.attention(rows, None, k, None, v, scale=0.25, causal=False)) < 1e-5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ops: ops.__setitem__(0, ops[0][..., :8]), "head dims"),
        (lambda ops: ops.__setitem__(2, ops[2].half()), "dtype"),
        (lambda ops: ops.__setitem__(4, ops[4][:, :5]), "does not match"),
        (lambda ops: ops.__setitem__(0, ops[0][0]), "4-d"),
        (lambda ops: ops.__setitem__(2, torch.randn(2, 37, 3, 16)), "does not match"),
        (lambda ops: [ops.__setitem__(i, t.to(torch.int32)) for i, t in enumerate(ops) if t is not None],
         "float16, bfloat16, float32 or float64"),
    ],
    ids=["wrong-head-dim", "mixed-dtypes", "values-shorter-than-keys", "missing-batch-dim", "kv-heads-mismatch",
         "integer-inputs"],
)
def test_bad_operands_raise_clear_errors(mutate, message):
    entry, operands = _operands(CASES[0], torch.float32)  # [q_a, q_b, k_a, k_b, v]
    mutate(operands)
    with pytest.raises(ValueError, match=message):
        entry(*operands, scale=0.25, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [Case("long-causal-gqa", heads_q=2, heads_k=1, seqlen_q=300, seqlen_k=300),
                                  Case("long-mla-window", package="tiny_mla", heads_q=2, heads_k=2, seqlen_q=300,
                                       seqlen_k=300, window=40)],
                         ids=["long-causal-gqa", "long-mla-window"])
def test_long_sequences_spanning_many_blocks(case, dtype):
    # 300 tokens are 19 query blocks and 19 key blocks under the interpreter's 16-wide tiles.
    out, eager, golden, _, _ = _run(case, dtype)
    assert_close_to_golden(out, eager, golden, atol=ATOL[dtype], what=f"{case.id} {dtype}")


# --- NaN in a key or value ------------------------------------------------------------------------

# (case, the token whose key and value are NaN): the last token of a causal sequence, a key in the
# tile after the diagonal of a block continuing a prefix, the first token of a sliding window (later
# queries' windows have moved past it), a key of the latent family's chunk mask, a key only the
# last queries see when more queries than keys leave the first ones seeing nothing.
NAN_CASES = [
    (Case("causal-last-token", seqlen_q=40, seqlen_k=40), 39),
    (Case("gqa-causal-last-token", heads_q=4, heads_k=2, seqlen_q=40, seqlen_k=40), 39),
    (Case("split-dots-causal-last-token", package="tiny_mla", heads_q=4, heads_k=4, seqlen_q=40, seqlen_k=40), 39),
    (Case("causal-continuing-a-prefix", seqlen_q=20, seqlen_k=40), 38),
    (Case("window-first-token", heads_q=4, heads_k=2, window=7, seqlen_q=40, seqlen_k=40), 0),
    (Case("latent-encode-same-chunk", causal=False, seqlen_q=40, seqlen_k=80, group_mask=("same", 4, 8)), 60),
    (Case("causal-more-queries-than-keys", seqlen_q=40, seqlen_k=7), 6),
]


def _nan_at(operands, token):
    """The operands with the keys (both parts) and value of `token` made NaN."""
    poisoned = [None if t is None else t.clone() for t in operands]
    for index in (2, 3, 4):  # k_a, k_b, v
        if poisoned[index] is not None:
            poisoned[index][:, token] = float("nan")
    return poisoned


def _seen_by(case: Case, token: int) -> torch.Tensor:
    """Bool [Sq]: the queries that may see `token`."""
    return reference.visible(case.seqlen_q, case.seqlen_k, causal=case.causal, window=case.window,
                             group_mask=case.group_mask)[:, token]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case, token", NAN_CASES, ids=[c.id for c, _ in NAN_CASES])
def test_in_the_reference_a_nan_key_and_value_reach_exactly_the_queries_that_may_see_them(case, token, dtype):
    """A masked key adds exactly nothing, NaN or not: the other queries' outputs are bit for bit
    those with a finite key there; a query that may see it is NaN, as in FlashAttention and eager."""
    _, operands = _operands(case, dtype)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    sees = _seen_by(case, token)
    assert sees.any() and not sees.all()
    clean = reference.attention(*operands, **options)
    out = reference.attention(*_nan_at(operands, token), **options)
    assert out[:, sees].isnan().all()
    assert torch.equal(out[:, ~sees], clean[:, ~sees])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case, token", NAN_CASES, ids=[c.id for c, _ in NAN_CASES])
def test_in_the_kernel_a_nan_key_and_value_reach_no_query_block_that_may_not_see_them(case, token, dtype):
    """README "Numerics and NaN": a key no query of a block may see is read as zeros, and a
    query that sees no key at all gives zeros, so those outputs are bit for bit those with a finite
    key there. A query that may see it is NaN. Only queries sharing a block with one that may see
    it can be NaN too (0 * NaN in P @ V): the interpreter's blocks are 16 queries."""
    entry, operands = _operands(case, dtype)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    sees = _seen_by(case, token)
    block = INTERPRETER_CONFIG.block_m
    block_sees = torch.stack([rows.any() for rows in sees.split(block)]).repeat_interleave(block)[: len(sees)]
    sees_nothing = ~reference.visible(case.seqlen_q, case.seqlen_k, causal=case.causal, window=case.window,
                                      group_mask=case.group_mask).any(-1)
    unaffected = ~block_sees | sees_nothing
    assert unaffected.any()
    clean = entry(*operands, **options)
    out = entry(*_nan_at(operands, token), **options)
    assert out[:, sees].isnan().all()
    assert torch.equal(out[:, unaffected], clean[:, unaffected])
    assert torch.equal(out[:, sees_nothing], torch.zeros_like(out[:, sees_nothing]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("package", ["tiny_gqa", "tiny_mla"])
def test_earlier_queries_ignore_a_nan_last_token(package, dtype):
    """The reference: every earlier query; the kernel: every query before the last token's block."""
    case = Case("causal", package=package, seqlen_q=40, seqlen_k=40)
    entry, operands = _operands(case, dtype)
    without_last = [None if t is None else t[:, :-1] for t in operands]
    first_of_last_block = (39 // INTERPRETER_CONFIG.block_m) * INTERPRETER_CONFIG.block_m
    for attend, finite_rows in ((reference.attention, 39), (entry, first_of_last_block)):
        out = attend(*_nan_at(operands, -1), scale=0.25, causal=True)
        assert out[:, :finite_rows].isfinite().all() and out[:, -1].isnan().all()
        expected = attend(*without_last, scale=0.25, causal=True)[:, :finite_rows]
        if attend is entry:  # the same tiles in the same order: the NaN row was never read
            assert torch.equal(out[:, :finite_rows], expected)
        else:
            torch.testing.assert_close(out[:, :finite_rows], expected)


# --- tensor descriptors (TMA) -----------------------------------------------------------------------

# sm_90 and later read keys and values through tensor descriptors; the interpreter runs that path
# when the launcher is told to. tiny_gqa's head dims are its tile widths, as descriptors need.
DESCRIPTOR_CASES = [c for c in CASES if c.package == "tiny_gqa"]


def _forward_launch(package: str):
    kernels = generated(package).kernels
    return getattr(kernels, next(iter(kernels.ATTENTION)) + "_launch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", DESCRIPTOR_CASES, ids=[c.id for c in DESCRIPTOR_CASES])
def test_kernel_through_tensor_descriptors_matches_plain_loads_and_reference(case, dtype):
    from mlagen.runtime.descriptors import head_rows

    _, operands = _operands(case, dtype)
    assert head_rows(operands[2], INTERPRETER_CONFIG.block_n, 16) is not None
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    launch = _forward_launch(case.package)
    out, lse = launch(*operands, **options, descriptors=True)
    plain_out, plain_lse = launch(*operands, **options, descriptors=False)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    golden = reference.attention(*[None if t is None else t.double() for t in operands], **options)
    eager = reference.attention(*operands, **options)
    assert_close_to_golden(out, eager, golden, atol=ATOL[dtype], what=f"{case.id} {dtype} descriptors")


@pytest.mark.parametrize("case, token", [n for n in NAN_CASES if n[0].package == "tiny_gqa"],
                         ids=[c.id for c, _ in NAN_CASES if c.package == "tiny_gqa"])
def test_through_tensor_descriptors_a_nan_key_and_value_reach_no_query_block_that_may_not_see_them(case, token):
    # A descriptor reads a masked tile's rows past a sequence's end from the next batch (NaN
    # there for batch 0) and rows before a window from the same sequence: values read as zeros.
    _, operands = _operands(case, torch.float32)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    launch = _forward_launch(case.package)
    poisoned = _nan_at(operands, token)
    out, _ = launch(*poisoned, **options, descriptors=True)
    plain, _ = launch(*poisoned, **options, descriptors=False)
    assert out[:, _seen_by(case, token)].isnan().all()
    assert torch.equal(out.isnan(), plain.isnan())
    assert torch.equal(out.nan_to_num(), plain.nan_to_num())


def test_tensor_descriptors_read_projection_slices_and_broadcasts_and_refuse_other_layouts():
    from mlagen.runtime.descriptors import head_rows

    launch = _forward_launch("tiny_gqa")
    fused = torch.randn(2, 30, 3 * 4 * 16)
    q, k, v = (t.unflatten(-1, (4, 16)) for t in fused.split(64, dim=-1))
    latents = torch.randn(1, 30, 4, 16).expand(2, -1, -1, -1)  # batch stride 0
    for keys in ((k, v), (latents, latents)):
        assert all(head_rows(t, 16, 16) is not None for t in keys)
        out, _ = launch(q, None, keys[0], None, keys[1], scale=0.25, causal=True, descriptors=True)
        expected = reference.attention(q.contiguous(), None, keys[0].contiguous(), None, keys[1].contiguous(),
                                       scale=0.25, causal=True)
        assert max_error(out, expected) < 1e-5
    heads_outside_rows = torch.randn(2, 4, 30, 16).transpose(1, 2)  # [B, H, S, D] memory
    odd_rows = torch.randn(2, 30, 4 * 16 + 2)[..., :64].unflatten(-1, (4, 16))  # 264-byte token rows
    assert head_rows(heads_outside_rows, 16, 16) is None and head_rows(odd_rows, 16, 16) is None
    assert head_rows(k, 16, 32) is None  # a 16-wide head under a 32-wide tile
    out, _ = launch(q, None, heads_outside_rows, None, v, scale=0.25, causal=True, descriptors=True)
    expected = reference.attention(q, None, heads_outside_rows, None, v, scale=0.25, causal=True)
    assert max_error(out, expected) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_with_every_tile_masked_matches_reference(case):
    # full_tiles=False (MLA-wide queries on sm_89 and sm_120): the masked loop takes every tile.
    _, operands = _operands(case, torch.float32)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    out, lse = _forward_launch(case.package)(*operands, **options, full_tiles=False)
    golden, golden_lse = reference.attention(
        *[None if t is None else t.double() for t in operands], **options, return_lse=True
    )
    eager = reference.attention(*operands, **options)
    assert_close_to_golden(out, eager, golden, atol=ATOL[torch.float32], what=f"{case.id} every tile masked")
    finite = golden_lse.isfinite()
    assert torch.equal(finite, lse.isfinite()) and max_error(lse[finite], golden_lse[finite]) < 1e-4


# GQA packing: the query heads of one key head share a program's rows, (token, head) pairs
# token-major, so a block's rows span fewer tokens than rows (the interpreter's 16 rows: 8, 4 or
# 16 / 3 tokens), blocks start inside a token's heads, and one key tile serves the whole group.
PACKED_CASES = [c for c in CASES if c.heads_q > c.heads_k] + [
    Case("gqa-decode-one-token", heads_q=4, heads_k=1, seqlen_q=1, seqlen_k=40),
    Case("gqa-decode-three-tokens-window", heads_q=6, heads_k=2, seqlen_q=3, seqlen_k=40, window=9),
    Case("gqa-group-of-three-across-blocks", heads_q=6, heads_k=2, seqlen_q=37, seqlen_k=37),
    Case("gqa-latent-chunks", heads_q=4, heads_k=2, causal=False, seqlen_q=12, seqlen_k=37, group_mask=("same", 4, 8)),
    Case("mla-per-head-keys-decode", package="tiny_mla", heads_q=4, heads_k=2, shared_rope_key=False, seqlen_q=2,
         seqlen_k=30),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[c.id for c in PACKED_CASES])
def test_kernel_with_query_heads_packed_into_rows_matches_reference(case, dtype):
    _, operands = _operands(case, dtype)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    launch = _forward_launch(case.package)
    golden, golden_lse = reference.attention(
        *[None if t is None else t.double() for t in operands], **options, return_lse=True
    )
    eager = reference.attention(*operands, **options)
    descriptors = (False, True) if case.package == "tiny_gqa" else (False,)
    for pack_gqa, through_descriptors in [(pack, d) for pack in (True, False) for d in descriptors]:
        out, lse = launch(*operands, **options, pack_gqa=pack_gqa, descriptors=through_descriptors)
        what = f"{case.id} {dtype} pack_gqa={pack_gqa} descriptors={through_descriptors}"
        assert_close_to_golden(out, eager, golden, atol=ATOL[dtype], what=what)
        finite = golden_lse.isfinite()
        assert torch.equal(finite, lse.isfinite()), what
        assert max_error(lse[finite], golden_lse[finite]) < (1e-4 if dtype == torch.float32 else 2e-3), what


def test_query_heads_are_packed_where_that_leaves_fewer_padded_rows():
    from mlagen.runtime.launch import packs_gqa

    cpu = torch.device("cpu")
    for arch in (80, 90, 100):
        assert packs_gqa(1, 8, 128, cpu, arch)  # decode: 8 rows in one program, not 8 programs
        assert packs_gqa(4, 4, 64, cpu, arch)
        assert packs_gqa(4097, 4, 128, cpu, arch)  # 129 blocks of rows, not 4 x 33
        assert not packs_gqa(4096, 4, 128, cpu, arch)  # full tiles either way
        assert not packs_gqa(1, 1, 128, cpu, arch)  # MHA: nothing to pack
    for arch in (89, 120):  # the packed tile spills there
        assert not packs_gqa(1, 8, 128, cpu, arch)


# Split-KV (decode: few query rows over a long cache): the keys of one row block spread over
# programs, merged by the combine kernel. Splits of 16-key tiles under the interpreter, so split
# boundaries fall inside windows, at the causal edge of a cached prefix, and past a block's keys.
SPLIT_CASES = [
    Case("decode-one-token", seqlen_q=1, seqlen_k=100),
    Case("decode-gqa-four-tokens", heads_q=4, heads_k=2, seqlen_q=4, seqlen_k=90),
    Case("decode-mqa-window", heads_q=4, heads_k=1, seqlen_q=2, seqlen_k=100, window=37),
    Case("decode-window-shorter-than-a-split", heads_q=2, heads_k=2, seqlen_q=3, seqlen_k=100, window=5),
    Case("cross-attention-few-queries", causal=False, seqlen_q=5, seqlen_k=77),
    Case("more-queries-than-keys-see-nothing", seqlen_q=12, seqlen_k=7),
    Case("latent-chunks", causal=False, seqlen_q=12, seqlen_k=70, group_mask=("same", 4, 20)),
    Case("mla-split-dots-decode", package="tiny_mla", heads_q=4, heads_k=4, seqlen_q=2, seqlen_k=80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.id for c in SPLIT_CASES])
def test_kernel_with_keys_split_over_programs_matches_reference(case, dtype):
    _, operands = _operands(case, dtype)
    options = dict(scale=0.25, causal=case.causal, window=case.window, group_mask=case.group_mask)
    launch = _forward_launch(case.package)
    golden, golden_lse = reference.attention(
        *[None if t is None else t.double() for t in operands], **options, return_lse=True
    )
    eager = reference.attention(*operands, **options)
    atol = {torch.float64: 1e-12, **ATOL}[dtype]
    packings = (True, False) if case.heads_q > case.heads_k else (None,)
    for num_splits, pack_gqa in [(n, p) for n in (1, 2, 3, 7) for p in packings]:
        out, lse = launch(*operands, **options, num_splits=num_splits, pack_gqa=pack_gqa)
        what = f"{case.id} {dtype} splits={num_splits} pack_gqa={pack_gqa}"
        assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not out.isnan().any(), what
        assert_close_to_golden(out, eager, golden, atol=atol, what=what)
        finite = golden_lse.isfinite()
        assert torch.equal(finite, lse.isfinite()), what
        # the reference returns its lse in fp32, fp64 inputs too: 1e-6 is that rounding at lse ~ 5
        assert max_error(lse[finite], golden_lse[finite]) < {torch.float16: 2e-3, torch.float64: 1e-6}.get(
            dtype, 1e-4
        ), what
        assert torch.equal(out[~finite.transpose(1, 2)], torch.zeros_like(out[~finite.transpose(1, 2)])), what
