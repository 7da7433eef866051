"""Sequence-compressed attention (DeepSeek-V4, the `compressed` family): the building
blocks of the generated modules and the plain-torch reference of every kernel.

Notation: x [B, S, d_model]; H heads of D = head_dim (512); dr = rope_head_dim (64), the
last dr dims of a head, rotated as interleaved pairs (2i, 2i+1) in place; one shared KV
head with K = V; m = compression rate; W = entries (closed windows); C = 2 series per
token with overlap (CSA), else 1.

    entry w = RMSNorm(sum_j softmax_j(gate_j + bias_j) * kv_j) rotated at position w*m,
              j over window w's m tokens (with overlap: window w-1's first series and
              window w's second, 2m slots; softmax per channel)
    query t sees raw tokens s with t - window < s <= t, and entry w when w < (t+1) // m
              (and, with an indexer, w among its top-k entries)
    out_t   = inverse-RoPE(softmax([q.k_s, q.e_w, sink]) @ [k_s, e_w])     (the sink has no value)

Every reference here mirrors transformers' modeling_deepseek_v4.py operation for
operation (dtypes included), except that q.k accumulates in fp32 (mlagen's rule, see
runtime/reference.py): these are the oracles of the kernels and `reference_forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from mlagen.runtime.checks import expect_shape, expect_tensor
from mlagen.runtime.rope import YarnParams, inverse_frequencies


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and softmax: fp32, or fp64 for an fp64 golden."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- small modules with transformers' parameter names -------------------------------------------


class FP32RMSNorm(nn.Module):
    """DeepseekV4RMSNorm: the weight is kept in fp32 (transformers' _keep_in_fp32_modules) and
    multiplies the fp32 normalised value; one cast to the input dtype at the end."""

    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.to(compute_dtype(x.dtype))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(wide.dtype) * normed).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepseekV4UnweightedRMSNorm: the statistic in fp32, the product in the input dtype."""
    wide = x.to(compute_dtype(x.dtype))
    return x * torch.rsqrt(wide.square().mean(-1, keepdim=True) + eps).to(x.dtype)


class GroupedLinear(nn.Module):
    """DeepseekV4GroupedLinear (`o_a_proj`): a block-diagonal linear, group g maps its own
    in_features to out_features. weight [groups * out_features, in_features]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(groups * out_features, in_features, dtype=dtype, device=device)
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., groups, in_features] -> [..., groups, out_features]."""
        weight = self.weight.view(self.groups, -1, self.weight.shape[-1])
        return torch.einsum("...gi,goi->...go", x, weight)


class PairRotary(nn.Module):
    """cos/sin [B, S, dim / 2], one angle per interleaved pair (DeepseekV4RotaryEmbedding):
    computed in fp32 from fp32 frequencies (fp64 for an fp64 module), then cast, and never
    scaled (V4 fixes yarn's attention_factor at 1). The frequencies are a non-persistent
    buffer, so state dicts hold exactly transformers' parameter names."""

    def __init__(
        self, dim: int, theta: float, yarn: YarnParams | None, device: torch.device | str | None = None
    ):
        super().__init__()
        self.dim, self.theta, self.yarn = dim, theta, yarn
        self.register_buffer("inv_freq", self._frequencies().to(device), persistent=False)

    def _frequencies(self) -> torch.Tensor:
        return inverse_frequencies(self.dim, self.theta, self.yarn)[0]

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the frequencies on `device` (a module built on the meta device has none)."""
        self.inv_freq = self._frequencies().to(device)

    def _apply(self, fn, recurse=True):
        # .half() would round the frequencies; they stay fp32 and only follow device moves.
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        wide = compute_dtype(dtype)
        freqs = position_ids.to(wide)[..., None] * self.inv_freq.to(position_ids.device, wide)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's apply_rotary_pos_emb: rotate the last 2 * cos.shape[-1] dims of x [B, S, H, D]
    as interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32 (fp64),
    pairs left in place; cos/sin [B, S, dr / 2]. The inverse rotation passes -sin."""
    rope_dim = 2 * cos.shape[-1]
    wide = compute_dtype(x.dtype)
    cos = cos.repeat_interleave(2, dim=-1)[:, :, None].to(wide)
    sin = sin.repeat_interleave(2, dim=-1)[:, :, None].to(wide)
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].to(wide)
    rotated = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((nope, (rope * cos + rotated * sin).to(x.dtype)), dim=-1)


# --- the compressor ----------------------------------------------------------------------------


def entry_positions(first: int, count: int, rate: int, batch: int, device: torch.device) -> torch.Tensor:
    """[B, count]: each entry is rotated at its window's first position."""
    return ((first + torch.arange(count, device=device)) * rate).expand(batch, count)


