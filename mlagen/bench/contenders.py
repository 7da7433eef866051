"""The contenders of each mode: mlagen's generated kernels and module, and the peers they
are measured against (torch SDPA per backend, FlexAttention, the plain-torch reference;
for decode the non-absorbed path over an expanded per-head cache).

A contender's `prepare(problem, env)` returns the call to time and a check call whose
outputs compare with `problem.expected(...)`; it raises Unavailable when it cannot run
here. Layout changes a peer needs (heads-first tensors, concatenated MLA keys) are made
in prepare, outside the timed call, and undone only for the check.
"""

from __future__ import annotations

import functools
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
    leaves = _leaves(problem.operands)
    checked = _autograd_step(forward, leaves, problem.grad_out)
    return Prepared(_autograd_step(forward, leaves, problem.timing_grad_out), lambda: problem.view(checked()))


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


def _heads_first_grad(grad_out: torch.Tensor) -> torch.Tensor:
    return grad_out.transpose(1, 2).contiguous()


def _heads_first_prepared(problem: AttentionProblem, forward: Callable) -> Prepared:
    q, k, v = _heads_first(problem)
    if not problem.train:
        step = torch.no_grad()(lambda: forward(q, k, v))
        return Prepared(step, lambda: _from_heads_first(problem, (step(),)))
    leaves = _leaves((q, k, v))
    timed = _autograd_step(forward, leaves, _heads_first_grad(problem.timing_grad_out))
    checked = _autograd_step(forward, leaves, _heads_first_grad(problem.grad_out))
    return Prepared(timed, lambda: _from_heads_first(problem, checked()))


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


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _window_mask(window: int) -> Callable:
    """One mask function per window: a new function object each call would fail dynamo's
    guards and recompile FlexAttention every time."""

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask


# FlexAttention compiled once per shape family (head dims, grouping, mask, training): dynamic
# shapes, so the lengths and head counts of a family share one compile. Its time lands in the
# first call, which is the check, never in the timed runs.
_compiled_flex: dict[tuple, Callable] = {}


