"""Small nn.Modules and tensor helpers the generated modules are built from."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from mlagen.runtime.reference import rms_norm
from mlagen.runtime.rope import YarnParams, cos_sin, inverse_frequencies


class RMSNorm(nn.Module):
    """transformers-compatible RMSNorm (parameter `weight`)."""

    def __init__(
        self, dim: int, eps: float, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Rotary(nn.Module):
    """cos/sin tables for positions; the inverse frequencies are a non-persistent
    buffer so state dicts hold exactly transformers' parameter names."""

    def __init__(self, dim: int, theta: float, yarn: YarnParams | None, device: torch.device | None = None):
        super().__init__()
        self.dim, self.theta, self.yarn = dim, theta, yarn
        inv_freq, self.attention_factor = inverse_frequencies(dim, theta, yarn)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the frequencies on `device`: a module built on the meta device (to share
        another model's parameters without allocating its own) has none."""
        self.inv_freq = inverse_frequencies(self.dim, self.theta, self.yarn)[0].to(device)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would round the frequencies (and so every angle) to the
        # module dtype; they stay fp32 and only follow device moves.
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(position_ids, self.inv_freq, self.attention_factor, dtype)


def repeat_chunks(x: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """[M, D] -> [batch, chunks * M, D]: a view over batch (stride 0), a copy over chunks."""
    return x.repeat(chunks, 1).expand(batch, -1, -1)


def run_without_padding(
    forward: Callable[..., torch.Tensor],
    hidden_states: torch.Tensor,
    position_ids: torch.Tensor,
    new_tokens: tuple[int, ...],
    *args,
) -> torch.Tensor:
    """forward(hidden_states, position_ids, *args), [B, S, D] -> [B, S, D], over each row's
    first new_tokens[b] tokens only; the rest (right padding) gives zeros. Rows with the same
    count run together, sliced to it, so attention that is not causal never sees padding
    (slicing rather than masking keys reuses the kernels as they are); an unpadded batch is
    one call."""
    seqlen = hidden_states.shape[1]
    if all(count == seqlen for count in new_tokens):
        return forward(hidden_states, position_ids, *args)
    rows_by_count: dict[int, list[int]] = {}
    for row, count in enumerate(new_tokens):
        rows_by_count.setdefault(count, []).append(row)
    out = hidden_states.new_zeros(hidden_states.shape)
    for count, rows in rows_by_count.items():
        if count:
            index = torch.tensor(rows, device=hidden_states.device)
            out[index, :count] = forward(hidden_states[index, :count], position_ids[index, :count], *args)
    return out


def head_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    heads: int,
    rows_per_head: int,
    rows: tuple[int, int],
    transpose: bool,
) -> torch.Tensor:
    """Per-head product with a slice of a linear's weight (MLA weight absorption).

    weight [heads * rows_per_head, latent] holds, per head, rows_per_head output rows of
    the up-projection; W_h = its rows[0]:rows[1] ([n, latent]). transpose=False maps
    x [..., heads, n] -> x @ W_h [..., heads, latent] (q_nope -> latent query);
    transpose=True maps x [..., heads, latent] -> x @ W_h^T [..., heads, n] (latent -> v)."""
    per_head = weight.view(heads, rows_per_head, -1)[:, rows[0] : rows[1]]
    if transpose:
        return torch.einsum("...hl,hnl->...hn", x, per_head)
    return torch.einsum("...hn,hnl->...hl", x, per_head)


def generated_source(module: nn.Module) -> ModuleType | None:
    """The generated module.py (SPEC, kernels, constants) defining `module`'s class or one of
    its bases, so subclasses (a layer patched into a transformers model) count; None for
    anything else."""
    for cls in type(module).__mro__:
        source = sys.modules.get(cls.__module__)
        if isinstance(getattr(source, "SPEC", None), dict) and hasattr(source, "kernels"):
            return source
    return None
