"""torch.library registration of generated attention kernels.

Each kernel variant becomes the custom op `mlagen::<kernel name>` (outputs:
out, lse) with a fake implementation, so torch.compile(fullgraph=True) and
torch.export see one opaque node instead of a graph break, and with a
registered autograd formula that calls `mlagen::<kernel name>_backward`.

A kernel name is a function of its template parameters, so two generated
packages that share a name share the op; the op dispatches to the launcher
registered last (the same code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mlagen.runtime.reference import GroupMask

_MASK_MODES = {0: None, 1: "same", 2: "earlier"}
_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {}
_OPS: dict[str, Callable] = {}


def group_mask_from_args(mode: int, q_group_size: int, k_group_size: int) -> GroupMask | None:
    name = _MASK_MODES[mode]
    return None if name is None else (name, q_group_size, k_group_size)


def attention_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """The custom op for kernel `name`, defined on first use; `forward`/`backward` are the launchers."""
    _IMPLEMENTATIONS[name] = (forward, backward)
    if name not in _OPS:
        _OPS[name] = _define(name)
    return _OPS[name]


def _define(name: str) -> Callable:
    @torch.library.custom_op(f"mlagen::{name}", mutates_args=())
    def attention(
        q_a: Tensor,
        q_b: Tensor | None,
        k_a: Tensor,
        k_b: Tensor | None,
        v: Tensor,
        scale: float,
        causal: bool,
        window: int | None,
        mask_mode: int,
        q_group_size: int,
        k_group_size: int,
    ) -> tuple[Tensor, Tensor]:
        launch = _IMPLEMENTATIONS[name][0]
        group_mask = group_mask_from_args(mask_mode, q_group_size, k_group_size)
        return launch(q_a, q_b, k_a, k_b, v, scale=scale, causal=causal, window=window, group_mask=group_mask)

    @attention.register_fake
    def _(q_a, q_b, k_a, k_b, v, scale, causal, window, mask_mode, q_group_size, k_group_size):
        batch, seqlen_q, heads_q, _ = q_a.shape
        out = q_a.new_empty((batch, seqlen_q, heads_q, v.shape[-1]))
        return out, q_a.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)

    @torch.library.custom_op(f"mlagen::{name}_backward", mutates_args=())
    def attention_backward(
        grad_out: Tensor,
        grad_lse: Tensor | None,
        q_a: Tensor,
        q_b: Tensor | None,
        k_a: Tensor,
        k_b: Tensor | None,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: float,
        causal: bool,
        window: int | None,
        mask_mode: int,
        q_group_size: int,
        k_group_size: int,
    ) -> list[Tensor]:
        backward = _IMPLEMENTATIONS[name][1]
        group_mask = group_mask_from_args(mask_mode, q_group_size, k_group_size)
        grads = backward(
            grad_out,
            q_a,
            q_b,
            k_a,
            k_b,
            v,
            out,
            lse,
            grad_lse,
            scale=scale,
            causal=causal,
            window=window,
            group_mask=group_mask,
        )
        return [g for g in grads if g is not None]

    @attention_backward.register_fake
    def _(
        grad_out,
        grad_lse,
        q_a,
        q_b,
        k_a,
        k_b,
        v,
        out,
        lse,
        scale,
        causal,
        window,
        mask_mode,
        q_group_size,
        k_group_size,
    ):
        present = [t for t in (q_a, q_b, k_a, k_b, v) if t is not None]
        return [t.new_empty(t.shape) for t in present]

    def setup_context(ctx, inputs, output):
        q_a, q_b, k_a, k_b, v, *options = inputs
        out, lse = output
        ctx.save_for_backward(q_a, q_b, k_a, k_b, v, out, lse)
        ctx.options = options

    def backward(ctx, grad_out, grad_lse):
        q_a, q_b, k_a, k_b, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = iter(attention_backward(grad_out, grad_lse, q_a, q_b, k_a, k_b, v, out, lse, *ctx.options))
        operand_grads = [None if t is None else next(grads) for t in (q_a, q_b, k_a, k_b, v)]
        return (*operand_grads, None, None, None, None, None, None)

    attention.register_autograd(backward, setup_context=setup_context)
    return attention