def compress_reference(
    kv: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rotary: PairRotary,
    *,
    rate: int,
    overlap: bool,
    eps: float,
    first_window: int = 0,
    start: int = 0,
) -> torch.Tensor:
    """Entries [B, W, 1, D] of the windows closed by the tokens of kv/gate [B, T, C*D]
    (the projections of tokens start .. start+T-1), from window `first_window` on. With
    overlap, window first_window - 1's tokens come first when they exist (start <
    first_window * rate); where they do not (window -1, or a first call), their slots get
    zero weight, as in transformers. The math of DeepseekV4HCACompressor and
    DeepseekV4CSACompressor (and the indexer's compressor), operation for operation."""
    batch, tokens, width = kv.shape
    series = 2 if overlap else 1
    dim = width // series
    offset = first_window * rate - start  # index of the first token of the first window
    windows = max((tokens - offset) // rate, 0)
    if windows == 0:
        return kv.new_zeros((batch, 0, 1, dim))
    chunk_kv = kv[:, offset : offset + windows * rate].view(batch, windows, rate, width)
    chunk_gate = gate[:, offset : offset + windows * rate].view(batch, windows, rate, width) + bias
    if overlap:
        new_kv = chunk_kv.new_zeros((batch, windows, 2 * rate, dim))
        new_gate = chunk_gate.new_full((batch, windows, 2 * rate, dim), float("-inf"))
        new_kv[:, :, rate:] = chunk_kv[..., dim:]
        new_gate[:, :, rate:] = chunk_gate[..., dim:]
        if windows > 1:
            new_kv[:, 1:, :rate] = chunk_kv[:, :-1, :, :dim]
            new_gate[:, 1:, :rate] = chunk_gate[:, :-1, :, :dim]
        if offset >= rate:  # the window before the first is here: its first series overlaps
            prior_kv = kv[:, offset - rate : offset, :dim]
            prior_gate = gate[:, offset - rate : offset, :dim] + bias[:, :dim]
            new_kv[:, 0, :rate] = prior_kv.to(new_kv.dtype)
            new_gate[:, 0, :rate] = prior_gate.to(new_gate.dtype)
        chunk_kv, chunk_gate = new_kv, new_gate
    weights = chunk_gate.softmax(dim=2, dtype=compute_dtype(chunk_kv.dtype)).to(chunk_kv.dtype)
    pooled = rms_norm((chunk_kv * weights).sum(dim=2), norm_weight, eps)
    positions = entry_positions(first_window, windows, rate, batch, kv.device)
    cos, sin = rotary(positions, pooled.dtype)
    return rope_pairs(pooled.unsqueeze(2), cos, sin)


# --- the indexer -------------------------------------------------------------------------------


def entry_thresholds(positions: torch.Tensor, rate: int) -> torch.Tensor:
    """Entries a query at each position may see: those with index < (position + 1) // rate."""
    return (positions + 1) // rate


def index_scores_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    weight_scale: float,
    rate: int,
) -> torch.Tensor:
    """DeepseekV4IndexerScorer plus the indexer's future mask: query [B, S, H_I, d_I],
    keys [B, W, 1, d_I], weights [B, S, H_I] (weights_proj output) ->
    sum_h (weights[h] * weight_scale) * ReLU(q_h . k) * scale [B, S, W] in fp32, -inf for
    entries the query may not see yet (scale = d_I**-0.5, weight_scale = H_I**-0.5)."""
    wide = compute_dtype(query.dtype)
    scores = torch.matmul(
        query.to(wide), keys[:, :, 0].to(wide).transpose(-1, -2).unsqueeze(1)
    )  # [B, S, H, W]
    scores = torch.relu(scores) * scale
    scores = (scores * (weights.to(wide) * weight_scale).unsqueeze(-1)).sum(dim=2)
    entries = torch.arange(keys.shape[1], device=keys.device)
    future = entries.view(1, 1, -1) >= entry_thresholds(positions, rate).unsqueeze(-1)
    return scores.masked_fill(future, float("-inf"))


