"""Tensor parallelism over heads: a sharded module's output, every gradient (input, and
each parameter's slice) and MLA's cached decode equal the unsharded module's on every rank.

Each case runs in `world_size` processes (gloo on CPU under the Triton interpreter; NCCL on
GPUs in the gpu test): every rank builds the same unsharded module, shards a copy, and
compares. The expected gradient of a sharded parameter is the unsharded gradient put
through the same sharding (a copy of the module holding its gradients as weights); the
forward comparison is what checks that the slices are the right ones.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from mlagen.parallel import tensor_parallel
from mlagen.parallel.tensor import head_shard
from tests.distributed import run_distributed
from tests.helpers import generated, max_error

# (spec, what it exercises); heads per rank = heads / world size.
WORLD_2 = [
    ("tiny_mla", "mla-q_lora-2_heads_per_rank"),
    ("tiny_mla_yarn", "mla-plain_q_proj-1_head_per_rank"),
    ("tiny_gqa", "gqa-kv_heads_split"),
    ("tiny_mqa", "mqa-kv_head_replicated"),
    ("tiny_mha_bidirectional", "mha-biases-1_head_per_rank"),
    ("tiny_latent", "latent-1_head_per_rank"),
    ("tiny_hybrid", "latent_hybrid-gate_and_window"),
    ("tiny_dsa", "sparse_mla-indexer_replicated-2_heads_per_rank"),
]
WORLD_4 = [
    ("tiny_mla", "mla-1_head_per_rank"),
    ("tiny_gqa", "gqa-2_kv_heads_replicated_over_4_ranks"),
    ("tiny_swa", "swa-2_kv_heads_replicated_over_4_ranks"),
]
# Sharding changes only the order of sums (o_proj's over heads, gradients' over ranks), so
# errors relative to each tensor's largest value stay at a few units of rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-13}


def _randomized(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The same module on every rank, every parameter (norm weights, biases, the gate) random
    so that each one matters."""
    torch.manual_seed(0)
    module = generated(name).Attention(dtype=torch.float64)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5 + (1.0 if param.dim() == 1 else 0.0))
    return module.to(dtype=dtype, device=device)


