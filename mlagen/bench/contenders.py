"""The contenders of each mode: mlagen's generated kernels and module, and the peers they
are measured against (torch SDPA per backend, FlexAttention, the plain-torch reference;
for decode the non-absorbed path over an expanded per-head cache).

A contender's `prepare(problem, env)` returns the call to time and a check call whose
outputs compare with `problem.expected(...)`; it raises Unavailable when it cannot run
here. Layout changes a peer needs (heads-first tensors, concatenated MLA keys) are made
in prepare, outside the timed call, and undone only for the check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from mlagen.bench.problems import (
    AbsorbedDecodeProblem,
    AttentionDims,
    AttentionProblem,
    ExpandedDecodeProblem,
    ModuleProblem,
    Outputs,
)
from mlagen.runtime import reference
from mlagen.runtime.mla_decode import reference_attention


class Unavailable(Exception):
    """The contender cannot run here; the message says why."""


@dataclass(frozen=True, slots=True)
class Env:
    package: Any  # the generated package (module, kernels)
    device: torch.device
    smoke: bool


@dataclass(frozen=True, slots=True)
class Prepared:
    step: Callable[[], object]  # what is timed
    check: Callable[[], Outputs]  # outputs in the layout of problem.expected(...)


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    problem: str  # which problem of a case it runs: attention, module, absorbed, expanded
    description: str
    prepare: Callable[[Any, Env], Prepared]


def attention_kernel(package, dims: AttentionDims) -> str:
    """The name of the generated prefill kernel for these head dims."""
    wanted = (dims.dim_a, dims.dim_b, dims.dim_v)
    for name, head_dims in package.kernels.HEAD_DIMS.items():
        if tuple(head_dims) == wanted:
            return name
    raise Unavailable(f"no generated attention kernel with head dims {wanted}")


def _autograd_step(forward: Callable, leaves: tuple[torch.Tensor | None, ...], grad_out: torch.Tensor):
    """forward(*leaves) and the gradients of every present leaf: (out, *grads), None for absent."""
    present = [t for t in leaves if t is not None]

    def step():
        out = forward(*leaves)
        found = iter(torch.autograd.grad(out, present, grad_out))
        return (out, *[None if t is None else next(found) for t in leaves])

    return step


def _leaves(tensors) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.detach().requires_grad_() for t in tensors)


def _canonical_prepared(problem: AttentionProblem, forward: Callable) -> Prepared:
    """A contender that takes the problem's own [B, S, H, D] operands."""
    if not problem.train:
        step = torch.no_grad()(lambda: forward(*problem.operands))
        return Prepared(step, lambda: problem.view((step(),)))
    step = _autograd_step(forward, _leaves(problem.operands), problem.grad_out)
    return Prepared(step, lambda: problem.view(step()))


# --- prefill and training -------------------------------------------------------------------------


def _mlagen_attention(problem: AttentionProblem, env: Env) -> Prepared:
    d = problem.dims
    name = attention_kernel(env.package, d)
    options = dict(scale=d.scale, causal=d.causal, window=d.window)
    if problem.train:
        return _canonical_prepared(problem, partial(env.package.kernels.ATTENTION[name], **options))
    launch = getattr(env.package.kernels, f"{name}_launch")
    return _canonical_prepared(problem, lambda *operands: launch(*operands, **options)[0])


def _reference_attention(problem: AttentionProblem, env: Env) -> Prepared:
    d = problem.dims
    return _canonical_prepared(
        problem, partial(reference.attention, scale=d.scale, causal=d.causal, window=d.window)
    )


