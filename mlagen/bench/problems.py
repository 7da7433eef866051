"""What a benchmark case times: random operands at one shape, their FLOPs and bytes,
and the answers every contender is checked against before it is timed.

Each problem gives `expected(torch.float64)` (the golden: the plain-torch reference
in fp64 on the same operands) and `expected(low dtype)` (eager: the same reference in
the benchmark dtype), in the layout of `view(outputs)`; a contender passes when its
error against the golden is at most ERROR_RATIO x eager's plus a small atol.

Big shapes are checked without materialising [B, H, S, S] in fp64: attention on the
last `check_rows` queries only (causal masks align the last query with the last key,
so those rows see every key they see in the full problem; in training the output
gradient is zero elsewhere, so every gradient is checked whole), and the whole module
on a prefix of the sequence.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch

from mlagen.bench import flops as work
from mlagen.ir.lower import softmax_scale
from mlagen.runtime import reference
from mlagen.runtime.mla_decode import CachedTokens
from mlagen.runtime.paged_cache import PagedLatentCache
from mlagen.spec import GqaSpec, MlaSpec, Spec

Outputs = tuple[torch.Tensor | None, ...]


@dataclass(frozen=True, slots=True)
class AttentionDims:
    """The attention a spec's prefill kernel computes: score = q_a.k_a (+ q_b.k_b, MLA's
    rope part against one shared key head), output width dim_v."""

    heads_q: int
    heads_k: int
    dim_a: int
    dim_b: int  # 0: no second score part
    dim_v: int
    causal: bool
    window: int | None
    scale: float

    @property
    def dim_qk(self) -> int:
        return self.dim_a + self.dim_b

    @classmethod
    def from_spec(cls, spec: Spec) -> AttentionDims:
        if isinstance(spec, MlaSpec):
            return cls(
                spec.heads,
                spec.heads,
                spec.qk_nope_head_dim,
                spec.qk_rope_head_dim,
                spec.v_head_dim,
                spec.causal,
                None,
                softmax_scale(spec.qk_head_dim, spec.rope),
            )
        assert isinstance(spec, GqaSpec), spec.family
        return cls(
            spec.heads,
            spec.kv_heads,
            spec.head_dim,
            0,
            spec.head_dim,
            spec.causal,
            spec.window,
            softmax_scale(spec.head_dim, None),
        )


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def attention_work(
    dims: AttentionDims, batch: int, seq_len: int, elem: int, train: bool
) -> tuple[float, float]:
    """(FLOPs, bytes) of one attention call by the ANCHORS conventions: every operand read
    once and the output written once (MLA's rope key once, shared by the heads)."""
    d = dims
    forward = work.attention_flops(
        batch, d.heads_q, seq_len, seq_len, d.dim_qk, d.dim_v, causal=d.causal, window=d.window
    )
    per_token = d.heads_q * d.dim_qk + d.heads_k * (d.dim_a + d.dim_v) + d.dim_b + d.heads_q * d.dim_v
    moved = float(batch * seq_len * per_token * elem)
    if train:
        return forward * work.TRAIN_FLOPS_FACTOR, moved * work.TRAIN_BYTES_FACTOR
    return forward, moved


def absorbed_decode_work(
    spec: MlaSpec, heads: int, batch: int, cache_len: int, seq_q: int, elem: int
) -> tuple[float, float]:
    """(FLOPs, bytes) of one absorbed decode step over `batch` caches of `cache_len` tokens."""
    dim_qk, dim_v = spec.kv_lora_rank + spec.qk_rope_head_dim, spec.kv_lora_rank
    total = batch * cache_len
    return (
        work.decode_flops(seq_q, heads, total, dim_qk, dim_v),
        work.absorbed_decode_bytes(batch, seq_q, heads, total, dim_qk, dim_v, elem),
    )


class AttentionProblem:
    """The attention kernel alone: q_a [B, S, Hq, Da], q_b [B, S, Hq, Db], k_a [B, S, Hk, Da],
    k_b [B, S, 1, Db] (MLA), v [B, S, Hk, Dv]; forward, or forward + backward when `train`."""

    def __init__(
        self,
        dims: AttentionDims,
        batch: int,
        seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        train: bool,
        check_rows: int,
    ):
        self.dims, self.batch, self.seq_len, self.dtype, self.train = dims, batch, seq_len, dtype, train
        self.check_rows = min(check_rows, seq_len)
        d, b, s = dims, batch, seq_len
        second = d.dim_b > 0
        self.q_a = _randn((b, s, d.heads_q, d.dim_a), dtype, device)
        self.q_b = _randn((b, s, d.heads_q, d.dim_b), dtype, device) if second else None
        self.k_a = _randn((b, s, d.heads_k, d.dim_a), dtype, device)
        self.k_b = _randn((b, s, 1, d.dim_b), dtype, device) if second else None
        self.v = _randn((b, s, d.heads_k, d.dim_v), dtype, device)
        self.grad_out = self.timing_grad_out = None
        if train:
            # The check's output gradient is zero outside the checked rows, so the golden of those
            # rows alone gives every input gradient whole; the timed runs get a random one
            # everywhere (mostly-zero operands can run faster than real data).
            self.grad_out = torch.zeros((b, s, d.heads_q, d.dim_v), dtype=dtype, device=device)
            self.grad_out[:, s - self.check_rows :] = _randn(
                (b, self.check_rows, d.heads_q, d.dim_v), dtype, device
            )
            self.timing_grad_out = _randn((b, s, d.heads_q, d.dim_v), dtype, device)
        self._expected: dict[torch.dtype, Outputs] = {}

    @property
    def operands(self) -> tuple[torch.Tensor | None, ...]:
        return (self.q_a, self.q_b, self.k_a, self.k_b, self.v)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("out", "dq_a", "dq_b", "dk_a", "dk_b", "dv") if self.train else ("out",)

    @property
    def flops(self) -> float:
        return attention_work(self.dims, self.batch, self.seq_len, self.q_a.element_size(), self.train)[0]

    @property
    def bytes(self) -> float:
        return attention_work(self.dims, self.batch, self.seq_len, self.q_a.element_size(), self.train)[1]

    def shape(self) -> dict:
        names = ("q_a", "q_b", "k_a", "k_b", "v")
        shape = {name: list(t.shape) for name, t in zip(names, self.operands) if t is not None}
        shape.update(causal=self.dims.causal, window=self.dims.window)
        return shape

    def view(self, outputs: Outputs) -> Outputs:
        """(out, *grads) in [B, S, H, D] layout -> what `expected` holds: the checked rows of out."""
        return (outputs[0][:, -self.check_rows :], *outputs[1:])

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype not in self._expected:
            self._expected[dtype] = self._reference(dtype)
        return self._expected[dtype]

    def _reference(self, dtype: torch.dtype) -> Outputs:
        d, rows = self.dims, self.check_rows
        options = dict(scale=d.scale, causal=d.causal, window=d.window)
        full = [None if t is None else t.to(dtype) for t in self.operands]
        outs = []
        grads = [None if t is None else torch.zeros_like(t) for t in full]
        for b in range(self.batch):  # one sequence at a time bounds the fp64 score matrix
            one = [None if t is None else t[b : b + 1] for t in full]
            one[0] = one[0][:, -rows:]
            if one[1] is not None:
                one[1] = one[1][:, -rows:]
            if not self.train:
                outs.append(reference.attention(*one, **options))
                continue
            leaves = [None if t is None else t.detach().requires_grad_() for t in one]
            with torch.enable_grad():
                out = reference.attention(*leaves, **options)
                grad_out = self.grad_out[b : b + 1, -rows:].to(dtype)
                found = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out))
            outs.append(out.detach())
            for index, leaf in enumerate(leaves):
                if leaf is None:
                    continue
                grad = next(found)
                if index in (0, 1):  # query operands: only the checked rows have gradients
                    grads[index][b : b + 1, -rows:] = grad
                else:
                    grads[index][b : b + 1] = grad
        out = torch.cat(outs)
        return (out, *grads) if self.train else (out,)


