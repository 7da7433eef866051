"""Context parallelism: the sequence split across the ranks of a process group.

Notation: W ranks; the full sequence [B, S, ...] is cut into 2W chunks of S/(2W) tokens,
and rank r holds chunks r and 2W-1-r, concatenated (the zigzag layout). Under a causal
mask chunk i sees chunks 0..i, so the early chunk of a rank is cheap and its late chunk
expensive; pairing them gives every rank the same work at every ring step.

Ring attention over W steps: at step t rank r holds the compact K/V block of rank
s = (r - t) mod W, expands it locally (`expand`: MLA's kv_b_proj; identity for
mha/gqa/mqa), attends its queries to it with the generated kernel, which also returns
the log-sum-exp, and folds the partial result into the running one by that LSE:

    lse = log(exp(lse_run) + exp(lse_t));  out = exp(lse_run - lse) out_run + exp(lse_t - lse) out_t

The block sent around is the compact one: (k, v) for mha/gqa/mqa, and for mla the
normalised latent c_kv plus the rotated rope key k_pe (kv_lora_rank + qk_rope_head_dim
values per token, 576 for DeepSeek-V3) rather than the per-head K/V (40,960).

Which queries see which keys at step t, local q = [chunk r | chunk 2W-1-r] against the
block of s = [chunk s | chunk 2W-1-s] (causal; a non-causal spec takes every block whole):
    s == r   all of q against the whole block, causal (positions rise in concat order)
    s <  r   all of q against the block's first half (chunk s), no mask
    s >  r   the second half of q (chunk 2W-1-r) against the whole block, no mask
Both off-diagonal cases cost (S/2W) x (S/W) scores: balanced.

Saved for backward: the local queries, the local compact block, the merged output and
its LSE (plus references to expand's parameters). Neither the received blocks nor any
expanded K/V is kept: backward passes the compact blocks around the ring again,
re-expands each, and calls the kernel's backward with the final output and LSE, which
gives each block's exact share of the gradient (P = exp(score - lse_final)). A block's
gradient travels with it in a second ring, each rank adding its share, and arrives at
its owner after W hops.

Overlap: in forward and backward the next block's transfer is started before the
current block is computed on and waited for only after; in backward the gradient sent
after step t is waited for only after step t+1 is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mlagen.runtime.checks import expect_tensor, position_ids_for
from mlagen.runtime.launch import use_kernels
from mlagen.runtime.modules import generated_source
from mlagen.runtime.rope import apply_rope
from mlagen.spec.schema import Rope, Yarn, softmax_scale

Block = tuple[Tensor, ...]
# expand(block) -> (k_a [B, Sk, Hk, Da], k_b [B, Sk, 1 or Hk, Db] or None, v [B, Sk, Hk, Dv])
Expand = Callable[[Block], tuple[Tensor, Tensor | None, Tensor]]

# The generated ops take (window, mask_mode, q_group_size, k_group_size) after `causal`:
# no window and no group mask, which context parallelism does not support.
_NO_WINDOW_OR_GROUP_MASK = (None, 0, 1, 1)


# ---------------------------------------------------------------- the zigzag layout


def _chunk_length(seqlen: int, world_size: int) -> int:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    if seqlen % (2 * world_size):
        raise ValueError(
            f"sequence length {seqlen} must be divisible by 2 * world_size = {2 * world_size} "
            "for the zigzag layout; pad the sequence"
        )
    return seqlen // (2 * world_size)


def zigzag_split(x: Tensor, rank: int, world_size: int, dim: int = 1) -> Tensor:
    """This rank's tokens of a full-sequence tensor: chunks `rank` and 2W-1-rank of 2W along `dim`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    chunk = _chunk_length(x.shape[dim], world_size)
    late = 2 * world_size - 1 - rank
    return torch.cat((x.narrow(dim, rank * chunk, chunk), x.narrow(dim, late * chunk, chunk)), dim)


