"""Gradients of the generated attention kernels against the plain-torch reference,
for every family and flag combination the forward supports.

Golden: autograd through the reference in fp64. Eager: the same in the kernel's
dtype. The kernel's gradients pass at most 2x eager's error plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

from mlagen.runtime import reference
from mlagen.runtime.launch import BlockConfig
from tests.helpers import assert_close_to_golden, generated, max_error
from tests.test_attention_kernel import CASES, Case, _operands

ATOL = {torch.float32: 1e-5, torch.float16: 3e-3}
NAMES = ("q_a", "q_b", "k_a", "k_b", "v")


def _grads(fn, operands, grad_out, options):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in operands]
    out = fn(*leaves, **options)
    out.backward(grad_out.to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


def _check(case: Case, dtype: torch.dtype):
    entry, operands = _operands(case, dtype)
    options = dict(scale=0.3, causal=case.causal, window=case.window, group_mask=case.group_mask)
    grad_out = torch.randn(operands[0].shape[:3] + operands[4].shape[-1:], dtype=torch.float64)
    _, kernel_grads = _grads(entry, operands, grad_out, options)
    _, eager_grads = _grads(reference.attention, operands, grad_out, options)
    golden_ops = [None if t is None else t.double() for t in operands]
    _, golden_grads = _grads(reference.attention, golden_ops, grad_out, options)
    for name, kernel, eager, golden in zip(NAMES, kernel_grads, eager_grads, golden_grads, strict=True):
        if golden is None:
            assert kernel is None
            continue
        assert kernel.shape == golden.shape, f"{name}: {kernel.shape} vs {golden.shape}"
        assert not kernel.isnan().any(), name
        assert_close_to_golden(kernel, eager, golden, atol=ATOL[dtype], what=f"{case.id} {dtype} d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_match_reference(case, dtype):
    _check(case, dtype)


# Masks wide enough that the interpreter's 16-row tiles hold tiles with no masked pair, so the
# kernels' unmasked loops run for windows and chunk masks too (CASES reach them only causal or
# bidirectional), beside the masked tiles around them.
FULL_TILE_CASES = [
    Case("gqa-window-wider-than-tiles", heads_q=4, heads_k=2, seqlen_q=90, seqlen_k=90, window=40),
    Case("latent-same-chunks-wider-than-tiles", causal=False, seqlen_q=70, seqlen_k=100, group_mask=("same", 35, 50)),
    Case("latent-earlier-chunks-wider-than-tiles", causal=False, seqlen_q=80, seqlen_k=64,
         group_mask=("earlier", 40, 32)),
    Case("split-dots-causal-continuing-a-prefix", package="tiny_mla", heads_q=2, heads_k=2, seqlen_q=40,
         seqlen_k=75),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", FULL_TILE_CASES, ids=[c.id for c in FULL_TILE_CASES])
def test_gradients_of_tiles_without_masked_pairs_match_reference(case, dtype):
    _check(case, dtype)


GRADCHECK_CASES = [
    Case("mla-split-causal", package="tiny_mla", heads_q=1, heads_k=1, seqlen_q=3, seqlen_k=3),
    Case("gqa-window", heads_q=2, heads_k=1, seqlen_q=4, seqlen_k=4, window=2),
    Case("latent-earlier-chunks", heads_q=1, heads_k=1, causal=False, seqlen_q=6, seqlen_k=4,
         group_mask=("earlier", 2, 2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.id for c in GRADCHECK_CASES])
def test_gradcheck_kernels_in_fp64(case):
    # The interpreter runs the kernels in fp64, so their analytic backward is checked
    # against finite differences of the kernels' own forward.
    entry, operands = _operands(case, torch.float64, batch=1)
    options = dict(scale=0.3, causal=case.causal, window=case.window, group_mask=case.group_mask)
    present = [i for i, t in enumerate(operands) if t is not None]

    def attention(*leaves):
        ops = list(operands)
        for i, leaf in zip(present, leaves, strict=True):
            ops[i] = leaf
        return entry(*ops, **options)

    leaves = [operands[i].clone().requires_grad_(True) for i in present]
    assert torch.autograd.gradcheck(attention, leaves)


def test_lse_gradient_flows_through_the_custom_op():
    # Partial results over disjoint keys merge by their lse (context parallelism); the merged
    # output's gradient must reach the inputs through the lse output too.
    kernels = generated("tiny_gqa").kernels
    op = kernels.attention_qk16_v16_op
    q, k, v = (torch.randn(1, 9, 2, 16, dtype=torch.float64) for _ in range(3))

    def merged(q, k, v, use_kernel):
        parts = []
        for lo, hi in ((0, 4), (4, 9)):
            if use_kernel:
                out, lse = op(q.float(), None, k[:, lo:hi].float(), None, v[:, lo:hi].float(), 0.25, False, None,
                              0, 1, 1)
            else:
                out, lse = reference.attention(q, None, k[:, lo:hi], None, v[:, lo:hi], scale=0.25, causal=False,
                                               return_lse=True)
            parts.append((out.double(), lse.double()))
        lse = torch.logaddexp(parts[0][1], parts[1][1])
        return sum(torch.exp(p_lse - lse).transpose(1, 2)[..., None] * p_out for p_out, p_lse in parts)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    merged(*leaves, use_kernel=True).square().sum().backward()
    golden = [t.clone().requires_grad_(True) for t in (q, k, v)]
    merged(*golden, use_kernel=False).square().sum().backward()
    full = reference.attention(q, None, k, None, v, scale=0.25, causal=False)
    assert max_error(merged(q, k, v, use_kernel=True), full) < 1e-5
    for kernel, reference_leaf in zip(leaves, golden, strict=True):
        assert max_error(kernel.grad, reference_leaf.grad) < 1e-4


# Decode-like shapes (all of a head's query rows in one block, a long cache): the forward splits
# the keys over programs and merges them (the interpreter splits every 64 keys), so the backward
# reads the merged log-sum-exp.
SPLIT_KV_CASES = [
    Case("gqa-few-queries-long-cache", heads_q=4, heads_k=2, seqlen_q=3, seqlen_k=100),
    Case("window-few-queries-long-cache", heads_q=2, heads_k=2, seqlen_q=2, seqlen_k=130, window=70),
    Case("split-dots-few-queries-long-cache", package="tiny_mla", heads_q=2, heads_k=2, seqlen_q=2, seqlen_k=90),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SPLIT_KV_CASES, ids=[c.id for c in SPLIT_KV_CASES])
def test_gradients_through_a_forward_split_over_the_keys_match_reference(case, dtype, monkeypatch):
    from mlagen.runtime import ops

    kernels = generated(case.package).kernels
    kernel = next(iter(kernels.ATTENTION))
    combine_name = f"attention_v{kernels.HEAD_DIMS[kernel][2]}_combine"
    # The op runs the launcher registered last for this kernel name (packages share it): count
    # the combine launches of that launcher's module.
    launcher_globals = ops._IMPLEMENTATIONS[kernel][0].__globals__
    combine, merges = launcher_globals[combine_name], []

    class Counting:
        def __getitem__(self, grid):
            merges.append(grid)
            return combine[grid]

    monkeypatch.setitem(launcher_globals, combine_name, Counting())
    _check(case, dtype)
    assert merges, "the forward did not split its keys"


# The dQ kernel streams its own number of keys a step (BlockConfig.dq_block_n, 64 on sm_90 and
# sm_100 where dK/dV streams 16 or 32 rows): wider and narrower than the held side, over masked
# and full tiles.
DQ_STEP_CONFIGS = {
    "dq-wider-than-held": BlockConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, dq_block_n=32),
    "dq-wider-than-dkdv": BlockConfig(block_m=16, block_n=32, num_warps=1, num_stages=1, dq_block_n=64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", DQ_STEP_CONFIGS.values(), ids=DQ_STEP_CONFIGS.keys())
@pytest.mark.parametrize("case", FULL_TILE_CASES, ids=[c.id for c in FULL_TILE_CASES])
def test_gradients_with_dq_steps_of_their_own_match_reference(case, config, dtype, monkeypatch):
    from mlagen.runtime import ops

    kernel = next(iter(generated(case.package).kernels.ATTENTION))
    launcher_globals = ops._IMPLEMENTATIONS[kernel][1].__globals__  # the backward launcher
    chosen = []

    def configured(*args, **kwargs):
        chosen.append(config)
        return config

    monkeypatch.setitem(launcher_globals, "default_backward_config", configured)
    _check(case, dtype)
    assert chosen, "the backward did not take the patched config"