def _forward_backward(module, x, weight, reference=False):
    x = x.clone().requires_grad_(True)
    out = (module.reference_forward if reference else module)(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


def _expected_grads(full: torch.nn.Module, group) -> dict[str, torch.Tensor]:
    """The unsharded gradients, sharded the way the parameters are."""
    grads = copy.deepcopy(full)
    with torch.no_grad():
        for param, source in zip(grads.parameters(), full.parameters()):
            param.copy_(source.grad if source.grad is not None else torch.zeros_like(param))
    return dict(tensor_parallel(grads, group).named_parameters())


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return max_error(actual, expected) / max(1.0, expected.abs().max().item())


def _check(name: str, rank: int, world_size: int, group, device: torch.device, dtype: torch.dtype) -> dict:
    full = _randomized(name, dtype, device)
    sharded = tensor_parallel(copy.deepcopy(full), group)
    assert sharded.heads * world_size == full.heads
    x = torch.randn(2, 11, full.o_proj.out_features, dtype=dtype, device=device)
    weight = torch.randn(2, 11, full.o_proj.out_features, dtype=dtype, device=device)
    errors = {}
    out, x_grad = _forward_backward(full, x, weight)
    paths = [False, True] if name == "tiny_gqa" else [False]  # reference_forward: no shared input sum
    for reference in paths:
        sharded.zero_grad()
        sharded_out, sharded_x_grad = _forward_backward(sharded, x, weight, reference)
        errors["output"] = max(errors.get("output", 0.0), _relative_error(sharded_out, out))
        errors["input grad"] = max(errors.get("input grad", 0.0), _relative_error(sharded_x_grad, x_grad))
        expected = _expected_grads(full, group)
        for param_name, param in sharded.named_parameters():
            if param_name.startswith("indexer."):  # the selection is not differentiable
                assert param.grad is None, f"{name}: {param_name} got a gradient"
                continue
            assert param.grad is not None, f"{name}: {param_name} got no gradient"
            error = _relative_error(param.grad, expected[param_name])
            errors["param grads"] = max(errors.get("param grads", 0.0), error)
            assert error < TOLERANCE[dtype], f"{name} on rank {rank}: {param_name} gradient error {error:.3g}"
    if hasattr(full, "new_cache"):
        errors["decode"] = _decode_error(full, sharded, dtype, device)
    for what, error in errors.items():
        assert error < TOLERANCE[dtype], f"{name} on rank {rank} of {world_size}: {what} error {error:.3g}"
    return errors


def _decode_error(full, sharded, dtype, device) -> float:
    """Prefill 5 tokens, then steps of 1, 1 and 2 (speculative) tokens, over pages of 4."""
    x = torch.randn(2, 9, full.o_proj.out_features, dtype=dtype, device=device)
    caches = [module.new_cache(2, 12, page_size=4) for module in (full, sharded)]
    error = 0.0
    with torch.no_grad():
        for start, stop in [(0, 5), (5, 6), (6, 7), (7, 9)]:
            expected, got = (m(x[:, start:stop], cache=c) for m, c in zip((full, sharded), caches))
            error = max(error, _relative_error(got, expected))
    assert caches[1].host_lengths() == [9, 9]
    return error


def _body(
    rank: int, world_size: int, cases: list[tuple[str, str]], backend: str, dtypes: tuple[torch.dtype, ...]
) -> None:
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        group = dist.new_group(backend="nccl")
    else:
        device, group = torch.device("cpu"), None
    for dtype in dtypes:
        for name, case in cases:
            try:
                errors = _check(name, rank, world_size, group, device, dtype)
            except AssertionError as exc:
                raise AssertionError(f"{case}, world size {world_size}, {dtype}: {exc}") from None
            if rank == 0 and os.environ.get("MLAGEN_REPORT_ERRORS"):
                shown = ", ".join(f"{what} {error:.2g}" for what, error in errors.items())
                print(f"{case} ({name}) world_size {world_size} {dtype}: {shown}", flush=True)
    if world_size == 4:
        module = _randomized("tiny_mha_bidirectional", torch.float32, device)
        try:
            tensor_parallel(module, group)
        except ValueError as exc:
            assert "heads=2, which 4 ranks cannot share evenly" in str(exc), exc
        else:
            raise AssertionError("2 heads over 4 ranks must be refused")


@pytest.mark.parametrize(
    "world_size, cases, dtypes",
    [(2, WORLD_2, (torch.float32,)), (4, WORLD_4, (torch.float32, torch.float64))],
    ids=["world_size_2-fp32", "world_size_4-fp32-fp64"],
)
def test_sharded_module_matches_unsharded_forward_gradients_and_decode(world_size, cases, dtypes):
    # One group of processes per world size runs every case: starting them costs more than a case.
    run_distributed(_body, world_size, cases, "gloo", dtypes)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "world_size, cases", [(2, WORLD_2), (4, WORLD_4)], ids=["world_size_2", "world_size_4"]
)
def test_sharded_module_matches_unsharded_over_nccl(world_size, cases):
    # The same body, its collectives in an NCCL group over one GPU per rank.
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    run_distributed(_body, world_size, cases, "nccl", (torch.float32,))


@pytest.mark.parametrize(
    "heads, kv_heads, world_size",
    [(4, 2, 2), (4, 2, 4), (4, 1, 2), (12, 3, 2), (6, 2, 3), (64, 8, 16), (8, 8, 8)],
)
def test_every_query_head_reads_its_own_kv_head(heads, kv_heads, world_size):
    group_size = heads // kv_heads
    held = []
    for rank in range(world_size):
        shard = head_shard(heads, kv_heads, rank, world_size)
        local_group = len(shard.heads) // len(shard.kv_heads)
        assert local_group * len(shard.kv_heads) == len(shard.heads)
        for local, head in enumerate(shard.heads):
            assert shard.kv_heads[local // local_group] == head // group_size, (rank, head)
        held += shard.kv_heads
    assert shard.kv_replicated == (sorted(held) != list(range(kv_heads)))
    assert shard.kv_replicated == (kv_heads % world_size != 0)