class ModuleProblem:
    """The whole generated layer: hidden_states [B, S, d_model] -> [B, S, d_model]."""

    def __init__(
        self,
        package,
        spec: Spec,
        batch: int,
        seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        train: bool,
        check_len: int,
    ):
        self.spec, self.batch, self.seq_len, self.dtype, self.train = spec, batch, seq_len, dtype, train
        self.check_len = min(check_len, seq_len)
        self.module = package.Attention(dtype=dtype, device=device)
        self.x = _randn((batch, seq_len, spec.d_model), dtype, device)
        self.grad_out = _randn((batch, seq_len, spec.d_model), dtype, device) if train else None
        self._expected: dict[torch.dtype, Outputs] = {}

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("out", "d_hidden_states") if self.train else ("out",)

    @cached_property
    def linear_weights(self) -> int:
        return sum(m.weight.numel() for m in self.module.modules() if isinstance(m, torch.nn.Linear))

    @property
    def flops(self) -> float:
        """Attention by the ANCHORS convention plus 2 FLOPs per weight per token for the
        projections (x 3 in training: one forward, two backward matmuls)."""
        d = AttentionDims.from_spec(self.spec)
        attention = work.attention_flops(
            self.batch,
            d.heads_q,
            self.seq_len,
            self.seq_len,
            d.dim_qk,
            d.dim_v,
            causal=d.causal,
            window=d.window,
        )
        linears = 2.0 * self.batch * self.seq_len * self.linear_weights
        if self.train:
            return attention * work.TRAIN_FLOPS_FACTOR + 3 * linears
        return attention + linears

    @property
    def bytes(self) -> float:
        """A lower bound: every weight read once, the input read and the output written."""
        elem = self.x.element_size()
        parameters = sum(p.numel() for p in self.module.parameters())
        moved = elem * (parameters + 2 * self.x.numel())
        return moved * (work.TRAIN_BYTES_FACTOR if self.train else 1.0)

    def shape(self) -> dict:
        return {"hidden_states": list(self.x.shape), "checked_prefix": self.check_len}

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.x[:, : self.check_len]
        return x, None if self.grad_out is None else self.grad_out[:, : self.check_len]

    def expected(self, dtype: torch.dtype) -> Outputs:
        if dtype not in self._expected:
            module = self.module if dtype == self.dtype else copy.deepcopy(self.module).to(dtype)
            x, grad_out = self.prefix()
            x = x.to(dtype)
            if not self.train:
                with torch.no_grad():
                    self._expected[dtype] = (module.reference_forward(x),)
            else:
                x = x.detach().requires_grad_()
                with torch.enable_grad():
                    out = module.reference_forward(x)
                    (grad_x,) = torch.autograd.grad(out, x, grad_out.to(dtype))
                self._expected[dtype] = (out.detach(), grad_x)
        return self._expected[dtype]


