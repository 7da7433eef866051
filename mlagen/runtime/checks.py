"""Checks at the module and kernel boundary, before any launch.

A wrong dtype, device or shape is the caller's mistake: it gets a ValueError
that says what was expected and what to change, never a wrong result or a
crash inside a kernel.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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


def shown(value: object) -> str:
    """A bad argument as one short line for an error message (a tensor's repr spans lines)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def expect_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """An integer argument: a Python int or anything integral with __index__ (numpy and 0-d
    torch integers), not a bool (True is not a count) and not a float (a fractional size or
    count is a bug upstream, and silently truncating it would hide the bug)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {shown(value)}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def expect_int_list(name: str, values: object) -> list[int]:
    """A list or tuple of integers, or a 1-D integer tensor, as Python ints. A string is
    refused although it is a sequence: "12" must not be read as [1, 2]."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype not in INTEGER_DTYPES:
            raise ValueError(
                f"{name} must be a list of integers or a 1-D integer tensor, got {shown(values)}"
            )
        return values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers or a 1-D integer tensor, got {shown(values)}")
    return [expect_int(f"{name}[{index}]", value) for index, value in enumerate(values)]


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
        longest = max(first, default=0)  # an empty batch has no cached tokens
        if longest + seqlen > max_position:
            cached = f" after {longest} cached tokens" if longest else ""
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


def check_inference(module: nn.Module, hidden_states: torch.Tensor) -> None:
    """The paged cache is written in place and read by kernels without a backward, so a
    gradient through it would be silently missing (kernels) or grow one graph across every
    decode step (reference): a call that could record a graph is refused."""
    if torch.is_grad_enabled() and (
        hidden_states.requires_grad or any(param.requires_grad for param in module.parameters())
    ):
        raise ValueError(
            "the paged cache is for inference: call under torch.no_grad() or torch.inference_mode(), "
            "or train without cache="
        )


def check_no_new_tokens(new_tokens: object) -> None:
    """new_tokens marks right padding of tokens appended to a cache; without a cache nothing
    would read it, and ignoring it would let real tokens attend to the padding."""
    if new_tokens is not None:
        raise ValueError(
            "new_tokens is only read with cache=; without a cache run rows of different lengths separately"
        )


def check_new_tokens(
    hidden_states: torch.Tensor, new_tokens, cache, latent_dim: int, rope_dim: int
) -> tuple[int, ...]:
    """Check the cache fits this module; return how many of each row's S tokens are real
    (the rest is right padding). hidden_states has passed the module's input checks."""
    if (cache.latent_dim, cache.rope_dim) != (latent_dim, rope_dim):
        raise ValueError(
            f"the cache holds latent {cache.latent_dim} + rope {cache.rope_dim} per token but this "
            f"module writes {latent_dim} + {rope_dim}: the cache belongs to another spec"
        )
    if cache.dtype != hidden_states.dtype or cache.buffer.device != hidden_states.device:
        raise ValueError(
            f"the cache is {cache.dtype} on {cache.buffer.device} but the input is "
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
    counts = tuple(expect_int_list("new_tokens", new_tokens))
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