def _heads_first(problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, Dqk], k [B, Hk, S, Dqk], v [B, Hk, S, Dv]: MLA's two score parts
    concatenated and its shared rope key copied to every head, as a peer needs them."""
    d = problem.dims
    q = problem.q_a if problem.q_b is None else torch.cat((problem.q_a, problem.q_b), -1)
    k = problem.k_a
    if problem.k_b is not None:
        k = torch.cat((k, problem.k_b.expand(-1, -1, d.heads_k, -1)), -1)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, problem.v))


def _from_heads_first(problem: AttentionProblem, outputs) -> Outputs:
    out = outputs[0].transpose(1, 2)
    if not problem.train:
        return problem.view((out,))
    d = problem.dims
    dq, dk, dv = (g.transpose(1, 2) for g in outputs[1:])
    dq_b = dq[..., d.dim_a :] if d.dim_b else None
    dk_b = dk[..., d.dim_a :].sum(2, keepdim=True) if d.dim_b else None  # the shared key's gradient
    return problem.view((out, dq[..., : d.dim_a], dq_b, dk[..., : d.dim_a], dk_b, dv))


def _heads_first_prepared(problem: AttentionProblem, forward: Callable) -> Prepared:
    q, k, v = _heads_first(problem)
    if not problem.train:
        step = torch.no_grad()(lambda: forward(q, k, v))
        return Prepared(step, lambda: _from_heads_first(problem, (step(),)))
    grad_out = problem.grad_out.transpose(1, 2).contiguous()
    step = _autograd_step(forward, _leaves((q, k, v)), grad_out)
    return Prepared(step, lambda: _from_heads_first(problem, step()))


def _mask_arguments(problem: AttentionProblem) -> dict:
    d, s = problem.dims, problem.seq_len
    if d.window is not None:
        allowed = reference.visible(
            s, s, causal=d.causal, window=d.window, group_mask=None, device=problem.q_a.device
        )
        return {"attn_mask": allowed}
    return {"is_causal": d.causal}


def _sdpa(backend_name: str) -> Callable[[AttentionProblem, Env], Prepared]:
    def prepare(problem: AttentionProblem, env: Env) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        d = problem.dims
        options = dict(scale=d.scale, enable_gqa=d.heads_q != d.heads_k, **_mask_arguments(problem))

        def forward(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **options)

        prepared = _heads_first_prepared(problem, forward)
        try:
            with torch.no_grad():
                forward(*_heads_first(problem))
        except RuntimeError as exc:  # torch's message alone blames "the math kernel" for any refusal
            first = (str(exc).strip().splitlines() or [""])[0]
            raise Unavailable(
                f"SDPA {backend_name} does not run these inputs on {env.device.type}: {first}"
            ) from None
        return prepared

    return prepare


_compiled_flex: Callable | None = None


def _flex(problem: AttentionProblem, env: Env) -> Prepared:
    global _compiled_flex
    if env.device.type == "cpu" and env.smoke:
        raise Unavailable(
            "FlexAttention runs on CPU only through torch.compile (about 15 s per shape); skipped in --smoke"
        )
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    d, s = problem.dims, problem.seq_len
    mask_mod = None
    if d.causal and d.window is not None:
        window = d.window

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    elif d.causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

    block_mask = (
        None if mask_mod is None else create_block_mask(mask_mod, None, None, s, s, device=env.device)
    )
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    flex = _compiled_flex

    def forward(q, k, v):
        return flex(q, k, v, block_mask=block_mask, scale=d.scale, enable_gqa=d.heads_q != d.heads_k)

    return _heads_first_prepared(problem, forward)


def _module(use_reference: bool) -> Callable[[ModuleProblem, Env], Prepared]:
    def prepare(problem: ModuleProblem, env: Env) -> Prepared:
        module = problem.module
        forward = module.reference_forward if use_reference else module.forward
        if not problem.train:
            step = torch.no_grad()(lambda: forward(problem.x))
            check = torch.no_grad()(lambda: (forward(problem.prefix()[0]),))
            return Prepared(step, check)
        x = problem.x.detach().requires_grad_()
        parameters = [p for p in module.parameters() if p.requires_grad]

        def step():
            out = forward(x)
            return out, torch.autograd.grad(out, [x, *parameters], problem.grad_out)

        def check():
            prefix, grad_out = problem.prefix()
            prefix = prefix.detach().requires_grad_()
            out = forward(prefix)
            return out, torch.autograd.grad(out, prefix, grad_out)[0]

        return Prepared(step, check)

    return prepare


# --- decode -----------------------------------------------------------------------------------------


def _mlagen_decode(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    decode = getattr(env.package.kernels, "DECODE", None)
    if decode is None:
        raise Unavailable("the generated package has no decode kernel")
    i = problem.inputs
    step = torch.no_grad()(
        lambda: decode.attention(i.q_latent, i.q_rope, i.cached, scale=i.scale, causal=True)
    )
    return Prepared(step, lambda: (step(),))


def _reference_decode(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    i = problem.inputs
    step = torch.no_grad()(
        lambda: reference_attention(i.q_latent, i.q_rope, i.cached, scale=i.scale, causal=True)
    )
    return Prepared(step, lambda: (step(),))


def _expanded_mlagen(problem: ExpandedDecodeProblem, env: Env) -> Prepared:
    i, s = problem.inputs, problem.inputs.spec
    dims = AttentionDims.from_spec(s)
    launch = getattr(env.package.kernels, f"{attention_kernel(env.package, dims)}_launch")
    k_nope, k_pe, v = i.expanded
    step = torch.no_grad()(lambda: launch(i.q_nope, i.q_rope, k_nope, k_pe, v, scale=i.scale, causal=True)[0])
    return Prepared(step, lambda: (step(),))


def _expanded_sdpa(problem: ExpandedDecodeProblem, env: Env) -> Prepared:
    i, s = problem.inputs, problem.inputs.spec
    k_nope, k_pe, v = i.expanded
    q = torch.cat((i.q_nope, i.q_rope), -1).transpose(1, 2).contiguous()
    k = torch.cat((k_nope, k_pe.expand(-1, -1, s.heads, -1)), -1).transpose(1, 2).contiguous()
    v = v.transpose(1, 2).contiguous()
    mask = None
    if i.seq_q > 1:  # the new tokens are the newest keys: SDPA's is_causal would align them with the oldest
        mask = reference.visible(
            i.seq_q, i.cache_len, causal=True, window=None, group_mask=None, device=q.device
        )
    step = torch.no_grad()(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=i.scale).transpose(1, 2)
    )
    return Prepared(step, lambda: (step(),))


ATTENTION_CONTENDERS = (
    Contender("mlagen", "attention", "mlagen's generated Triton attention kernel", _mlagen_attention),
    Contender("sdpa-flash", "attention", "torch SDPA, FLASH_ATTENTION backend", _sdpa("FLASH_ATTENTION")),
    Contender(
        "sdpa-efficient", "attention", "torch SDPA, EFFICIENT_ATTENTION backend", _sdpa("EFFICIENT_ATTENTION")
    ),
    Contender("sdpa-cudnn", "attention", "torch SDPA, CUDNN_ATTENTION backend", _sdpa("CUDNN_ATTENTION")),
    Contender(
        "flex", "attention", "FlexAttention (torch.compile) with a block mask for the spec's mask", _flex
    ),
    Contender(
        "reference", "attention", "mlagen's plain-torch reference attention (eager)", _reference_attention
    ),
    Contender(
        "module", "module", "the whole generated layer, attention in the Triton kernels", _module(False)
    ),
    Contender(
        "module-reference",
        "module",
        "the same layer with attention in plain torch (reference_forward)",
        _module(True),
    ),
)

DECODE_CONTENDERS = (
    Contender(
        "mlagen",
        "absorbed",
        "mlagen's absorbed split-KV decode kernel over the paged latent cache",
        _mlagen_decode,
    ),
    Contender(
        "reference", "absorbed", "plain-torch absorbed decode (per-sequence gather, eager)", _reference_decode
    ),
    Contender(
        "expanded-mlagen",
        "expanded",
        "non-absorbed: mlagen's prefill kernel over a per-head K/V cache (what transformers caches)",
        _expanded_mlagen,
    ),
    Contender(
        "expanded-sdpa",
        "expanded",
        "non-absorbed: torch SDPA (default backend) over the per-head K/V cache",
        _expanded_sdpa,
    ),
)


def contenders_for(mode: str) -> tuple[Contender, ...]:
    return DECODE_CONTENDERS if mode == "decode" else ATTENTION_CONTENDERS
