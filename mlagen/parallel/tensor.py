"""Tensor parallelism over heads for a generated attention module (Megatron-LM's scheme).

Each rank keeps the replicated part of the layer whole and its share of the heads:

    mla          q_b_proj (q_proj without q_lora_rank), kv_b_proj: column-parallel (the rows
                 of its heads); o_proj: row-parallel (the columns of its heads); q_a_proj,
                 q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm and the paged cache: replicated
    mha/gqa/mqa  q_proj column-parallel, k_proj and v_proj by kv head, o_proj row-parallel
    latent       each block's q_proj, k_proj, v_proj column-parallel; encode.o_proj,
                 process.o_proj and o_proj row-parallel; global_gate split by head;
                 latents replicated

A row-parallel layer's partial products are summed by one all-reduce, then its bias is
added (once). MLA keeps the paged latent cache whole on every rank, as DeepSeek's own
inference code does: it is one shared head, so splitting heads cannot split it. When the
world size does not divide a gqa/mqa spec's kv_heads, every rank keeps (replicates) the
kv heads its query heads read.

Gradients. Where the replicated computation feeds a sharded one, each rank's backward
holds only its heads' share of the gradient; summing it over ranks there (Megatron's f:
identity forward, all-reduce backward) makes every gradient upstream of that point (the
replicated parameters', the input's) the unsharded module's on every rank. Those points
are the inputs of the column-parallel layers (layers reading one tensor in one call share
one sum: gqa's q/k/v cost one all-reduce of the input gradient) and MLA's rope key, which
every head reads straight from kv_a_proj_with_mqa. Sharded parameters get exactly their
slice of the unsharded gradient, except replicated kv heads, whose gradient is summed
over the ranks (and copies) holding them by a hook.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlagen.runtime.modules import generated_source

GQA_FAMILIES = ("mha", "gqa", "mqa")


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The heads one rank holds, as indices into the unsharded module's: its query heads,
    and for gqa/mqa the kv head each of its local kv heads copies (in local order)."""

    rank: int
    world_size: int
    heads: range
    kv_heads: tuple[int, ...]
    kv_replicated: bool  # some kv head lives on several ranks (or twice on one)


class _SumGradOverRanks(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """Megatron's g: forward sums the partial outputs over the group; identity backward
    (every rank's output, and so its gradient, is the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumTailGradOverRanks(torch.autograd.Function):
    """f for the last `width` columns only: MLA's kv_a holds [latent | rope key]; the latent
    reaches the heads through kv_b_proj (whose input sums its own gradient), the rope key
    directly, so only the rope key's gradient is a per-rank share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, width: int, group) -> torch.Tensor:
        ctx.width, ctx.group = width, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tail = grad[..., -ctx.width :].clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tail, group=ctx.group)
        return torch.cat((grad[..., : -ctx.width], tail), dim=-1), None, None


class _InputGradSum:
    """f for the inputs of one module's column-parallel layers. While the module runs, the
    layers that read the same tensor share one f, so its gradient is summed once (gqa's
    q/k/v read hidden_states); outside a call (reference_forward, a layer called alone)
    each layer sums its own, which is as correct and only costs more all-reduces."""

    def __init__(self, group):
        self.group = group
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def open(self, *_) -> None:
        self._shared = {}

    def close(self, *_) -> None:
        self._shared = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared is None:
            return _SumGradOverRanks.apply(x, self.group)
        if id(x) not in self._shared:  # the entry keeps x alive, so its id is not reused
            self._shared[id(x)] = (x, _SumGradOverRanks.apply(x, self.group))
        return self._shared[id(x)][1]


