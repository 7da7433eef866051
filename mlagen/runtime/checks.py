"""Checks at the module and kernel boundary, before any launch.

A wrong dtype, device or shape is the caller's mistake: it gets a ValueError
that says what was expected and what to change, never a wrong result or a
crash inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expect_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {tensor.dtype} but the module runs in {dtype}; "
            f"convert the input with .to({dtype}) or the module with .to(dtype)"
        )
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the module is on {device}; move one of them")
    return tensor


def expect_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """`None` in `expected` matches any size."""
    if len(expected) != tensor.dim() or any(e is not None and e != s for e, s in zip(expected, tensor.shape)):
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape [{shown}], got {list(tensor.shape)}")


def position_ids_for(
    hidden_states: torch.Tensor,
    position_ids: torch.Tensor | None,
    max_position: int,
    start: list[int] | None = None,
) -> torch.Tensor:
    """Default positions start[b] + 0..S-1 (start: each row's cached length, default 0),
    or the caller's [B, S] integer positions, range-checked. Defaults are checked on
    the host, so a decode step does not wait on the GPU for the check."""
    batch, seqlen = hidden_states.shape[:2]
    if position_ids is None:
        first = start or [0] * batch
        if max(first) + seqlen > max_position:
            cached = f" after {max(first)} cached tokens" if max(first) else ""
            raise ValueError(
                f"sequence length {seqlen}{cached} exceeds max_position={max_position} of the spec"
            )
        steps = torch.arange(seqlen, device=hidden_states.device)
        if start is None:
            return steps.expand(batch, seqlen)
        return torch.tensor(first, device=hidden_states.device)[:, None] + steps
    expect_tensor("position_ids", position_ids, device=hidden_states.device)
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids must be int64 or int32, got {position_ids.dtype}")
    if position_ids.dim() == 1:
        position_ids = position_ids.expand(batch, -1)
    expect_shape("position_ids", position_ids, (batch, seqlen))
    # The range check reads values, which a compiled graph cannot do without breaking; eager calls check.
    if torch.compiler.is_compiling():
        return position_ids
    if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= max_position):
        raise ValueError(
            f"position_ids must lie in [0, {max_position}) (the spec's max_position), "
            f"got [{int(position_ids.min())}, {int(position_ids.max())}]"
        )
    return position_ids


def check_new_tokens(
    hidden_states: torch.Tensor, new_tokens, cache, latent_dim: int, rope_dim: int
) -> tuple[int, ...]:
    """Check the cache fits this module; return how many of each row's S tokens are real
    (the rest is right padding)."""
    if (cache.latent_dim, cache.rope_dim) != (latent_dim, rope_dim):
        raise ValueError(
            f"the cache holds latent {cache.latent_dim} + rope {cache.rope_dim} per token but this "
            f"module writes {latent_dim} + {rope_dim}: the cache belongs to another spec"
        )
    if cache.buffer.dtype != hidden_states.dtype or cache.buffer.device != hidden_states.device:
        raise ValueError(
            f"the cache is {cache.buffer.dtype} on {cache.buffer.device} but the input is "
            f"{hidden_states.dtype} on {hidden_states.device}; create the cache with new_cache()"
        )
    batch, seqlen = hidden_states.shape[:2]
    if batch != cache.batch_size:
        raise ValueError(
            f"hidden_states has batch {batch} but the cache holds {cache.batch_size} sequences; "
            "create the cache with new_cache(batch_size=...) for this batch"
        )
    if new_tokens is None:
        return (seqlen,) * batch
    counts = tuple(
        int(n) for n in (new_tokens.tolist() if isinstance(new_tokens, torch.Tensor) else new_tokens)
    )
    if len(counts) != batch or any(not 0 <= n <= seqlen for n in counts):
        raise ValueError(
            f"new_tokens must give, for each of the {batch} rows, a count in [0, {seqlen}]; got {counts}"
        )
    return counts


def zero_padding(out: torch.Tensor, new_tokens: tuple[int, ...]) -> torch.Tensor:
    """Zero the outputs of padding tokens (positions at or past each row's count)."""
    seqlen = out.shape[1]
    if all(n == seqlen for n in new_tokens):
        return out
    keep = (
        torch.arange(seqlen, device=out.device)[None, :]
        < torch.tensor(new_tokens, device=out.device)[:, None]
    )
    return out * keep[..., None].to(out.dtype)