def zigzag_merge(parts: Sequence[Tensor], dim: int = 1) -> Tensor:
    """The full sequence from every rank's zigzag part, given in rank order (inverse of zigzag_split)."""
    halves = [part.chunk(2, dim) for part in parts]
    return torch.cat([early for early, _ in halves] + [late for _, late in reversed(halves)], dim)


def zigzag_gather(local: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """The full sequence on every rank, from each rank's zigzag part (an all_gather; not differentiable)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return zigzag_merge(parts, dim)


def zigzag_position_ids(
    seqlen: int, rank: int, world_size: int, device: torch.device | str | None = None
) -> Tensor:
    """The positions [S/W] (int64) of this rank's tokens when a sequence of `seqlen` is split by zigzag_split."""
    return zigzag_split(torch.arange(seqlen, device=device), rank, world_size, dim=0)


# ---------------------------------------------------------------- ring communication


class _Shift:
    """A started ring shift; `wait()` returns the tensors received from the previous rank."""

    def __init__(self, sent: Block, received: Block, works: list):
        self._sent = sent  # referenced until the transfer ends, so the buffers cannot be freed early
        self._received = received
        self._works = works

    def wait(self) -> Block:
        for work in self._works:
            work.wait()
        return self._received


class _Ring:
    """Point-to-point shifts around the ranks of a group: send to rank+1, receive from rank-1."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._next = (self.rank + 1) % self.world_size
        self._previous = (self.rank - 1) % self.world_size

    def shift(self, tensors: Sequence[Tensor]) -> _Shift:
        """Start sending `tensors` on and receiving the previous rank's (same shapes) into new buffers."""
        sent = tuple(t.contiguous() for t in tensors)
        received = tuple(torch.empty_like(t) for t in sent)
        sends = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self._next) for t in sent]
        receives = [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self._previous) for t in received]
        return _Shift(sent, received, dist.batch_isend_irecv(sends + receives))


# ---------------------------------------------------------------- ring attention


@dataclass(frozen=True, slots=True)
class _Step:
    """The local query rows that see one ring step's block, the block tokens they see, and the mask."""

    rows: slice
    keys: slice
    causal: bool


def _zigzag_step(rank: int, source: int, local_length: int, causal: bool) -> _Step:
    everything = slice(None)
    if not causal:
        return _Step(everything, everything, False)
    half = local_length // 2
    if source == rank:
        return _Step(everything, everything, True)
    if source < rank:
        return _Step(everything, slice(0, half), False)
    return _Step(slice(half, None), everything, False)


@dataclass(frozen=True, slots=True)
class _Setup:
    """What the autograd Function needs besides tensors."""

    forward_op: Callable
    backward_op: Callable
    expand: Expand
    ring: _Ring
    scale: float
    causal: bool
    block_size: int


def _merge_into(out: Tensor, lse: Tensor, rows: slice, part_out: Tensor, part_lse: Tensor) -> None:
    """Fold a partial result over other keys into the running one (in place), exactly, by log-sum-exp."""
    old_lse = lse[..., rows]
    new_lse = torch.logaddexp(old_lse, part_lse)
    # A row no key has reached yet keeps lse -inf and zeros instead of exp(-inf - -inf) = NaN.
    finite = new_lse.masked_fill(new_lse == float("-inf"), 0.0)
    old_weight = torch.exp(old_lse - finite).transpose(1, 2).unsqueeze(-1)
    part_weight = torch.exp(part_lse - finite).transpose(1, 2).unsqueeze(-1)
    out[:, rows] = out[:, rows] * old_weight + part_out.to(out.dtype) * part_weight
    lse[..., rows] = new_lse


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return None if t is None else t[:, rows]


def _attend(
    setup: _Setup, q_a: Tensor, q_b: Tensor | None, block: Block, step: _Step
) -> tuple[Tensor, Tensor]:
    k_a, k_b, v = setup.expand(tuple(t[:, step.keys] for t in block))
    return setup.forward_op(
        q_a[:, step.rows],
        _rows(q_b, step.rows),
        k_a,
        k_b,
        v,
        setup.scale,
        step.causal,
        *_NO_WINDOW_OR_GROUP_MASK,
    )


