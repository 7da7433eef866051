"""What the generated kernels of a `compressed` (DeepSeek-V4) package need at run time: block
sizes, the autograd Functions around the launchers, and KernelOps, the table of operations
a generated forward runs on (runtime/compressed.py has the plain-torch ReferenceOps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mlagen.runtime.compressed import entry_positions, top_k_reference
from mlagen.runtime.launch import (
    INTERPRETER_CONFIG,
    BlockConfig,
    launch_arch,
    programs_along_columns,
    smem_class,
    triton_version,
)

# --- block sizes --------------------------------------------------------------------------------


def compressor_config(rate: int, overlap: bool, device: torch.device) -> BlockConfig:
    """block_n is the slots pooled per step (a power of two; the window's 2 * rate slots with
    overlap, else rate, are walked in steps of it)."""
    slots = 2 * rate if overlap else rate
    if launch_arch(device) is None:
        return BlockConfig(
            block_m=1, block_n=min(16, 1 << (slots - 1).bit_length()), num_warps=1, num_stages=1
        )
    # Four [slots, D / 2] fp32 tiles (kv and gate, even and odd columns) per step, 4 slots of a
    # 512-wide entry: on 4 warps ptxas spills the loop's statistics around the cache-reading
    # variant's second source (24-56 bytes, fp16 and bf16, sm_89 to sm_100); 8 warps do not.
    return BlockConfig(block_m=1, block_n=min(4, 1 << (slots - 1).bit_length()), num_warps=8, num_stages=1)


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Tiles of the compressed attention kernels. block_m rows are (token, head) pairs, block_n
    keys per step; `columns` how programs keep the output's columns (runtime.launch.COLUMN_LAYOUTS,
    templates/_compressed_attention.jinja)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    columns: str

    def __post_init__(self) -> None:
        programs_along_columns(self.columns)  # a known layout

    @property
    def column_programs(self) -> int:
        return programs_along_columns(self.columns)


# Small tiles under the interpreter make short test sequences span several blocks; column halves
# in programs of their own, as on sm_100 (tests pass the other two ways too).
INTERPRETED_ATTENTION = AttentionConfig(16, 16, 1, 1, columns="split")


def _own_mma_needs_64_rows(arch: int, dtype: torch.dtype) -> bool:
    """wgmma (sm_90) and tcgen05 (sm_100) take 16-bit dots of 64 rows or more."""
    return smem_class(arch) == "large" and dtype.itemsize == 2


def compressed_attention_config(
    dim: int, heads: int, device: torch.device, dtype: torch.dtype, selects: bool = False
) -> AttentionConfig:
    """The [block_m, D] fp32 accumulator (or its half), the query and a K = V tile [block_n, D]
    live at once. `selects`: the program walks each query's selected entries (CSA), a loop
    more than HCA's or the window's."""
    arch = launch_arch(device)
    if arch is None:
        return INTERPRETED_ATTENTION
    if dim > 256 and _own_mma_needs_64_rows(arch, dtype):
        # 64 rows, key tiles in 2 stages (cp.async). sm_90 at head counts Triton specialises as
        # multiples of 16: one program keeps all D columns, two warpgroups splitting each dot's
        # N, 32-key tiles: 252-255 registers, 132 KB, 577-654 issue-clocks per 1K (row, key)
        # pairs (two column-half programs: 1614-1728; 64 keys spill 8-168 B). At other head counts
        # (the (token, head) index math of an unspecialised count) that spills 40-176 B, and
        # sm_90 keeps two column-half programs of 16 keys (215-244 registers, 96 KB; 32 keys
        # spill 48-56 B over the ring). sm_100 (tcgen05 accumulates in tensor memory): column
        # halves of 32 keys, 196-214 registers, 113 KB. Triton 3.6 spills 352 B of the sm_100
        # CSA program at 2 stages, 48-51 local loads and stores a step (2160 issue-clocks per 1K
        # pairs a program): one stage there (72-80 B kept over the loop, none in it; 544-639).
        if arch // 10 == 9:
            if heads % 16 == 0:
                return AttentionConfig(64, 32, 8, 2, columns="whole")
            return AttentionConfig(64, 16, 8, 2, columns="split")
        stages = 1 if selects and triton_version() < (3, 9) else 2
        return AttentionConfig(64, 32, 8, stages, columns="split")
    if dim > 256:
        return AttentionConfig(16, 32, 8, 1, columns="halves")
    return AttentionConfig(32, 32, 4, 2, columns="halves")


@dataclass(frozen=True, slots=True)
class BackwardConfig:
    """Tiles of the compressed attention backward: block_m (token, head) rows by block_n keys,
    the head dim walked chunk columns at a time (templates/_compressed_attention.jinja)."""

    block_m: int
    block_n: int
    chunk: int
    num_warps: int
    num_stages: int


# Two chunks of the tiny specs' 64-wide heads, and blocks that short test sequences span several of.
INTERPRETED_BACKWARD = BackwardConfig(16, 16, 32, 1, 1)


def compressed_attention_backward_config(device: torch.device, dtype: torch.dtype) -> BackwardConfig:
    """No [block_m, D] operand or accumulator lives through the key loop, only the [block_m,
    block_n] scores and dP and one chunk of Q, dO and the keys, so the rows can be the arch's
    MMA tile: 64 (wgmma on sm_90, tcgen05 on sm_100; block_n is dK's rows, so 64 too).
    Readings at D = 512 (tests/test_compressed_compile.py and the arch matrix, as launched):
    sm_90 64-column chunks at one stage, 252-255 registers (two stages spill 144 bytes over
    every entry; 32-column chunks fit two stages at 211-237 but issue 20% more a tile); sm_100
    32-column chunks, 180-247 (64 spill 144 bytes); the mma.sync archs unroll the chunk loops,
    and 64 rows spill 72-1968 bytes on sm_80/89 (16 on sm_120), where 32 rows at one stage fit
    (156-252). fp32 (tf32) takes 16-column chunks: 32 spill 48-128 bytes on sm_80/89."""
    arch = launch_arch(device)
    if arch is None:
        return INTERPRETED_BACKWARD
    if dtype.itemsize > 2:
        return BackwardConfig(32, 64, 16, num_warps=4, num_stages=1)
    if arch // 10 == 9:
        return BackwardConfig(64, 64, 64, num_warps=4, num_stages=1)
    if arch // 10 == 10:
        return BackwardConfig(64, 64, 32, num_warps=4, num_stages=2)
    return BackwardConfig(32, 64, 32, num_warps=4, num_stages=1)


def entry_indexer_config(device: torch.device) -> BlockConfig:
    if launch_arch(device) is None:
        return INTERPRETER_CONFIG
    return BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)


# --- autograd ------------------------------------------------------------------------------------


class _Compress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, gate, bias, norm_weight, cos, sin, launch, backward, rate, overlap, eps):
        ctx.save_for_backward(kv, gate, bias, norm_weight, cos, sin)
        ctx.options = (backward, rate, overlap, eps)
        return launch(kv, gate, bias, norm_weight, cos, sin, rate=rate, overlap=overlap, eps=eps)

    @staticmethod
    def backward(ctx, grad_out):
        kv, gate, bias, norm_weight, cos, sin = ctx.saved_tensors
        backward, rate, overlap, eps = ctx.options
        grads = backward(
            grad_out[:, :, 0], kv, gate, bias, norm_weight, cos, sin, rate=rate, overlap=overlap, eps=eps
        )
        return (*grads, None, None, None, None, None, None, None)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, entries, selected, sinks, cos, sin, launch, backward, scale, window, rate):
        out, lse = launch(
            query, key, entries, selected, sinks, cos, sin, scale=scale, window=window, rate=rate
        )
        ctx.save_for_backward(query, key, entries, selected, sinks, cos, sin, out, lse)
        ctx.options = (backward, scale, window, rate)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, entries, selected, sinks, cos, sin, out, lse = ctx.saved_tensors
        backward, scale, window, rate = ctx.options
        d_query, d_key, d_entries, d_sinks = backward(
            grad_out,
            query,
            key,
            entries,
            selected,
            sinks,
            cos,
            sin,
            out,
            lse,
            scale=scale,
            window=window,
            rate=rate,
        )
        return d_query, d_key, d_entries, None, d_sinks, None, None, None, None, None, None, None


# --- the operation table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelOps:
    """The generated kernels of a package, by kernel name: compressors and attentions as
    (launch, backward), indexers as launch. Same methods as compressed.ReferenceOps."""

    compressors: Mapping[str, tuple[Callable, Callable]]
    indexers: Mapping[str, Callable]
    attentions: Mapping[str, tuple[Callable, Callable]]

    def compress(self, name, kv, gate, bias, norm_weight, rotary, *, rate, overlap, eps, kernel):
        batch, seqlen = kv.shape[:2]
        cos, sin = rotary(entry_positions(0, seqlen // rate, rate, batch, kv.device), kv.dtype)
        launch, backward = self.compressors[kernel]
        return _Compress.apply(kv, gate, bias, norm_weight, cos, sin, launch, backward, rate, overlap, eps)

    def index_scores(self, query, keys, weights, *, scale, weight_scale, rate, kernel):
        # The selection is not differentiable: the scores are computed from values only.
        query, keys, weights = query.detach(), keys.detach(), weights.detach()
        return self.indexers[kernel](query, keys, weights, scale=scale, weight_scale=weight_scale, rate=rate)

    def top_k(self, scores, k):
        return top_k_reference(scores, k).to(torch.int32)

    def attention(self, query, key, entries, selected, sinks, cos, sin, *, scale, window, rate, kernel):
        launch, backward = self.attentions[kernel]
        return _Attention.apply(
            query, key, entries, selected, sinks, cos, sin, launch, backward, scale, window, rate
        )
