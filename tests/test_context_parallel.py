"""Context parallelism against single-rank attention of the whole sequence.

Every rank builds the same full-sequence inputs (same seed), runs the generated kernel
on the whole sequence as the oracle, then runs ring attention on its zigzag part: the
output and every gradient must be the oracle's rows for its tokens; gradients of
weights shared by all ranks must sum over ranks to the oracle's. On CPU the ranks are
gloo processes running the kernels under the Triton interpreter; the GPU test runs
the same bodies over NCCL, one GPU per rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mlagen.parallel import (
    context_parallel,
    context_parallel_attention,
    zigzag_gather,
    zigzag_merge,
    zigzag_position_ids,
    zigzag_split,
)
from tests.distributed import run_distributed
from tests.helpers import generated, max_error
from tests.test_training import _randomized

OP_SPECS = ("tiny_mla", "tiny_gqa", "tiny_mqa", "tiny_mha_bidirectional")
MODULE_SPECS = ("tiny_mla", "tiny_mla_yarn", "tiny_gqa", "tiny_mqa", "tiny_mha_bidirectional")
# Errors relative to the oracle's largest value: the ring sums the same terms in another order.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}
SEQLEN = 16  # 2 ranks: chunks of 4 tokens; 4 ranks: chunks of 2
BATCH = 2


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return max_error(actual, expected) / max(expected.abs().max().item(), 1e-30)


def _check(errors: dict[str, float], what: str, actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    errors[what] = _relative_error(actual, expected)
    assert errors[what] <= TOLERANCE[dtype], f"{what}: relative error {errors[what]:.3g}"


def _summed(grad: torch.Tensor, group) -> torch.Tensor:
    total = grad.clone()
    dist.all_reduce(total, group=group)
    return total


def _group_for(device: str):
    """The process group the bodies use: the default gloo one on CPU, NCCL over one GPU per rank."""
    if device == "cpu":
        return None
    torch.cuda.set_device(dist.get_rank())
    return dist.new_group(backend="nccl")


def _device(device: str) -> torch.device:
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device())


def check_attention_op(name: str, dtype: torch.dtype, rank: int, world_size: int, device, group) -> dict:
    """Ring attention over the compact block against the kernel on the whole sequence."""
    package = generated(name)
    spec = package.SPEC
    (kernel,) = package.ATTENTION
    attention = package.ATTENTION[kernel]
    seqlen, heads = SEQLEN, spec["heads"]
    options = dict(dtype=dtype, device=device)
    if spec["family"] == "mla":
        dn, dr, dv, latent = (
            spec[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
        )
        queries = [
            torch.randn(BATCH, seqlen, heads, dn, **options),
            torch.randn(BATCH, seqlen, heads, dr, **options),
        ]
        block = [torch.randn(BATCH, seqlen, latent, **options), torch.randn(BATCH, seqlen, 1, dr, **options)]
        weight = (torch.randn(heads * (dn + dv), latent, **options) / latent**0.5).requires_grad_()
        params = [weight]
        scale = (dn + dr) ** -0.5

        def expand(compact):
            kv_heads = F.linear(compact[0], weight).unflatten(-1, (heads, dn + dv))
            return kv_heads[..., :dn], compact[1], kv_heads[..., dn:]
    else:
        head_dim, kv_heads = spec["head_dim"], spec["kv_heads"]
        queries = [torch.randn(BATCH, seqlen, heads, head_dim, **options), None]
        block = [torch.randn(BATCH, seqlen, kv_heads, head_dim, **options) for _ in range(2)]
        params, scale, expand = [], head_dim**-0.5, None
    grad_out = torch.randn(BATCH, seqlen, heads, package.kernels.HEAD_DIMS[kernel][2], **options)
    leaves = [t.requires_grad_() for t in queries + block if t is not None]

    k_a, k_b, v = expand(block) if expand else (block[0], None, block[1])
    full = attention(queries[0], queries[1], k_a, k_b, v, scale=scale, causal=spec["causal"])
    full_grads = torch.autograd.grad(full, leaves + params, grad_out)

    def local(t):
        return None if t is None else zigzag_split(t.detach(), rank, world_size).requires_grad_()

    local_queries, local_block = [local(t) for t in queries], [local(t) for t in block]
    local_leaves = [t for t in local_queries + local_block if t is not None]
    out = context_parallel_attention(
        kernel,
        *local_queries,
        local_block,
        expand,
        scale=scale,
        causal=spec["causal"],
        group=group,
        expand_params=params,
    )
    local_grads = torch.autograd.grad(out, local_leaves + params, zigzag_split(grad_out, rank, world_size))

    names = ["q_nope", "q_pe", "c_kv", "k_pe"] if spec["family"] == "mla" else ["q", "k", "v"]
    errors: dict[str, float] = {}
    _check(errors, "out", out, zigzag_split(full, rank, world_size), dtype)
    for operand, grad, expected in zip(
        names, local_grads[: len(local_leaves)], full_grads[: len(leaves)], strict=True
    ):
        _check(errors, f"d {operand}", grad, zigzag_split(expected, rank, world_size), dtype)
    for grad, expected in zip(local_grads[len(local_leaves) :], full_grads[len(leaves) :], strict=True):
        _check(errors, "d kv_b weight", _summed(grad, group), expected, dtype)
    return errors


def check_module(name: str, dtype: torch.dtype, rank: int, world_size: int, device, group) -> dict:
    """context_parallel(module) on this rank's tokens against module(whole sequence)."""
    module = _randomized(name, dtype).to(device)
    x = torch.randn(BATCH, SEQLEN, generated(name).D_MODEL, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    full = module(x)
    full.backward(grad_out)
    full_grads = {param_name: p.grad for param_name, p in module.named_parameters()}

    module.zero_grad(set_to_none=True)
    x_local = zigzag_split(x.detach(), rank, world_size).requires_grad_()
    out = context_parallel(module, group)(x_local)
    out.backward(zigzag_split(grad_out, rank, world_size))

    errors: dict[str, float] = {}
    _check(errors, "out", out, zigzag_split(full, rank, world_size), dtype)
    _check(errors, "d hidden_states", x_local.grad, zigzag_split(x.grad, rank, world_size), dtype)
    for param_name, param in module.named_parameters():
        _check(errors, f"d {param_name}", _summed(param.grad, group), full_grads[param_name], dtype)
    return errors


def check_layout(rank: int, world_size: int, device, group) -> None:
    full = torch.arange(2 * SEQLEN).reshape(2, SEQLEN)
    local = zigzag_split(full, rank, world_size)
    chunk = SEQLEN // (2 * world_size)
    assert local[0, :chunk].tolist() == list(range(rank * chunk, (rank + 1) * chunk))
    assert torch.equal(zigzag_position_ids(SEQLEN, rank, world_size), local[0])
    assert torch.equal(zigzag_gather(local.to(device), group).cpu(), full)


def check_refusals(device, group) -> None:
    package = generated("tiny_gqa")
    (kernel,) = package.ATTENTION
    q, k = torch.randn(1, 5, 4, 16, device=device), torch.randn(1, 5, 2, 16, device=device)
    with pytest.raises(ValueError, match="even number of tokens per rank"):
        context_parallel_attention(kernel, q, None, (k, k), scale=1.0, causal=True, group=group)
    with pytest.raises(ValueError, match="no mlagen attention op named 'attention_nope'"):
        context_parallel_attention("attention_nope", q, None, (k, k), scale=1.0, causal=True, group=group)
    with pytest.raises(ValueError, match="even number of tokens per rank"):
        context_parallel(package.Attention(device=device), group)(torch.randn(1, 5, 64, device=device))
    # Uneven non-causal splits: every rank refuses together (no rank receives a wrongly sized block).
    length = 3 + 2 * dist.get_rank(group)
    # zeros, not randn: a draw of a rank-dependent size would desynchronise the ranks' generators
    q, k = torch.zeros(1, length, 4, 16, device=device), torch.zeros(1, length, 2, 16, device=device)
    with pytest.raises(ValueError, match="same query and K/V block shapes on every rank"):
        context_parallel_attention(kernel, q, None, (k, k), scale=1.0, causal=False, group=group)


def ring_body(rank: int, world_size: int, device: str, op_dtypes: tuple, module_dtypes: tuple) -> None:
    """Every check on one set of ranks (starting the processes costs more than a check)."""
    group = _group_for(device)
    where = _device(device)
    check_layout(rank, world_size, where, group)
    check_refusals(where, group)
    for name in OP_SPECS:
        for dtype in op_dtypes:
            check_attention_op(name, dtype, rank, world_size, where, group)
    for name in MODULE_SPECS:
        for dtype in module_dtypes:
            check_module(name, dtype, rank, world_size, where, group)


FP32, FP64 = torch.float32, torch.float64


# fp64 shows the merge is exact (errors ~1e-16); fp32 is the everyday case. 4 ranks on
# CI's 2 cores are slow, so they check fewer dtypes.
@pytest.mark.parametrize(
    ("world_size", "op_dtypes", "module_dtypes"),
    [(2, (FP64, FP32), (FP32, FP64)), (4, (FP64,), (FP32,))],
    ids=["2_ranks", "4_ranks"],
)
def test_context_parallel_equals_one_rank_forward_and_backward(world_size, op_dtypes, module_dtypes):
    run_distributed(ring_body, world_size, "cpu", op_dtypes, module_dtypes)


def test_zigzag_merge_inverts_split_and_odd_lengths_are_refused():
    full = torch.randn(2, 24, 3)
    assert torch.equal(zigzag_merge([zigzag_split(full, r, 3) for r in range(3)]), full)
    with pytest.raises(ValueError, match="divisible by 2 \\* world_size = 6"):
        zigzag_split(full[:, :20], 0, 3)


def test_ring_attention_needs_an_initialised_process_group():
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="call dist.init_process_group first"):
        context_parallel_attention("attention_fwd_qk16_v16", q, None, (q, q), scale=1.0, causal=True)


@pytest.mark.parametrize("name", ["tiny_swa", "tiny_latent"])
def test_windowed_and_latent_specs_are_refused(name):
    with pytest.raises(ValueError, match="context parallelism does not support"):
        context_parallel(generated(name).Attention())


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4], ids=lambda w: f"{w}_ranks")
def test_context_parallel_over_nccl_equals_one_gpu(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    run_distributed(ring_body, world_size, "cuda", (torch.float32,), (torch.float32,))


def test_readme_torchrun_example():
    """README "Several GPUs": `torchrun --nproc-per-node 2 examples/parallel_attention.py` runs and agrees."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "parallel_attention.py")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(errors) == 5 and max(errors) < 1e-5, result.stdout