def _attend_backward(setup, q_a, q_b, out, lse, grad_out, block, step, params):
    """One step's share of the gradients: (dq_a, dq_b, d(block part), d(params)).

    The kernel's backward given the final out and lse computes P = exp(score - lse) for
    this block's keys only, which is exactly this block's share of the full softmax."""
    with torch.enable_grad():
        leaves = tuple(t[:, step.keys].detach().requires_grad_() for t in block)
        k_a, k_b, v = setup.expand(leaves)
    grads = iter(
        setup.backward_op(
            grad_out[:, step.rows],
            None,
            q_a[:, step.rows],
            _rows(q_b, step.rows),
            k_a,
            k_b,
            v,
            out[:, step.rows],
            lse[..., step.rows].contiguous(),  # the kernel reads lse as a dense [B, Hq, Sq]
            setup.scale,
            step.causal,
            *_NO_WINDOW_OR_GROUP_MASK,
        )
    )
    dq_a = next(grads)
    dq_b = None if q_b is None else next(grads)
    dk_a = next(grads)
    dk_b = None if k_b is None else next(grads)
    dv = next(grads)
    pairs = [(t, g) for t, g in ((k_a, dk_a), (k_b, dk_b), (v, dv)) if t is not None and t.requires_grad]
    inputs = (*leaves, *params)
    if not pairs:
        return dq_a, dq_b, (None,) * len(leaves), (None,) * len(params)
    d_inputs = torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return dq_a, dq_b, d_inputs[: len(leaves)], d_inputs[len(leaves) :]


