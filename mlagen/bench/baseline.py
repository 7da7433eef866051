"""The baseline a Triton user gets: plain Triton flash attention, forward and backward, in
the manner of Triton's tutorial 06 (fused attention), written for mlagen to measure its own
kernels against (`mlagen inspect --baseline`, and a timed contender on a GPU).

Notation: Q, K, V, O: [B, H, S, D] contiguous, read as [B*H*S, D] rows; LSE: [B*H, S] fp32,
the log-sum-exp of each row's scaled scores in base 2 (m + log2(l), scores times
sm_scale * log2(e)), which the backward needs to recompute P.

What makes it the tutorial's design:
- 128x128 forward tiles (8 warps) on sm_90 / sm_100, the query tile held while the keys
  stream past, the softmax scale folded into exp2;
- on sm_90 and later, tensor descriptors (TMA) for Q, K, V and O; plain loads elsewhere;
- causal attention in two loops: the key blocks before the diagonal without any mask work,
  then the diagonal block with the mask;
- the backward as a delta pass (rowsum(dO * O)), a dK/dV kernel per 128-key block streaming
  32-query tiles, and a dQ kernel per 128-query block streaming 32-key tiles (every dot has
  M = 128, so on sm_90 all are wgmma), plain loads, the diagonal masked the same way. (The
  tutorial fuses dK/dV and dQ into one launch; two kernels read the same per score and let
  `mlagen inspect` set each beside mlagen's own.)

Sequence lengths must be multiples of BLOCK (128), head dims a power of two from 16 to 128,
as in the tutorial: it is a yardstick, not a general kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mlagen.runtime.interpreter_fix import index_scalars_under_any_numpy
from mlagen.runtime.launch import launch_arch

index_scalars_under_any_numpy()  # the interpreter of Triton 3.6 under numpy 2.4 (see there)

BLOCK = 128  # the sequence length's granule: the forward's query tile and the backward's resident tile
LOG2E = 1.4426950408889634


@triton.jit
def _rows(source, row, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_DESCRIPTORS: tl.constexpr):
    # ROWS consecutive rows of a [B*H*S, HEAD_DIM] tensor: one TMA load through a tensor
    # descriptor, or a pointer load (64-bit offsets: B*H*S*D passes 2**31 at long sequences).
    if USE_DESCRIPTORS:
        return source.load([row, 0])
    else:
        offs = row.to(tl.int64) + tl.arange(0, ROWS)
        return tl.load(source + offs[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _store_rows(
    target, row, value, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_DESCRIPTORS: tl.constexpr
):
    if USE_DESCRIPTORS:
        target.store([row, 0], value)
    else:
        offs = row.to(tl.int64) + tl.arange(0, ROWS)
        tl.store(target + offs[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], value)


@triton.jit
def _forward_keys(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    first_row,
    lo,
    hi,
    offs_m,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    USE_DESCRIPTORS: tl.constexpr,
):
    # Fold the keys [lo, hi) into the running max m_i, sum l_i and output acc. Only the
    # diagonal block is MASKED; elsewhere the scale multiplies the row max, not each score.
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _rows(K, first_row + start_n, BLOCK_N, HEAD_DIM, USE_DESCRIPTORS)
        scores = tl.dot(q, k.T)
        if MASKED:
            seen = offs_m[:, None] >= start_n + tl.arange(0, BLOCK_N)[None, :]
            scores = scores * qk_scale + tl.where(seen, 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            scores -= m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
            scores = scores * qk_scale - m_new[:, None]
        p = tl.math.exp2(scores)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(V, first_row + start_n, BLOCK_N, HEAD_DIM, USE_DESCRIPTORS)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def baseline_forward(
    Q,
    K,
    V,
    Out,
    LSE,
    qk_scale,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_DESCRIPTORS: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head); grid (S / BLOCK_M, B * H).
    start_m = tl.program_id(0)
    first_row = tl.program_id(1) * seq_len  # of this (batch, head) in the [B*H*S, D] view
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _rows(Q, first_row + start_m * BLOCK_M, BLOCK_M, HEAD_DIM, USE_DESCRIPTORS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        diagonal = start_m * BLOCK_M
        acc, l_i, m_i = _forward_keys(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            first_row,
            0,
            diagonal,
            offs_m,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            False,
            USE_DESCRIPTORS,
        )
        acc, l_i, m_i = _forward_keys(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            first_row,
            diagonal,
            diagonal + BLOCK_M,
            offs_m,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            True,
            USE_DESCRIPTORS,
        )
    else:
        acc, l_i, m_i = _forward_keys(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            first_row,
            0,
            seq_len,
            offs_m,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            False,
            USE_DESCRIPTORS,
        )
    tl.store(LSE + first_row + offs_m, m_i + tl.math.log2(l_i))
    _store_rows(
        Out,
        first_row + start_m * BLOCK_M,
        (acc / l_i[:, None]).to(q.dtype),
        BLOCK_M,
        HEAD_DIM,
        USE_DESCRIPTORS,
    )


@triton.jit
def baseline_backward_delta(Out, DO, DELTA, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta = rowsum(dO * O), the softmax backward's correction, once per row.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    out = tl.load(Out + offs).to(tl.float32)
    d_out = tl.load(DO + offs).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(out * d_out, 1))


@triton.jit
def _dkdv_queries(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    first_row,
    lo,
    hi,
    offs_n,
    qk_scale,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
):
    # Accumulate dK and dV of the resident keys over the queries [lo, hi), transposed:
    # P^T [BLOCK_N, BLOCK_M] from the forward's LSE, so every dot has M = BLOCK_N.
    for start_m in tl.range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows(Q, first_row + start_m, BLOCK_M, HEAD_DIM, False)
        lse = tl.load(LSE + first_row + offs_m)
        p_t = tl.math.exp2(tl.dot(k, q.T) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        d_out = _rows(DO, first_row + start_m, BLOCK_M, HEAD_DIM, False)
        dv += tl.dot(p_t.to(d_out.dtype), d_out)
        delta = tl.load(DELTA + first_row + offs_m)
        ds_t = p_t * (tl.dot(v, d_out.T) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def baseline_backward_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    qk_scale,
    sm_scale,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # One program: BLOCK_N keys of one (batch, head), streaming BLOCK_M queries at a time.
    start_n = tl.program_id(0) * BLOCK_N
    first_row = tl.program_id(1) * seq_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _rows(K, first_row + start_n, BLOCK_N, HEAD_DIM, False)
    v = _rows(V, first_row + start_n, BLOCK_N, HEAD_DIM, False)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:
        # the queries of the diagonal block see part of these keys; the later ones see all
        dk, dv = _dkdv_queries(
            dk,
            dv,
            k,
            v,
            Q,
            DO,
            LSE,
            DELTA,
            first_row,
            start_n,
            start_n + BLOCK_N,
            offs_n,
            qk_scale,
            BLOCK_M,
            HEAD_DIM,
            True,
        )
        dk, dv = _dkdv_queries(
            dk,
            dv,
            k,
            v,
            Q,
            DO,
            LSE,
            DELTA,
            first_row,
            start_n + BLOCK_N,
            seq_len,
            offs_n,
            qk_scale,
            BLOCK_M,
            HEAD_DIM,
            False,
        )
    else:
        dk, dv = _dkdv_queries(
            dk, dv, k, v, Q, DO, LSE, DELTA, first_row, 0, seq_len, offs_n, qk_scale, BLOCK_M, HEAD_DIM, False
        )
    _store_rows(DV, first_row + start_n, dv.to(v.dtype), BLOCK_N, HEAD_DIM, False)
    _store_rows(DK, first_row + start_n, (dk * sm_scale).to(k.dtype), BLOCK_N, HEAD_DIM, False)


@triton.jit
def _dq_keys(
    dq,
    q,
    d_out,
    lse,
    delta,
    K,
    V,
    first_row,
    lo,
    hi,
    offs_m,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
):
    # Accumulate dQ of the resident queries over the keys [lo, hi).
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _rows(K, first_row + start_n, BLOCK_N, HEAD_DIM, False)
        v = _rows(V, first_row + start_n, BLOCK_N, HEAD_DIM, False)
        p = tl.math.exp2(tl.dot(q, k.T) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= start_n + tl.arange(0, BLOCK_N)[None, :], p, 0.0)
        ds = p * (tl.dot(d_out, v.T) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def baseline_backward_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    qk_scale,
    sm_scale,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head), streaming BLOCK_N keys at a time.
    start_m = tl.program_id(0) * BLOCK_M
    first_row = tl.program_id(1) * seq_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _rows(Q, first_row + start_m, BLOCK_M, HEAD_DIM, False)
    d_out = _rows(DO, first_row + start_m, BLOCK_M, HEAD_DIM, False)
    lse = tl.load(LSE + first_row + offs_m)
    delta = tl.load(DELTA + first_row + offs_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        dq = _dq_keys(
            dq, q, d_out, lse, delta, K, V, first_row, 0, start_m, offs_m, qk_scale, BLOCK_N, HEAD_DIM, False
        )
        dq = _dq_keys(
            dq,
            q,
            d_out,
            lse,
            delta,
            K,
            V,
            first_row,
            start_m,
            start_m + BLOCK_M,
            offs_m,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            True,
        )
    else:
        dq = _dq_keys(
            dq, q, d_out, lse, delta, K, V, first_row, 0, seq_len, offs_m, qk_scale, BLOCK_N, HEAD_DIM, False
        )
    _store_rows(DQ, first_row + start_m, (dq * sm_scale).to(q.dtype), BLOCK_M, HEAD_DIM, False)


# --- launchers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def forward_tiles(arch: int | None) -> Tiles:
    """The tutorial's forward tiles: 128x128 on 8 warps with 3 stages where wgmma / tcgen05 and
    TMA run it without spills (sm_90, sm_100: 65 and 59 issue-clocks per 1K scores at D128);
    128x64 on the mma.sync parts (128x128 spills there at D128)."""
    if arch is None:  # the interpreter: small tiles keep tests quick
        return Tiles(BLOCK, 32, 4, 1)
    if arch in (90, 100):
        return Tiles(BLOCK, BLOCK, 8, 3)
    return Tiles(BLOCK, 64, 8, 3)


def backward_tiles(arch: int | None) -> Tiles:
    """The tutorial's backward shape: 128 resident rows, few streamed (BLOCK_M x BLOCK_N of
    dK/dV is 32 x 128, of dQ 128 x 32), 3 stages. At D128 the tutorial's 4 warps spill (two
    128x128 fp32 accumulators in one warpgroup), so 8: on sm_90 that reads as ANCHORS.md's
    tutorial backward (142 + 120 = 262 issue-clocks per 1K scores, all wgmma, no spills).
    The mma.sync parts stream 16 rows to stay spill-free."""
    if arch is None:
        return Tiles(32, 32, 4, 1)
    return Tiles(32 if arch in (90, 100) else 16, BLOCK, 8, 3)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, S, D] of one shape, got {list(q.shape)}, {list(k.shape)}, "
            f"{list(v.shape)}"
        )
    batch, heads, seq_len, head_dim = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"the baseline runs float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_len % BLOCK or head_dim not in (16, 32, 64, 128):
        raise ValueError(f"{seq_len=} must be a multiple of {BLOCK} and {head_dim=} one of 16, 32, 64, 128")
    return batch, heads, seq_len, head_dim


def _operand(tensor: torch.Tensor, rows: int, use_descriptors: bool):
    if not use_descriptors:
        return tensor
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(
        tensor,
        [tensor.numel() // tensor.shape[-1], tensor.shape[-1]],
        [tensor.shape[-1], 1],
        [rows, tensor.shape[-1]],
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], lse [B*H, S] base 2, scaled)."""
    batch, heads, seq_len, head_dim = _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    arch = launch_arch(q.device)
    tiles = tiles or forward_tiles(arch)
    use_descriptors = arch is not None and arch >= 90
    out = torch.empty_like(q)
    lse = torch.empty((batch * heads, seq_len), dtype=torch.float32, device=q.device)
    baseline_forward[(seq_len // tiles.block_m, batch * heads)](
        _operand(q, tiles.block_m, use_descriptors),
        _operand(k, tiles.block_n, use_descriptors),
        _operand(v, tiles.block_n, use_descriptors),
        _operand(out, tiles.block_m, use_descriptors),
        lse,
        sm_scale * LOG2E,
        seq_len,
        HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        CAUSAL=causal,
        USE_DESCRIPTORS=use_descriptors,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out, lse


def backward(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, H, S, D] like q."""
    batch, heads, seq_len, head_dim = _check(q, k, v)
    q, k, v, out, d_out = (t.contiguous() for t in (q, k, v, out, d_out))
    tiles = tiles or backward_tiles(launch_arch(q.device))
    delta = torch.empty_like(lse)
    baseline_backward_delta[(batch * heads * seq_len // BLOCK,)](
        out, d_out, delta, HEAD_DIM=head_dim, BLOCK_M=BLOCK
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scalars = (sm_scale * LOG2E, sm_scale, seq_len)
    flags = dict(
        HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        CAUSAL=causal,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    baseline_backward_dkdv[(seq_len // tiles.block_n, batch * heads)](
        q, k, v, d_out, lse, delta, dk, dv, *scalars, **flags
    )
    # dQ's tile is the transpose of dK/dV's: BLOCK_N resident queries, BLOCK_M streamed keys
    flags.update(BLOCK_M=tiles.block_n, BLOCK_N=tiles.block_m)
    baseline_backward_dq[(seq_len // tiles.block_n, batch * heads)](
        q, k, v, d_out, lse, delta, dq, *scalars, **flags
    )
    return dq, dk, dv


class _BaselineAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        out, lse = forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(d_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def baseline_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
) -> torch.Tensor:
    """softmax(q k^T * sm_scale (+ causal mask)) v for [B, H, S, D] fp16/bf16, differentiable."""
    return _BaselineAttention.apply(q, k, v, causal, sm_scale)


# --- for mlagen inspect ---------------------------------------------------------------------------

ROLES = {
    "baseline_forward": "forward",
    "baseline_backward_delta": "backward_delta",
    "baseline_backward_dkdv": "backward_dkdv",
    "baseline_backward_dq": "backward_dq",
}


def role(kernel: str) -> str:
    return ROLES[kernel]


def launch_call(batch: int, heads: int, seq_len: int, dtype: str, head_dim: int = 128, causal: bool = True):
    """A picklable call of the forward and backward launchers on meta tensors, for mlagen.aot."""
    return functools.partial(_launch, batch, heads, -(-seq_len // BLOCK) * BLOCK, dtype, head_dim, causal)


def _launch(batch: int, heads: int, seq_len: int, dtype: str, head_dim: int, causal: bool) -> None:
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    q, k, v = (
        torch.empty(batch, heads, seq_len, head_dim, dtype=torch_dtype, device="meta") for _ in range(3)
    )
    out, lse = forward(q, k, v, causal, head_dim**-0.5)
    backward(torch.empty_like(out), q, k, v, out, lse, causal, head_dim**-0.5)
