"""Plain-torch reference ops: the semantics every kernel is tested against.

`attention` has the same signature as the generated kernel launchers, so a
generated module can run either; in fp64 it is the golden reference, and in a
low dtype it is "eager": scores and softmax in fp32, the probabilities rounded
to the input dtype for P @ V, like transformers' eager path (which, unlike this,
also rounds q.k to the input dtype; see `attention`).
"""

from __future__ import annotations

import torch

# Group masks for the latent family: (mode, query rows per group, keys per group).
# "same": a query row sees only keys of its own group (chunk latents read their chunk).
# "earlier": a query row sees only keys of strictly earlier groups (tokens read past chunks).
GroupMask = tuple[str, int, int]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: statistics in fp32 (fp64 for an fp64 golden), the weight
    applied in the input dtype."""
    wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def visible(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: int | None,
    group_mask: GroupMask | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Bool [Sq, Sk]: which keys each query may attend to.

    Causal and window masks align the last query with the last key (a query
    block that continues a cached prefix), as FlashAttention does.
    """
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    query_pos = rows + (seqlen_k - seqlen_q)
    if causal:
        allowed &= cols <= query_pos
    if window is not None:
        allowed &= query_pos - cols < window
    if group_mask is not None:
        mode, q_group, k_group = group_mask
        if mode == "same":
            allowed &= cols // k_group == rows // q_group
        else:
            assert mode == "earlier", mode
            allowed &= cols // k_group < rows // q_group
    return allowed


def attention(
    q_a: torch.Tensor,
    q_b: torch.Tensor | None,
    k_a: torch.Tensor,
    k_b: torch.Tensor | None,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
    group_mask: GroupMask | None = None,
    return_lse: bool = False,
):
    """softmax((q_a.k_a + q_b.k_b) * scale + mask) @ v.

    q_a [B, Sq, Hq, Da], q_b [B, Sq, Hq, Db] or None, k_a [B, Sk, Hk, Da],
    k_b [B, Sk, Hk or 1, Db] or None, v [B, Sk, Hk, Dv] -> [B, Sq, Hq, Dv].
    Rows with no visible key give zeros (and lse -inf), never NaN. A key that a
    query may not see adds exactly nothing to it, even a NaN one; a NaN or inf
    key or value that it may see makes its output NaN.
    """
    heads_q, heads_k = q_a.shape[2], k_a.shape[2]
    group = heads_q // heads_k
    assert group * heads_k == heads_q
    # q.k accumulates and stays in fp32 (fp64 for the golden), as in the kernels and SDPA.
    # transformers' eager path rounds q.k to fp16/bf16 before its fp32 softmax, which turns
    # scores past 65504 (an fp16 model on activations x100) into inf and the output into NaN
    # where the kernels are finite; the reference has to be finite wherever they are.
    score_dtype = torch.float64 if q_a.dtype == torch.float64 else torch.float32

    def per_query_head(t: torch.Tensor) -> torch.Tensor:  # [B, S, h, D] -> [B, Hq, S, D]
        t = t.transpose(1, 2)
        return t.repeat_interleave(heads_q // t.shape[1], dim=1) if t.shape[1] != heads_q else t

    def score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return per_query_head(q).to(score_dtype) @ per_query_head(k).to(score_dtype).transpose(-1, -2)

    scores = score(q_a, k_a)
    if q_b is not None:
        assert k_b is not None
        scores = scores + score(q_b, k_b)
    scores = scores * scale
    # A masked key's probability is exactly 0, but 0 * NaN is NaN in P @ V. So a value row
    # holding NaN or inf is zeroed, and its NaN moves into the key's scores, where the mask
    # drops it for the queries that may not see the key and keeps it for those that may.
    values = per_query_head(v)
    finite = values.isfinite().all(-1)  # [B, Hq, Sk]
    values = values.masked_fill(~finite[..., None], 0)
    scores = scores.masked_fill(~finite[..., None, :], float("nan"))
    allowed = visible(
        q_a.shape[1], k_a.shape[1], causal=causal, window=window, group_mask=group_mask, device=q_a.device
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(lse[..., None] == float("-inf"), 0.0))
    out = (probs.to(v.dtype) @ values).transpose(1, 2)
    if return_lse:
        return out, lse.to(torch.float32)
    return out