def _accumulate(total: Tensor | None, part: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if part is None:
        return total
    return part.to(dtype, copy=True) if total is None else total.add_(part)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, q_a: Tensor, q_b: Tensor | None, *block_and_params: Tensor) -> Tensor:
        block, params = block_and_params[: setup.block_size], block_and_params[setup.block_size :]
        ring = setup.ring
        current = block
        for t in range(ring.world_size):
            pending = ring.shift(current) if t + 1 < ring.world_size else None
            step = _zigzag_step(ring.rank, (ring.rank - t) % ring.world_size, q_a.shape[1], setup.causal)
            part_out, part_lse = _attend(setup, q_a, q_b, current, step)
            if t == 0:  # the own block: every row sees at least its own token, so lse is finite
                out, lse = part_out.to(part_lse.dtype), part_lse
            else:
                _merge_into(out, lse, step.rows, part_out, part_lse)
            if pending is not None:
                current = pending.wait()
        out = out.to(q_a.dtype)
        ctx.setup = setup
        ctx.save_for_backward(q_a, q_b, out, lse, *block, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        setup: _Setup = ctx.setup
        ring = setup.ring
        q_a, q_b, out, lse, *saved = ctx.saved_tensors
        block, params = tuple(saved[: setup.block_size]), saved[setup.block_size :]
        params_need_grad = ctx.needs_input_grad[3 + setup.block_size :]
        wanted = [p for p, need in zip(params, params_need_grad) if need]
        grad_out = grad_out.contiguous()
        dq_a = torch.zeros_like(q_a, dtype=lse.dtype)
        dq_b = None if q_b is None else torch.zeros_like(q_b, dtype=lse.dtype)
        d_wanted: list[Tensor | None] = [None] * len(wanted)
        current, travelling = block, None
        for t in range(ring.world_size):
            pending = ring.shift(current) if t + 1 < ring.world_size else None
            step = _zigzag_step(ring.rank, (ring.rank - t) % ring.world_size, q_a.shape[1], setup.causal)
            part_dq_a, part_dq_b, part_d_block, part_d_params = _attend_backward(
                setup, q_a, q_b, out, lse, grad_out, current, step, wanted
            )
            dq_a[:, step.rows] += part_dq_a
            if dq_b is not None:
                dq_b[:, step.rows] += part_dq_b
            d_wanted = [_accumulate(total, part, lse.dtype) for total, part in zip(d_wanted, part_d_params)]
            # This block's gradient so far: the previous ranks' shares (sent after their step t-1,
            # so waited for only now) plus ours; it moves on with the block to the next rank.
            d_block = tuple(torch.zeros_like(b, dtype=lse.dtype) for b in current)
            for total, part in zip(d_block, part_d_block):
                if part is not None:
                    total[:, step.keys] += part
            if travelling is not None:
                for total, arrived in zip(d_block, travelling.wait()):
                    total += arrived
            travelling = ring.shift(d_block) if ring.world_size > 1 else None
            if pending is not None:
                current = pending.wait()
        # After W hops the gradient of our own block, summed over every rank, is back.
        own = travelling.wait() if travelling is not None else d_block
        d_wanted_in_order = iter(d_wanted)
        d_params = [next(d_wanted_in_order) if need else None for need in params_need_grad]
        return (
            None,
            dq_a.to(q_a.dtype),
            None if dq_b is None else dq_b.to(q_b.dtype),
            *(g.to(b.dtype) for g, b in zip(own, block)),
            *(None if d is None else d.to(p.dtype) for d, p in zip(d_params, params)),
        )


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed: call dist.init_process_group first")


def _kernel_ops(kernel: str) -> tuple[Callable, Callable]:
    namespace = torch.ops.mlagen
    if not (
        isinstance(kernel, str) and hasattr(namespace, kernel) and hasattr(namespace, f"{kernel}_backward")
    ):
        raise ValueError(
            f"no mlagen attention op named {kernel!r}: pass a key of generated.<spec>.kernels.ATTENTION "
            "after importing that package"
        )
    return getattr(namespace, kernel).default, getattr(namespace, f"{kernel}_backward").default


def _no_expansion(block: Block) -> tuple[Tensor, None, Tensor]:
    if len(block) != 2:
        raise ValueError(f"without `expand` the block must be (k, v), got {len(block)} tensors")
    return block[0], None, block[1]


def _require_same_shapes(q_a: Tensor, block: Block, group: dist.ProcessGroup | None) -> None:
    """One small all_gather: a rank whose block differs would receive into a wrongly sized
    buffer (garbage under gloo, a hang or corruption under NCCL), so every rank checks first
    and all of them raise together."""
    shapes = torch.tensor(
        [q_a.shape[1]] + [size for t in block for size in (t.dim(), *t.shape)],
        dtype=torch.int64,
        device=q_a.device,
    )
    gathered = [torch.empty_like(shapes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, shapes, group=group)
    if any(g.shape != shapes.shape or not torch.equal(g, shapes) for g in gathered):
        lengths = [int(g[0]) for g in gathered]
        raise ValueError(
            f"context parallelism needs the same query and K/V block shapes on every rank, got query "
            f"lengths {lengths} over the ranks; split the sequence evenly (zigzag_split)"
        )


def context_parallel_attention(
    kernel: str,
    q_a: Tensor,
    q_b: Tensor | None,
    kv_block: Sequence[Tensor],
    expand: Expand | None = None,
    *,
    scale: float,
    causal: bool,
    group: dist.ProcessGroup | None = None,
    expand_params: Sequence[Tensor] = (),
) -> Tensor:
    """Attention of this rank's queries over the keys of every rank of `group` (ring attention).

    kernel: a generated kernel name, a key of generated.<spec>.kernels.ATTENTION (that
        package must be imported; its op mlagen::<kernel> runs forward and backward).
    q_a [B, L, Hq, Da], q_b [B, L, Hq, Db] or None: this rank's queries, L = S/W tokens in
        the zigzag layout (zigzag_split) when causal; any split when not, but the same L on
        every rank (the ring receives into buffers shaped like the rank's own block).
    kv_block: this rank's compact K/V, tensors [B, L, ...] with the same shapes on every rank;
        (k, v) when `expand` is None.
    expand: maps a block, or the same slice of tokens of each of its tensors, to
        (k_a, k_b or None, v) for the kernel; it must act on each token independently.
    expand_params: every tensor `expand` reads besides the block that needs a gradient
        (MLA's kv_b_proj weight): gradients reach only the queries, the block and these.
    Returns out [B, L, Hq, Dv], equal to single-rank attention over the whole sequence
    restricted to this rank's queries, with the causal mask of the full sequence.
    """
    _require_process_group()
    forward_op, backward_op = _kernel_ops(kernel)
    block = tuple(kv_block)
    expand = expand or _no_expansion
    expect_tensor("q_a", q_a, ndim=4)
    local_length = q_a.shape[1]
    for index, tensor in enumerate(block):
        expect_tensor(f"kv_block[{index}]", tensor, device=q_a.device)
        if causal and (tensor.dim() < 2 or tensor.shape[1] != local_length):
            raise ValueError(
                f"kv_block[{index}] {list(tensor.shape)} must hold the same {local_length} tokens as q_a "
                "in dim 1 (the rank's zigzag part)"
            )
    if causal and local_length % 2:
        raise ValueError(
            f"causal context parallelism needs an even number of tokens per rank (two zigzag chunks), "
            f"got {local_length}; split the sequence with zigzag_split"
        )
    _require_same_shapes(q_a, block, group)
    setup = _Setup(forward_op, backward_op, expand, _Ring(group), scale, causal, len(block))
    return _RingAttention.apply(setup, q_a, q_b, *block, *expand_params)


# ---------------------------------------------------------------- generated modules


def _softmax_scale(spec: dict) -> float:
    """The generated module's scale, by the compiler's own formula."""
    if spec["family"] != "mla":
        return softmax_scale(spec["head_dim"], None)
    scaling = spec["rope"]["scaling"]
    rope = Rope(**{**spec["rope"], "scaling": Yarn(**scaling) if scaling else None})
    return softmax_scale(spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"], rope)


def _generated_package(module: nn.Module):
    """The generated module file (SPEC, kernels, MAX_POSITION) that defines `module`'s class."""
    package = generated_source(module)
    if package is None:
        raise ValueError(
            f"context_parallel takes a generated Attention module (generated.<spec>.Attention), "
            f"got {type(module).__name__}"
        )
    spec = package.SPEC
    name = spec["name"]
    if spec["family"] not in ("mla", "mha", "gqa", "mqa"):
        raise ValueError(
            f"{name}: context parallelism does not support the {spec['family']} family's group masks; "
            "use an mla, mha, gqa or mqa spec"
        )
    if spec.get("window") is not None:
        raise ValueError(
            f"{name}: context parallelism does not support a sliding window (window={spec['window']}); "
            "use a spec with window: null"
        )
    if spec.get("sparse") is not None:
        raise ValueError(
            f"{name}: context parallelism does not support sparse attention (each query's selected keys "
            "may lie in any rank's chunk); use tensor_parallel, or a spec without a sparse block"
        )
    return package


def _mla_operands(module: nn.Module, spec: dict, hidden_states: Tensor, cos: Tensor, sin: Tensor):
    """Queries, the compact block (c_kv, k_pe) and its per-head expansion, as the generated _forward computes them."""
    dn, dr, dv, latent_dim = (
        spec[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    )
    layout = spec["rope"]["layout"]
    if spec["q_lora_rank"] is None:
        q = module.q_proj(hidden_states)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    q_heads = q.unflatten(-1, (-1, dn + dr))
    q_nope, q_pe = q_heads[..., :dn], apply_rope(q_heads[..., dn:], cos, sin, layout)
    kv_a = module.kv_a_proj_with_mqa(hidden_states)
    c_kv = module.kv_a_layernorm(kv_a[..., :latent_dim])
    k_pe = apply_rope(kv_a[..., latent_dim:].unflatten(-1, (1, dr)), cos, sin, layout)

    def expand(block: Block) -> tuple[Tensor, Tensor, Tensor]:
        latent, rope_key = block
        kv_heads = module.kv_b_proj(latent).unflatten(-1, (-1, dn + dv))
        return kv_heads[..., :dn], rope_key, kv_heads[..., dn:]

    return q_nope, q_pe, (c_kv, k_pe), expand, tuple(module.kv_b_proj.parameters())


def _grouped_operands(module: nn.Module, spec: dict, hidden_states: Tensor, cos: Tensor, sin: Tensor):
    """mha/gqa/mqa: the rotated queries and the block (k, v), which needs no expansion."""
    head_dim, layout = spec["head_dim"], spec["rope"]["layout"]
    q = apply_rope(module.q_proj(hidden_states).unflatten(-1, (-1, head_dim)), cos, sin, layout)
    k = apply_rope(module.k_proj(hidden_states).unflatten(-1, (-1, head_dim)), cos, sin, layout)
    v = module.v_proj(hidden_states).unflatten(-1, (-1, head_dim))
    return q, None, (k, v), None, ()


class ContextParallel(nn.Module):
    """A generated Attention module whose sequence is split across the ranks of `group`.

    Shares the wrapped module's parameters and submodules (no copies): each rank holds
    the same weights, as under data parallelism, and after backward each rank's
    parameter gradients are its tokens' share; their sum over ranks (an all_reduce, as
    DDP does) is the single-rank gradient."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        _generated_package(module)  # refuse an unsupported module now rather than at the first call
        self.module = module
        self.group = group

    def forward(self, hidden_states: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """hidden_states [B, S/W, d_model]: this rank's tokens in the zigzag layout
        (zigzag_split). position_ids default to their positions in the full sequence.
        Returns the module's output for these tokens, as if it had run on the whole sequence."""
        _require_process_group()
        package = _generated_package(self.module)
        spec = package.SPEC
        weight = self.module.o_proj.weight
        expect_tensor("hidden_states", hidden_states, ndim=3, dtype=weight.dtype, device=weight.device)
        if hidden_states.shape[-1] != package.D_MODEL:
            raise ValueError(
                f"hidden_states must be [batch, seq, {package.D_MODEL}], got {list(hidden_states.shape)}"
            )
        if not use_kernels(hidden_states, package.kernels.KERNELS[0]):
            raise ValueError(
                "context parallelism runs the generated kernels: use CUDA tensors, or set "
                "TRITON_INTERPRET=1 before importing the generated module to run them on CPU"
            )
        if position_ids is None:
            if hidden_states.shape[1] % 2:
                raise ValueError(
                    f"context parallelism needs an even number of tokens per rank (two zigzag chunks), "
                    f"got {hidden_states.shape[1]}; split the sequence with zigzag_split"
                )
            world_size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            full_length = hidden_states.shape[1] * world_size
            position_ids = zigzag_position_ids(full_length, rank, world_size, hidden_states.device)
        position_ids = position_ids_for(hidden_states, position_ids, package.MAX_POSITION)
        cos, sin = self.module.rotary_emb(position_ids, hidden_states.dtype)
        operands = _mla_operands if spec["family"] == "mla" else _grouped_operands
        q_a, q_b, block, expand, expand_params = operands(self.module, spec, hidden_states, cos, sin)
        (kernel,) = package.kernels.ATTENTION  # mla and mha/gqa/mqa packages have one attention kernel
        attn = context_parallel_attention(
            kernel,
            q_a,
            q_b,
            block,
            expand,
            scale=_softmax_scale(spec),
            causal=spec["causal"],
            group=self.group,
            expand_params=expand_params,
        )
        return self.module.o_proj(attn.flatten(-2))


def context_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> ContextParallel:
    """Wrap a generated mla/mha/gqa/mqa Attention module to run on this rank's zigzag part of the sequence."""
    return ContextParallel(module, group)