def filled_cache(
    spec: MlaSpec, batch: int, cache_len: int, dtype: torch.dtype, device: torch.device
) -> PagedLatentCache:
    """A paged latent cache holding `cache_len` random rows per sequence (shareable between
    decode problems that differ only in heads or new tokens: building the page table is slow)."""
    cache = PagedLatentCache(
        batch,
        cache_len,
        latent_dim=spec.kv_lora_rank,
        rope_dim=spec.qk_rope_head_dim,
        page_size=spec.page_size,
        dtype=dtype,
        device=device,
    )
    cache.reserve([cache_len] * batch)
    cache.buffer.normal_()
    cache.commit([cache_len] * batch)
    return cache


class DecodeInputs:
    """One absorbed-MLA decode step: `seq_q` new tokens per sequence over a paged latent
    cache of `cache_len` tokens per sequence (the new ones included), random rows.

    `heads` overrides the spec's query heads (the kernels take any count). Answers are checked
    on `check_batch` sequences spread over the batch, the last one always among them (its
    pages sit last in the cache, so a 32-bit offset that overflows shows there); that bounds
    the fp64 golden at large batches."""

    def __init__(
        self,
        spec: MlaSpec,
        batch: int,
        cache_len: int,
        dtype: torch.dtype,
        device: torch.device,
        seq_q: int = 1,
        *,
        heads: int | None = None,
        cache: PagedLatentCache | None = None,
        check_batch: int | None = None,
    ):
        self.spec, self.batch, self.cache_len, self.seq_q = spec, batch, cache_len, seq_q
        self.heads = heads = heads or spec.heads
        count = min(check_batch or batch, batch)
        # count indices from 0 to batch - 1, evenly spread; one: the last
        self.checked_sequences = tuple(
            batch - 1 - (batch - 1) * i // max(count - 1, 1) for i in range(count)
        )[::-1]
        latent, nope, rope, dim_v = (
            spec.kv_lora_rank,
            spec.qk_nope_head_dim,
            spec.qk_rope_head_dim,
            spec.v_head_dim,
        )
        if cache is None:
            cache = filled_cache(spec, batch, cache_len, dtype, device)
        assert cache.host_lengths() == [cache_len] * batch, (
            "a shared cache must hold cache_len rows per sequence"
        )
        self.cached = CachedTokens(cache, cache.lengths - seq_q, (seq_q,) * batch)
        self.scale = softmax_scale(spec.qk_head_dim, spec.rope)
        self.q_nope = _randn((batch, seq_q, heads, nope), dtype, device)
        self.q_rope = _randn((batch, seq_q, heads, rope), dtype, device)
        # kv_b_proj.weight [H * (nope + v), latent]; per head W_UK = rows [:nope], W_UV = rows [nope:].
        self.kv_b = _randn((heads * (nope + dim_v), latent), dtype, device) * latent**-0.5
        self.q_latent = torch.einsum("bshd,hdr->bshr", self.q_nope, self.per_head(self.kv_b)[:, :nope])
        self._golden_latent: torch.Tensor | None = None

    def per_head(self, kv_b: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return kv_b.view(self.heads, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank)

    @property
    def total_keys(self) -> int:
        return self.batch * self.cache_len

    def checked(self, tensor: torch.Tensor) -> torch.Tensor:
        """The checked sequences' rows of a [B, ...] tensor."""
        return tensor[list(self.checked_sequences)]

    def reference_latent(self, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Absorbed attention of the checked sequences (q_* already theirs) over their cached rows,
        in q_latent's dtype, as mla_decode.reference_attention computes it for every sequence."""
        cache, outs = self.cached.cache, []
        for row, seq in enumerate(self.checked_sequences):
            rows = cache.gather(seq).to(q_latent.dtype)[None, :, None]
            latent, rope_key = rows[..., : cache.latent_dim], rows[..., cache.latent_dim :]
            one = slice(row, row + 1)
            outs.append(
                reference.attention(
                    q_latent[one], q_rope[one], latent, rope_key, latent, scale=self.scale, causal=True
                )
            )
        return torch.cat(outs)

    def golden_latent(self) -> torch.Tensor:
        """softmax(q_latent . c_kv + q_rope . k_pe) @ c_kv in fp64 for the checked sequences,
        q_latent from the fp64 q_nope and W_UK."""
        if self._golden_latent is None:
            w_uk = self.per_head(self.kv_b.double())[:, : self.spec.qk_nope_head_dim]
            q_latent = torch.einsum("bshd,hdr->bshr", self.checked(self.q_nope).double(), w_uk)
            self._golden_latent = self.reference_latent(q_latent, self.checked(self.q_rope).double())
        return self._golden_latent

    @cached_property
    def expanded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-head cache a non-absorbed implementation keeps: k_nope [B, T, H, nope],
        k_pe [B, T, 1, rope], v [B, T, H, v] (every sequence holds cache_len tokens)."""
        s = self.spec
        rows = torch.stack([self.cached.cache.gather(b) for b in range(self.batch)])
        c_kv, k_pe = rows[..., : s.kv_lora_rank], rows[..., s.kv_lora_rank :].unsqueeze(2)
        w = self.per_head(self.kv_b)
        k_nope = torch.einsum("btr,hdr->bthd", c_kv, w[:, : s.qk_nope_head_dim])
        v = torch.einsum("btr,hdr->bthd", c_kv, w[:, s.qk_nope_head_dim :])
        return k_nope, k_pe.contiguous(), v


class AbsorbedDecodeProblem:
    """Absorbed decode: q_latent [B, Sq, H, latent], q_rope [B, Sq, H, rope] over the paged cache."""

    def __init__(self, inputs: DecodeInputs):
        self.inputs = inputs

    @property
    def flops(self) -> float:
        i = self.inputs
        return absorbed_decode_work(
            i.spec, i.heads, i.batch, i.cache_len, i.seq_q, i.q_latent.element_size()
        )[0]

    @property
    def bytes(self) -> float:
        i = self.inputs
        return absorbed_decode_work(
            i.spec, i.heads, i.batch, i.cache_len, i.seq_q, i.q_latent.element_size()
        )[1]

    def shape(self) -> dict:
        i = self.inputs
        return {
            "q_latent": list(i.q_latent.shape),
            "q_rope": list(i.q_rope.shape),
            "cache": list(i.cached.cache.buffer.shape),
            "cache_len": i.cache_len,
            "checked_sequences": list(i.checked_sequences),
        }

    output_names = ("out",)

    def view(self, outputs: Outputs) -> Outputs:
        """[B, Sq, H, latent] -> what `expected` holds: the checked sequences."""
        return (self.inputs.checked(outputs[0]),)

    def expected(self, dtype: torch.dtype) -> Outputs:
        i = self.inputs
        if dtype == torch.float64:
            return (i.golden_latent(),)
        return (i.reference_latent(i.checked(i.q_latent).to(dtype), i.checked(i.q_rope).to(dtype)),)


class ExpandedDecodeProblem:
    """Non-absorbed decode: per-head attention (nope + rope scores, v) over the expanded cache."""

    def __init__(self, inputs: DecodeInputs):
        self.inputs = inputs

    @property
    def flops(self) -> float:
        i, s = self.inputs, self.inputs.spec
        return work.decode_flops(i.seq_q, i.heads, i.total_keys, s.qk_head_dim, s.v_head_dim)

    @property
    def bytes(self) -> float:
        i, s = self.inputs, self.inputs.spec
        return work.expanded_decode_bytes(
            i.batch,
            i.seq_q,
            i.heads,
            i.total_keys,
            s.qk_nope_head_dim,
            s.qk_rope_head_dim,
            s.v_head_dim,
            i.q_nope.element_size(),
        )

    def shape(self) -> dict:
        k_nope, k_pe, v = self.inputs.expanded
        return {
            "q_nope": list(self.inputs.q_nope.shape),
            "q_rope": list(self.inputs.q_rope.shape),
            "k_nope": list(k_nope.shape),
            "k_pe": list(k_pe.shape),
            "v": list(v.shape),
            "checked_sequences": list(self.inputs.checked_sequences),
        }

    output_names = ("out",)

    def view(self, outputs: Outputs) -> Outputs:
        return (self.inputs.checked(outputs[0]),)

    def expected(self, dtype: torch.dtype) -> Outputs:
        i, s = self.inputs, self.inputs.spec
        if dtype == torch.float64:
            w_uv = i.per_head(i.kv_b.double())[:, s.qk_nope_head_dim :]
            return (torch.einsum("bshr,hdr->bshd", i.golden_latent(), w_uv),)
        k_nope, k_pe, v = (i.checked(t).to(dtype) for t in i.expanded)
        q_nope, q_rope = i.checked(i.q_nope).to(dtype), i.checked(i.q_rope).to(dtype)
        return (reference.attention(q_nope, q_rope, k_nope, k_pe, v, scale=i.scale, causal=True),)
