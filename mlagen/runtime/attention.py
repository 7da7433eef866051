"""Launch-side helpers shared by every generated attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from mlagen.runtime import reference
from mlagen.runtime.launch import BlockConfig, multiprocessor_count, packs_gqa
from mlagen.tiles import padded as padded  # re-exported: mlagen.autotune imports it from here

LOG2E = 1.4426950408889634
GROUP_MASK_CODES = {None: 0, "same": 1, "earlier": 2}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, slots=True)
class AttentionDims:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_k: int
    d_a: int
    d_b: int
    d_v: int


def last_dim_contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels take any batch/sequence/head strides (including 0 for broadcasts)
    but read each row as one vector, so only the last dim must be dense."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def check_operands(
    q_a: torch.Tensor,
    q_b: torch.Tensor | None,
    k_a: torch.Tensor,
    k_b: torch.Tensor | None,
    v: torch.Tensor,
    *,
    expected: tuple[int, int, int],
) -> AttentionDims:
    """Validate attention operands against the dims the kernel was generated for."""
    named = {"q_a": q_a, "q_b": q_b, "k_a": k_a, "k_b": k_b, "v": v}
    present = {name: t for name, t in named.items() if t is not None}
    for name, tensor in present.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"attention operand {name} must be a 4-d tensor [B, S, heads, dim], got {shape}")
        if tensor.dtype != q_a.dtype:
            raise ValueError(
                f"attention operand {name} is {tensor.dtype} but q_a is {q_a.dtype}; use one dtype"
            )
        if tensor.device != q_a.device:
            raise ValueError(f"attention operand {name} is on {tensor.device} but q_a on {q_a.device}")
    if q_a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention runs in float16, bfloat16, float32 or float64, got {q_a.dtype}")
    if (q_b is None) != (k_b is None):
        raise ValueError("give both q_b and k_b (the second score part) or neither")
    batch, seqlen_q, heads_q, d_a = q_a.shape
    _, seqlen_k, heads_k, _ = k_a.shape
    d_b = q_b.shape[-1] if q_b is not None else 0
    d_v = v.shape[-1]
    if (d_a, d_b, d_v) != expected:
        raise ValueError(
            f"attention head dims (q.k {d_a}, second part {d_b}, v {d_v}) differ from the "
            f"generated kernel's {expected}; regenerate for this spec"
        )
    if k_a.shape[0] != batch or v.shape[0] != batch or k_a.shape[-1] != d_a:
        raise ValueError(f"k_a {list(k_a.shape)} does not match q_a {list(q_a.shape)}")
    if v.shape[1] != seqlen_k or v.shape[2] != heads_k:
        raise ValueError(f"v {list(v.shape)} does not match k_a {list(k_a.shape)} in length or heads")
    if heads_q % heads_k:
        raise ValueError(f"{heads_q} query heads cannot share {heads_k} kv heads evenly")
    if q_b is not None and k_b is not None:
        if q_b.shape[:3] != q_a.shape[:3]:
            raise ValueError(f"q_b {list(q_b.shape)} does not match q_a {list(q_a.shape)}")
        if k_b.shape[:2] != k_a.shape[:2] or k_b.shape[2] not in (1, heads_k) or k_b.shape[3] != d_b:
            raise ValueError(f"k_b {list(k_b.shape)} must be [B, Sk, 1 or {heads_k}, {d_b}]")
    return AttentionDims(batch, seqlen_q, seqlen_k, heads_q, heads_k, d_a, d_b, d_v)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run on tensor cores as tf32 (about 1e-3 relative, like cuBLAS with TF32
    allowed): in "ieee" they are FFMA loops that spill and overflow shared memory at the
    shipped head dims on every arch (issue 15). fp64 inputs (gradcheck) get exact products;
    16-bit inputs ignore the setting; the interpreter computes every dot exactly."""
    return "ieee" if dtype == torch.float64 else "tf32"


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """Softmax statistics and accumulators: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_mask_args(group_mask: reference.GroupMask | None) -> tuple[int, int, int]:
    if group_mask is None:
        return 0, 1, 1
    mode, q_group, k_group = group_mask
    return GROUP_MASK_CODES[mode], q_group, k_group


def check_decode_operands(
    q_latent: torch.Tensor, q_rope: torch.Tensor, cache, *, latent: int, rope: int
) -> None:
    for name, tensor, width in (("q_latent", q_latent, latent), ("q_rope", q_rope, rope)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[-1] != width:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be [B, Sq, heads, {width}], got {shape}")
    if q_rope.shape[:3] != q_latent.shape[:3]:
        raise ValueError(f"q_rope {list(q_rope.shape)} does not match q_latent {list(q_latent.shape)}")
    if (cache.latent_dim, cache.rope_dim) != (latent, rope):
        raise ValueError(
            f"the cache holds latent {cache.latent_dim} + rope {cache.rope_dim} per token; this "
            f"kernel reads {latent} + {rope}: the cache belongs to another spec"
        )
    if q_latent.shape[0] != cache.batch_size:
        raise ValueError(
            f"the input has batch {q_latent.shape[0]} but the cache holds {cache.batch_size} sequences"
        )
    if q_latent.device != cache.buffer.device or q_latent.dtype != cache.buffer.dtype:
        raise ValueError(
            f"queries are {q_latent.dtype} on {q_latent.device} but the cache is "
            f"{cache.buffer.dtype} on {cache.buffer.device}; create the cache from this module"
        )


# A split writes fp32 partials for its rows (and the combine reads them back); it reads at least
# this many times their bytes of cache, so partials stay a small fraction of the traffic
# (issue 15: at B=64, L=4096 the old rule added 56% to the cache bytes).
CACHE_BYTES_PER_PARTIAL_BYTE = 4


def decode_splits(
    programs: int,
    rows_per_program: int,
    longest: int,
    device: torch.device,
    *,
    block_n: int,
    latent: int,
    rope: int,
    dtype: torch.dtype,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """Split-KV plan of the decode kernel: (splits, keys per split, a multiple of block_n), for a
    grid of `programs` per split, each with `rows_per_program` (token, head) rows.
    Decode is bound by reading the cache, so the grid should fill the GPU once: as many splits
    as fit one wave (SMs // programs, so one split and no combine once the programs alone fill
    more than half the SMs), bounded so that each split reads CACHE_BYTES_PER_PARTIAL_BYTE times
    the partial bytes it writes. `num_splits` (a tuned or forced count) replaces the choice. Under the
    interpreter: one split per 64 keys (at most 8), so short test caches exercise the combine."""
    if num_splits is None:
        sms = multiprocessor_count(device)
        if sms is None:
            num_splits = min(8, -(-longest // 64))
        else:
            partial_bytes = rows_per_program * latent * lse_dtype(dtype).itemsize
            min_keys = CACHE_BYTES_PER_PARTIAL_BYTE * partial_bytes / ((latent + rope) * dtype.itemsize)
            num_splits = min(sms // max(1, programs), int(longest // min_keys), 64)
    num_splits = max(1, num_splits)
    keys_per_split = -(-max(block_n, -(-longest // num_splits)) // block_n) * block_n
    return max(1, -(-longest // keys_per_split)), keys_per_split


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """How the forward launcher lays out one launch (templates/_attention_fwd.jinja), so that
    mlagen.autotune reads the same plan rather than a copy of the rules."""

    pack_gqa: bool  # a program's rows are (token, head) pairs of one key head's query heads
    rows: int  # query rows per head (pack_gqa: per key head)
    grid: tuple[int, int]  # (row blocks, batch x heads), the split index aside
    num_splits: int
    keys_per_split: int


def forward_plan(
    dims: AttentionDims,
    config: BlockConfig,
    device: torch.device,
    *,
    dtype: torch.dtype,
    pack_gqa: bool | None = None,
    num_splits: int | None = None,
) -> ForwardPlan:
    """GQA packing where it leaves fewer padded rows (runtime.launch.packs_gqa), and split-KV
    only where all of a head's (group's) rows fit one block and the grid would not fill the GPU
    (decode_splits); a forced or tuned (config.num_splits) count replaces the choice."""
    group = dims.heads_q // dims.heads_k
    if pack_gqa is None:
        pack_gqa = packs_gqa(dims.seqlen_q, group, config.block_m, device)
    rows = dims.seqlen_q * group if pack_gqa else dims.seqlen_q
    grid = (-(-rows // config.block_m), dims.batch * (dims.heads_k if pack_gqa else dims.heads_q))
    if num_splits is None:
        num_splits = config.num_splits
    if num_splits is None and grid[0] > 1:
        num_splits = 1  # prefill: the row blocks fill the GPU
    num_splits, keys_per_split = decode_splits(
        grid[0] * grid[1],
        min(rows, config.block_m),
        dims.seqlen_k,
        device,
        block_n=config.block_n,
        latent=dims.d_v,
        rope=dims.d_a + dims.d_b,
        dtype=dtype,
        num_splits=num_splits,
    )
    return ForwardPlan(bool(pack_gqa), rows, grid, num_splits, keys_per_split)