def _allow_recompiles() -> None:
    """Dynamo falls back to eager after `recompile_limit` (8) compiles of one function, and eager
    FlexAttention materialises the whole score matrix: raise the limit (renamed from
    cache_size_limit in torch 2.6; the suite compiles up to about a dozen families)."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(64, getattr(dynamo, name)))


def _flex(problem: AttentionProblem, env: Env) -> Prepared:
    if env.device.type == "cpu" and env.smoke:
        raise Unavailable(
            "FlexAttention runs on CPU only through torch.compile (about 15 s per shape); skipped in --smoke"
        )
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    d, s = problem.dims, problem.seq_len
    mask_mod = None
    if d.causal:
        mask_mod = _causal_mask if d.window is None else _window_mask(d.window)
    block_mask = (
        None if mask_mod is None else create_block_mask(mask_mod, None, None, s, s, device=env.device)
    )
    family = (d.dim_qk, d.dim_v, d.heads_q != d.heads_k, d.causal, d.window, problem.train)
    if family not in _compiled_flex:
        _allow_recompiles()
        _compiled_flex[family] = torch.compile(flex_attention, dynamic=True)
    flex = _compiled_flex[family]

    def forward(q, k, v):
        return flex(q, k, v, block_mask=block_mask, scale=d.scale, enable_gqa=d.heads_q != d.heads_k)

    return _heads_first_prepared(problem, forward)


def _baseline(problem: AttentionProblem, env: Env) -> Prepared:
    """The Triton tutorial-style kernel of mlagen/bench/baseline.py: q, k, v [B, H, S, D] with
    as many K/V heads as query heads, so grouped K/V are repeated per query head (outside the
    timed call; the kernel then reads Hq / Hk times the K/V bytes that are counted)."""
    try:
        from mlagen.bench.baseline import baseline_attention
    except ModuleNotFoundError as exc:
        if exc.name != "mlagen.bench.baseline":
            raise Unavailable(f"mlagen/bench/baseline.py does not import here: {exc}") from None
        raise Unavailable("mlagen/bench/baseline.py is not in this checkout") from None
    except ImportError as exc:
        raise Unavailable(f"mlagen/bench/baseline.py does not import here: {exc}") from None
    d = problem.dims
    if d.window is not None:
        raise Unavailable("the tutorial-style baseline has no sliding window")
    q, k, v = _heads_first(problem)
    group = d.heads_q // d.heads_k
    if group > 1:
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))

    def forward(q, k, v):
        return baseline_attention(q, k, v, d.causal, d.scale)

    if not problem.train:
        step = torch.no_grad()(lambda: forward(q, k, v))
        return Prepared(step, lambda: _from_heads_first(problem, (step(),)))
    leaves = _leaves((q, k, v))
    timed = _autograd_step(forward, leaves, _heads_first_grad(problem.timing_grad_out))
    checked = _autograd_step(forward, leaves, _heads_first_grad(problem.grad_out))

    def check():
        out, dq, dk, dv = checked()
        if group > 1:  # the gradient of a shared K/V head sums over the query heads that read it
            dk, dv = (g.unflatten(1, (d.heads_k, group)).sum(2) for g in (dk, dv))
        return _from_heads_first(problem, (out, dq, dk, dv))

    return Prepared(timed, check)


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
    return Prepared(step, lambda: problem.view((step(),)))


def _reference_decode(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    i = problem.inputs
    step = torch.no_grad()(
        lambda: reference_attention(i.q_latent, i.q_rope, i.cached, scale=i.scale, causal=True)
    )
    return Prepared(step, lambda: problem.view((step(),)))


def _expanded_mlagen(problem: ExpandedDecodeProblem, env: Env) -> Prepared:
    i, s = problem.inputs, problem.inputs.spec
    dims = AttentionDims.from_spec(s)
    launch = getattr(env.package.kernels, f"{attention_kernel(env.package, dims)}_launch")
    k_nope, k_pe, v = i.expanded
    step = torch.no_grad()(lambda: launch(i.q_nope, i.q_rope, k_nope, k_pe, v, scale=i.scale, causal=True)[0])
    return Prepared(step, lambda: problem.view((step(),)))


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
    return Prepared(step, lambda: problem.view((step(),)))


def _sdpa_latent(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    """Absorbed decode through torch SDPA: the latent cache copied out of its pages into one
    contiguous [B, 1, T, latent + rope] key (v = its latent part), every (head, new token) of a
    sequence a query row of that single KV head; torch picks the backend."""
    i = problem.inputs
    cache = i.cached.cache
    batch, seq_q, heads, latent = i.q_latent.shape
    rows = torch.stack([cache.gather(b) for b in range(batch)]).unsqueeze(1)
    q = torch.cat((i.q_latent, i.q_rope), -1).transpose(1, 2).reshape(batch, 1, heads * seq_q, -1)
    mask = None
    if seq_q > 1:  # row (h, s) sees the keys up to its own token: the s-th newest of the cache
        mask = reference.visible(
            seq_q, i.cache_len, causal=True, window=None, group_mask=None, device=q.device
        ).repeat(heads, 1)

    def step():
        out = F.scaled_dot_product_attention(q, rows, rows[..., :latent], attn_mask=mask, scale=i.scale)
        return out.view(batch, heads, seq_q, latent).transpose(1, 2)

    step = torch.no_grad()(step)
    return Prepared(step, lambda: problem.view((step(),)))


def _flash_mla(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    """FlashMLA's paged decode over mlagen's cache as is (pages of 64 rows of latent + rope)."""
    try:
        import flash_mla
    except ImportError:
        raise Unavailable("not installed (FlashMLA: CUDA, sm_90 / sm_100, built from source)") from None
    if env.device.type != "cuda":
        raise Unavailable("FlashMLA needs a CUDA GPU")
    i = problem.inputs
    cache = i.cached.cache
    if cache.page_size != 64:
        raise Unavailable(f"FlashMLA reads pages of 64 tokens; this cache's page_size is {cache.page_size}")
    q = torch.cat((i.q_latent, i.q_rope), -1)
    pages = cache.buffer.unsqueeze(2)  # [pages, 64, 1 KV head, latent + rope]
    metadata, splits = flash_mla.get_mla_metadata(cache.lengths, i.seq_q * i.heads, 1)

    def step():
        out, _ = flash_mla.flash_mla_with_kvcache(
            q,
            pages,
            cache.page_table,
            cache.lengths,
            cache.latent_dim,
            metadata,
            splits,
            softmax_scale=i.scale,
            causal=True,
        )
        return out

    step = torch.no_grad()(step)
    return Prepared(step, lambda: problem.view((step(),)))


def _flashinfer(problem: AbsorbedDecodeProblem, env: Env) -> Prepared:
    """FlashInfer's paged MLA wrapper, planned once per shape, over mlagen's pages (its
    latent and rope caches are the two column ranges of the one buffer)."""
    try:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper
    except ImportError:
        raise Unavailable("not installed (FlashInfer: pip install flashinfer-python)") from None
    if env.device.type != "cuda":
        raise Unavailable("FlashInfer needs a CUDA GPU")
    i = problem.inputs
    cache = i.cached.cache
    batch, seq_q, heads, latent = i.q_latent.shape
    device = i.q_latent.device
    per_sequence = -(-i.cache_len // cache.page_size)
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=device))
    wrapper.plan(
        torch.arange(batch + 1, dtype=torch.int32, device=device) * seq_q,
        torch.arange(batch + 1, dtype=torch.int32, device=device) * per_sequence,
        cache.page_table[:, :per_sequence].reshape(-1).contiguous(),
        cache.lengths,
        heads,
        latent,
        cache.rope_dim,
        cache.page_size,
        True,
        i.scale,
        i.q_latent.dtype,
        cache.buffer.dtype,
    )
    q_nope, q_pe = (
        i.q_latent.reshape(batch * seq_q, heads, latent),
        i.q_rope.reshape(batch * seq_q, heads, -1),
    )
    ckv, kpe = cache.buffer[..., :latent], cache.buffer[..., latent:]
    step = torch.no_grad()(lambda: wrapper.run(q_nope, q_pe, ckv, kpe).view(batch, seq_q, heads, latent))
    return Prepared(step, lambda: problem.view((step(),)))


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


# The GPU suite (mlagen bench --suite gpu): the peers of the issue, not the eager reference
# (it would materialise [B, H, S, S] at 16k) nor the whole module.
BASELINE = Contender(
    "baseline",
    "attention",
    "Triton tutorial-style fused attention (mlagen/bench/baseline.py); grouped K/V repeated per query head",
    _baseline,
)
SUITE_ATTENTION_CONTENDERS = (
    *(
        c
        for c in ATTENTION_CONTENDERS
        if c.name in ("mlagen", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex")
    ),
    BASELINE,
)
SUITE_DECODE_CONTENDERS = (
    next(c for c in DECODE_CONTENDERS if c.name == "mlagen"),
    Contender(
        "sdpa-latent",
        "absorbed",
        "torch SDPA over the latent cache copied out of its pages, heads x new tokens as query rows of one KV head",
        _sdpa_latent,
    ),
    Contender(
        "flashmla", "absorbed", "FlashMLA paged decode (flash_mla_with_kvcache) on the same pages", _flash_mla
    ),
    Contender(
        "flashinfer", "absorbed", "FlashInfer BatchMLAPagedAttentionWrapper on the same pages", _flashinfer
    ),
)


def contenders_for(mode: str) -> tuple[Contender, ...]:
    return DECODE_CONTENDERS if mode == "decode" else ATTENTION_CONTENDERS
