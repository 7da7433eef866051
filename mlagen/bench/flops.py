"""FLOP and byte counts by the conventions of ANCHORS.md (the shared notes on the peers),
so ratios to the peers' published numbers compare.

- Attention forward: 2 * B * H * Sq * Sk_avg * (Dqk + Dv)  (= 4 * B * H * Sq * Sk * D when
  Dqk = Dv = D); causal halves Sk_avg (FlashAttention's benchmark convention).
- Backward: 2.5 x forward, so a training step (forward + backward) is 3.5 x forward.
- Absorbed MLA decode (FlashMLA's benchmark, `tests/test_flash_mla.py`):
  flops = 2 * Sq * Hq * sum(Sk) * (Dqk + Dv)
  bytes = elem * (sum(Sk) * Dqk + B * Sq * Hq * Dqk + B * Sq * Hq * Dv)
  with Dqk = kv_lora_rank + rope (576) and Dv = kv_lora_rank (512) for DeepSeek-V3.
  sum(Sk) already sums over the batch; ANCHORS.md writes an extra factor B in the flops,
  which would count every cached token B times (and put FlashMLA's own published
  396 TF / 1980 GB/s at an impossible ratio), so the factor is left out here.
"""

from __future__ import annotations

BACKWARD_FACTOR = 2.5
TRAIN_FLOPS_FACTOR = 1.0 + BACKWARD_FACTOR
# Forward moves inputs + output; backward reads inputs, output and its gradient and
# writes the input gradients: 3 x the forward's bytes (the small lse ignored).
TRAIN_BYTES_FACTOR = 3.0


def mean_keys(seq_q: int, seq_k: int, *, causal: bool, window: int | None = None) -> float:
    """Average keys a query sees. Causal masks align the last query with the last key;
    the visible region is measured as an area (so plain causal self-attention gives
    exactly Sk / 2, the convention), with a sliding window of `window` keys."""
    if not causal:
        return float(seq_k)
    reach = float(min(window or seq_k, seq_k))

    def area(x: float) -> float:  # keys seen by queries at positions 0..x, integrated
        return x * x / 2 if x <= reach else reach * reach / 2 + reach * (x - reach)

    return (area(seq_k) - area(seq_k - seq_q)) / seq_q


def attention_flops(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    dim_qk: int,
    dim_v: int,
    *,
    causal: bool,
    window: int | None = None,
) -> float:
    """Forward FLOPs of softmax(q k^T) v: two matmuls, 2 FLOPs per multiply-add."""
    return (
        2.0 * batch * heads * seq_q * mean_keys(seq_q, seq_k, causal=causal, window=window) * (dim_qk + dim_v)
    )


def decode_flops(seq_q: int, heads: int, total_keys: int, dim_qk: int, dim_v: int) -> float:
    """Decode FLOPs: every query row of every sequence against all of its cached keys."""
    return 2.0 * seq_q * heads * total_keys * (dim_qk + dim_v)


def absorbed_decode_bytes(
    batch: int, seq_q: int, heads: int, total_keys: int, dim_qk: int, dim_v: int, elem: int
) -> float:
    """Absorbed MLA decode: the compressed cache once, the queries, the latent output."""
    return float(
        elem * (total_keys * dim_qk + batch * seq_q * heads * dim_qk + batch * seq_q * heads * dim_v)
    )


def expanded_decode_bytes(
    batch: int, seq_q: int, heads: int, total_keys: int, nope: int, rope: int, dim_v: int, elem: int
) -> float:
    """Non-absorbed decode over a per-head K/V cache (what transformers keeps): each head's
    K (nope part) and V plus the one shared rope key per token, the queries and the output."""
    cache = total_keys * (heads * (nope + dim_v) + rope)
    return float(elem * (cache + batch * seq_q * heads * (nope + rope) + batch * seq_q * heads * dim_v))