class ColumnParallelLinear(nn.Linear):
    """The output rows of this rank's heads; the input's gradient (this rank's share) is
    summed over the group by `input_grad`."""

    input_grad: _InputGradSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_grad(x), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """The input columns of this rank's heads: partial products summed over the group,
    then the bias added once."""

    group: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SumOverRanks.apply(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class SharedKeyLinear(nn.Linear):
    """MLA's replicated kv_a_proj_with_mqa: the gradient of its last `shared_width` outputs
    (the rope key every head reads) is summed over the group."""

    shared_width: int
    group: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SumTailGradOverRanks.apply(super().forward(x), self.shared_width, self.group)


def tensor_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard a generated Attention's heads over the ranks of `group` (default: the world), in
    place; returns the module. Call it on every rank with the same (unsharded) weights,
    before building the optimizer (sharded layers get new parameters).

    Forward, `reference_forward`, MLA's cached prefill and decode (each rank makes its own,
    replicated, cache with `module.new_cache`), and all gradients equal the unsharded
    module's on every rank (a sharded parameter's: its slice). Needs heads % world_size == 0;
    `module.heads` (and `kv_heads`) become this rank's counts, `module.head_shard` says which."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("tensor_parallel needs torch.distributed: call dist.init_process_group first")
    spec = _spec_of(module)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("tensor_parallel: this process is not in `group`; pass a group it belongs to")
    if spec["family"] == "compressed":
        raise ValueError(
            f"tensor_parallel: {spec['name']} is a compressed (DeepSeek-V4) layer, which mlagen does not shard "
            "yet; run it unsharded on each rank (data-parallel attention, as DeepSeek's own inference does)"
        )
    heads = spec["heads"]
    if heads % world_size:
        raise ValueError(
            f"tensor_parallel: {spec['name']} has heads={heads}, which {world_size} ranks cannot share "
            f"evenly; use a process group whose size divides {heads}"
        )
    shard = head_shard(heads, spec.get("kv_heads", heads), rank, world_size)
    input_grad = _InputGradSum(group)
    if spec["family"] == "mla":
        _shard_mla(module, spec, shard, input_grad, group)
    elif spec["family"] in GQA_FAMILIES:
        _shard_gqa(module, spec, shard, input_grad, group)
    else:
        assert spec["family"] == "latent", spec["family"]
        _shard_latent(module, spec, shard, input_grad, group)
    module.register_forward_pre_hook(input_grad.open)
    module.register_forward_hook(input_grad.close, always_call=True)
    module.heads = len(shard.heads)
    if hasattr(module, "kv_heads"):
        module.kv_heads = len(shard.kv_heads)
    module.head_shard = shard
    return module