def top_k_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The min(k, W) best entries per query [B, S, min(k, W)] (int64), -1 where a pick is
    an entry the query may not see (fewer than k visible). Equal scores go to the earlier
    entry: the ReLU makes exact ties common (0 where every index head's q.k is negative), and
    torch.topk breaks them differently for different widths, so prefill and decode (which see
    the same scores, the prefill with more entries after them) would pick differently."""
    ordered = scores.sort(dim=-1, descending=True, stable=True)
    count = min(k, scores.shape[-1])
    values, indices = ordered.values[..., :count], ordered.indices[..., :count]
    return torch.where(values == float("-inf"), -1, indices)


# --- attention ---------------------------------------------------------------------------------


def attend_reference(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    entries: torch.Tensor | None,
    entry_counts: torch.Tensor | None,
    selected: torch.Tensor | None,
    sinks: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: float,
    window: int,
    rate: int,
) -> torch.Tensor:
    """query [B, S, H, D] at query_positions [B, S]; raw keys (= values) [B, T, D] at
    key_positions [B, T] (-1: no key); entries [B, W, D] of which entry_counts [B] exist;
    selected [B, S, k] entry indices (-1: none) or None (every visible entry); sinks [H].
    Returns inverse-RoPE(softmax @ values) [B, S, H, D] (cos/sin at the query positions)."""
    wide = compute_dtype(query.dtype)
    q = query.transpose(1, 2).to(wide)  # [B, H, S, D]
    qpos = query_positions[:, None, :, None]
    scores = torch.matmul(q, keys.to(wide).transpose(-1, -2).unsqueeze(1)) * scale  # [B, H, S, T]
    kpos = key_positions[:, None, None, :]
    visible = (kpos >= 0) & (kpos <= qpos) & (kpos > qpos - window)
    values = keys
    if entries is not None and entries.shape[1]:
        entry_scores = torch.matmul(q, entries.to(wide).transpose(-1, -2).unsqueeze(1)) * scale
        index = torch.arange(entries.shape[1], device=entries.device)
        seen = (index.view(1, 1, 1, -1) < entry_thresholds(qpos, rate)) & (
            index.view(1, 1, 1, -1) < entry_counts.view(-1, 1, 1, 1)
        )
        if selected is not None:
            chosen = torch.zeros(
                (*selected.shape[:2], entries.shape[1] + 1), dtype=torch.bool, device=entries.device
            )
            chosen.scatter_(-1, torch.where(selected >= 0, selected, entries.shape[1]).long(), True)
            seen = seen & chosen[:, None, :, :-1]
        scores = torch.cat((scores, entry_scores), dim=-1)
        visible = torch.cat((visible.expand(-1, -1, scores.shape[2], -1), seen), dim=-1)
        values = torch.cat((keys, entries), dim=1)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(wide).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores - scores.amax(dim=-1, keepdim=True), dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.to(values.dtype), values.unsqueeze(1)).transpose(1, 2)  # [B, S, H, D]
    return rope_pairs(out, cos, -sin)


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    entries: torch.Tensor | None,
    selected: torch.Tensor | None,
    sinks: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: float,
    window: int,
    rate: int,
) -> torch.Tensor:
    """The layer's attention within one call (no cache): query [B, S, H, D] and key [B, S, 1, D]
    at positions 0..S-1, entries [B, W, 1, D] of the call's closed windows."""
    batch, seqlen = query.shape[:2]
    positions = torch.arange(seqlen, device=query.device).expand(batch, seqlen)
    counts = None
    if entries is not None:
        counts = torch.full((batch,), entries.shape[1], device=query.device)
        entries = entries[:, :, 0]
    return attend_reference(
        query,
        positions,
        key[:, :, 0],
        positions,
        entries,
        counts,
        selected,
        sinks,
        cos,
        sin,
        scale=scale,
        window=window,
        rate=rate,
    )


# --- the operation tables a generated forward runs on -------------------------------------------


def query_positions(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seqlen, device=device).expand(batch, seqlen)


class ReferenceOps:
    """The heavy operations of a compressed layer in plain torch (`reference_forward`, CPU
    without the interpreter, bf16 on CPU). `kernel` names the kernel the other tables run."""

    def compress(self, name, kv, gate, bias, norm_weight, rotary, *, rate, overlap, eps, kernel):
        return compress_reference(kv, gate, bias, norm_weight, rotary, rate=rate, overlap=overlap, eps=eps)

    def index_scores(self, query, keys, weights, *, scale, weight_scale, rate, kernel):
        positions = query_positions(*query.shape[:2], query.device)
        return index_scores_reference(
            query, keys, weights, positions, scale=scale, weight_scale=weight_scale, rate=rate
        )

    def top_k(self, scores, k):
        return top_k_reference(scores, k).to(torch.int32)

    def attention(self, query, key, entries, selected, sinks, cos, sin, *, scale, window, rate, kernel):
        return attention_reference(
            query, key, entries, selected, sinks, cos, sin, scale=scale, window=window, rate=rate
        )


REFERENCE_OPS = ReferenceOps()


def consecutive_positions(
    hidden_states: torch.Tensor,
    position_ids: torch.Tensor | None,
    starts: list[int] | None,
    max_position: int,
) -> torch.Tensor:
    """Positions [B, S]: starts[b] + 0..S-1 (starts: each sequence's cached tokens, default 0).
    The compressor counts windows from a sequence's first token and a query sees an entry
    by its own index in the sequence, so explicit position_ids must be exactly these."""
    batch, seqlen = hidden_states.shape[:2]
    first = starts if starts is not None else [0] * batch
    longest = max(first, default=0)
    if longest + seqlen > max_position:
        cached = f" after {longest} cached tokens" if longest else ""
        raise ValueError(f"sequence length {seqlen}{cached} exceeds max_position={max_position} of the spec")
    steps = torch.arange(seqlen, device=hidden_states.device)
    expected = torch.tensor(first, device=hidden_states.device)[:, None] + steps
    if position_ids is None:
        return expected
    expect_tensor("position_ids", position_ids, device=hidden_states.device)
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids must be int64 or int32, got {position_ids.dtype}")
    if position_ids.dim() == 1:
        position_ids = position_ids.expand(batch, -1)
    expect_shape("position_ids", position_ids, (batch, seqlen))
    if not torch.compiler.is_compiling() and not torch.equal(position_ids.to(expected.dtype), expected):
        where = "each sequence's cached length + " if starts is not None else ""
        raise ValueError(
            f"position_ids must be {where}0..{seqlen - 1}: compressed layers count windows from a sequence's "
            "first token (pass position_ids=None)"
        )
    return expected