def head_shard(heads: int, kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Rank `rank`'s query heads (a contiguous block) and the kv heads they read. Local kv
    head j serves local query heads [j*s, (j+1)*s) with s the gcd of the runs of query heads
    that share a kv head, so the kernels' grouping (query head i reads kv head i // s)
    holds even when the block straddles kv groups unevenly."""
    assert heads % world_size == 0 and heads % kv_heads == 0, (heads, kv_heads, world_size)
    per_rank, group_size = heads // world_size, heads // kv_heads

    def kv_of(r: int) -> tuple[int, ...]:
        kv = [h // group_size for h in range(r * per_rank, (r + 1) * per_rank)]
        step = math.gcd(*(len(list(run)) for _, run in itertools.groupby(kv)))
        return tuple(kv[::step])

    every = [head for r in range(world_size) for head in kv_of(r)]
    return HeadShard(
        rank,
        world_size,
        range(rank * per_rank, (rank + 1) * per_rank),
        kv_of(rank),
        kv_replicated=sorted(every) != list(range(kv_heads)),
    )


def _spec_of(module: nn.Module) -> dict:
    source = generated_source(module)
    spec = source.SPEC if source is not None else None
    if spec is None:
        raise ValueError(
            f"tensor_parallel takes a generated attention module (Attention of generated/<spec>/module.py), "
            f"got {type(module).__name__}"
        )
    if not hasattr(module, "heads"):
        raise ValueError(
            f"generated/{spec['name']} reads its head count from constants; regenerate it "
            f"(`mlagen generate specs/{spec['name']}.yaml`) so tensor_parallel can shard it"
        )
    if hasattr(module, "head_shard") or module.heads != spec["heads"]:
        raise ValueError(
            f"this {spec['name']} module is already sharded; call tensor_parallel on the unsharded one"
        )
    return spec


def _rows(heads: Sequence[int], per_head: int, device: torch.device) -> torch.Tensor:
    """Indices of the rows (or columns) of `heads` in a per-head [heads * per_head] dim."""
    starts = torch.tensor(list(heads), dtype=torch.long, device=device)[:, None] * per_head
    return (starts + torch.arange(per_head, device=device)).flatten()


def _parameter(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """`value` as a parameter (itself when it is one), trainable exactly when `like` is."""
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value, requires_grad=like.requires_grad)


def _linear(
    cls: type[nn.Linear], old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, **attrs
) -> nn.Linear:
    """A `cls` holding `weight` and `bias` (slices of `old`'s, or its own parameters),
    built on the meta device so that nothing else is allocated or initialised."""
    layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = _parameter(weight, old.weight)
    if bias is not None:
        layer.bias = _parameter(bias, old.bias)
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


def _replace(module: nn.Module, path: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    layer = make(getattr(parent, name))
    setattr(parent, name, layer)
    return layer


def _column(
    module: nn.Module, path: str, heads: Sequence[int], per_head: int, input_grad: _InputGradSum
) -> nn.Linear:
    def make(old: nn.Linear) -> nn.Linear:
        rows = _rows(heads, per_head, old.weight.device)
        bias = None if old.bias is None else old.bias.detach()[rows]
        return _linear(ColumnParallelLinear, old, old.weight.detach()[rows], bias, input_grad=input_grad)

    return _replace(module, path, make)


def _row(module: nn.Module, path: str, heads: Sequence[int], per_head: int, group) -> nn.Linear:
    def make(old: nn.Linear) -> nn.Linear:
        columns = _rows(heads, per_head, old.weight.device)
        weight = old.weight.detach()[:, columns].contiguous()
        return _linear(RowParallelLinear, old, weight, old.bias, group=group)

    return _replace(module, path, make)


def _shard_mla(module: nn.Module, spec: dict, shard: HeadShard, input_grad: _InputGradSum, group) -> None:
    dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
    q_path = "q_proj" if spec["q_lora_rank"] is None else "q_b_proj"
    _column(module, q_path, shard.heads, dn + dr, input_grad)
    _column(module, "kv_b_proj", shard.heads, dn + dv, input_grad)
    _row(module, "o_proj", shard.heads, dv, group)
    _replace(
        module,
        "kv_a_proj_with_mqa",
        lambda old: _linear(SharedKeyLinear, old, old.weight, old.bias, shared_width=dr, group=group),
    )
    if spec.get("sparse"):
        # Sparse (absorbed) attention reads the normalised latent itself, not through
        # kv_b_proj's column-parallel input: every rank's heads read all of it, so its
        # gradient is summed here, before kv_a_layernorm's weight and kv_a take theirs.
        module.kv_a_layernorm.register_forward_hook(lambda _, __, out: _SumGradOverRanks.apply(out, group))


def _shard_gqa(module: nn.Module, spec: dict, shard: HeadShard, input_grad: _InputGradSum, group) -> None:
    head_dim, kv_heads = spec["head_dim"], spec["kv_heads"]
    _column(module, "q_proj", shard.heads, head_dim, input_grad)
    for path in ("k_proj", "v_proj"):
        layer = _column(module, path, shard.kv_heads, head_dim, input_grad)
        if shard.kv_replicated:
            rows = _rows(shard.kv_heads, head_dim, layer.weight.device)
            for param in layer.parameters():
                param.register_hook(_sum_shared_rows(rows, kv_heads * head_dim, group))
    _row(module, "o_proj", shard.heads, head_dim, group)


def _sum_shared_rows(rows: torch.Tensor, full_rows: int, group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook for a layer holding copies of some kv heads' rows: each copy's
    gradient is the share of the query heads reading it; place every rank's copies in the
    full layer's rows, sum over ranks, and give each copy its row's total."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        index = rows.to(grad.device)  # the module may have moved since it was sharded
        full = grad.new_zeros((full_rows, *grad.shape[1:])).index_add_(0, index, grad)
        dist.all_reduce(full, group=group)
        return full[index]

    return hook


def _shard_latent(module: nn.Module, spec: dict, shard: HeadShard, input_grad: _InputGradSum, group) -> None:
    head_dim = spec["head_dim"]
    blocks = [name for name in ("encode", "process", "decode", "local") if hasattr(module, name)]
    for block in blocks:
        for projection in ("q_proj", "k_proj", "v_proj"):
            _column(module, f"{block}.{projection}", shard.heads, head_dim, input_grad)
    outputs = [f"{block}.o_proj" for block in blocks if hasattr(getattr(module, block), "o_proj")]
    for path in (*outputs, "o_proj"):
        _row(module, path, shard.heads, head_dim, group)
    if hasattr(module, "global_gate"):
        gate = module.global_gate
        module.global_gate = _parameter(gate.detach()[shard.heads.start : shard.heads.stop].clone(), gate)
