"""Independent plain-torch implementations of every spec family, written from the math.

Nothing here imports mlagen or the generated code: each function takes a generated
module's `state_dict()` (so the parameter names are the contract), the module's
`SPEC` dict, hidden_states [B, S, d_model] and position_ids [B, S] (or None) and
returns [B, S, d_model] in hidden_states' dtype.

Precision follows transformers' eager path: projections in the input dtype,
RMSNorm statistics in fp32 with the weight applied in the input dtype, softmax in
fp32. Inverse rope frequencies are computed in fp32 (as transformers does when it
builds the rotary embedding); the angles, cos and sin are computed in fp32 and cast
to the input dtype, except in fp64, where they are computed in fp64 so that the
fp64 run is a golden reference with no fp32 rounding left in it.

- `mla_reference`: transformers' DeepseekV3Attention (expanded K = [k_nope, k_pe]).
- `dsa_reference`: transformers' DeepseekV32Attention (MLA over each query's top-k keys).
- `gqa_reference`: Llama/Mistral attention through torch's scaled_dot_product_attention.
- `latent_reference`: DESIGN.md section 2 (Perceiver-style latents), causal variants
  as an explicit loop over chunks, plus the hybrid's sliding-window local path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["REFERENCES", "gqa_reference", "latent_reference", "mla_reference", "reference_for"]


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def _params(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: t.to(dtype) for name, t in state_dict.items() if t.is_floating_point()}


def _linear(p: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepseekV3RMSNorm: variance in fp32, normalised value cast back, then weight * value.
    An fp64 golden keeps fp64 (transformers would round it to fp32, which is no golden)."""
    input_dtype = x.dtype
    x32 = x.to(torch.float64 if input_dtype == torch.float64 else torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


def _positions(hidden_states: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    batch, seqlen = hidden_states.shape[:2]
    if position_ids is None:
        return torch.arange(seqlen, device=hidden_states.device)[None, :].expand(batch, seqlen)
    if position_ids.dim() == 1:
        position_ids = position_ids[None, :].expand(batch, seqlen)
    return position_ids


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters` (modeling_rope_utils)."""
    factor = float(scaling["factor"])
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")
    original_max = scaling["original_max_position"]
    if scaling.get("attention_factor") is not None:
        attention_factor = float(scaling["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = float(_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim))
    else:
        attention_factor = _get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def find_correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    def find_correction_range(low_rot: float, high_rot: float, truncate: bool = True) -> tuple[float, float]:
        low = find_correction_dim(low_rot)
        high = find_correction_dim(high_rot)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(lo: float, hi: float, n: int) -> torch.Tensor:
        if lo == hi:
            hi += 0.001  # prevent singularity
        linear = (torch.arange(n, dtype=torch.float32) - lo) / (hi - lo)
        return torch.clamp(linear, 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low, high = find_correction_range(beta_fast, beta_slow, scaling.get("truncate", True))
    extrapolation_factor = 1 - linear_ramp_factor(low, high, dim // 2).to(torch.float32)
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq, attention_factor


def _cos_sin(rope: dict, dim: int, position_ids: torch.Tensor, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, dim] (transformers' rotary embedding forward, attention scaling folded in)."""
    scaling = rope.get("scaling")
    if scaling is None:
        inv_freq, attention_factor = _default_inv_freq(dim, float(rope["theta"])), 1.0
    else:
        inv_freq, attention_factor = _yarn_inv_freq(dim, float(rope["theta"]), scaling)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = position_ids.to(compute)[..., None] * inv_freq.to(device=device, dtype=compute)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x [B, H, S, d], cos/sin [B, S, d] (unsqueezed at dim 1, as transformers does)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if layout == "interleave":  # apply_rotary_pos_emb_interleave
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    else:
        assert layout == "half", layout
    return (x * cos) + (_rotate_half(x) * sin)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     allowed: torch.Tensor | None) -> torch.Tensor:
    """transformers' eager_attention_forward: q [B,H,Sq,D], k [B,H,Sk,D], v [B,H,Sk,Dv];
    softmax in fp32 (fp64 for fp64). Rows with no visible key give zeros."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(softmax_dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        empty = ~allowed.any(-1, keepdim=True)
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(empty, 0.0)
    return torch.matmul(probs.to(v.dtype), v)


def _causal_mask(seqlen: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool [S, S]: key j visible from query i iff j <= i (and i - j < window)."""
    i = torch.arange(seqlen, device=device)[:, None]
    j = torch.arange(seqlen, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, S, H*D] -> [B, H, S, D]
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, S, H*D]
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


# ---------------------------------------------------------------------------------------------
# mla: DeepseekV3Attention
# ---------------------------------------------------------------------------------------------

def mla_softmax_scale(spec: dict) -> float:
    qk_head_dim = spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]
    scaling = qk_head_dim ** -0.5
    rope_scaling = (spec.get("rope") or {}).get("scaling")
    if rope_scaling is not None:
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            mscale = _get_mscale(float(rope_scaling["factor"]), mscale_all_dim)
            scaling = scaling * mscale * mscale
    return scaling


def mla_reference(state_dict: dict[str, torch.Tensor], spec: dict, hidden_states: torch.Tensor,
                  position_ids: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """`allowed` [B, 1, S, S] bool: the keys each query may see (default: causal, per the spec)."""
    assert spec["family"] == "mla", spec["family"]
    x = hidden_states
    p = _params(state_dict, x.dtype)
    batch, seqlen = x.shape[:2]
    H = spec["heads"]
    dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
    r = spec["kv_lora_rank"]
    eps = spec["norm_eps"]
    rope = spec["rope"]
    qk_head_dim = dn + dr

    if spec.get("q_lora_rank") is None:
        q_states = _linear(p, "q_proj", x)
    else:
        q_states = _linear(p, "q_b_proj", _rms_norm(_linear(p, "q_a_proj", x), p["q_a_layernorm.weight"], eps))
    q_states = q_states.view(batch, seqlen, -1, qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q_states, [dn, dr], dim=-1)

    compressed_kv = _linear(p, "kv_a_proj_with_mqa", x)
    k_pass, k_rot = torch.split(compressed_kv, [r, dr], dim=-1)
    k_pass = _linear(p, "kv_b_proj", _rms_norm(k_pass, p["kv_a_layernorm.weight"], eps))
    k_pass = k_pass.view(batch, seqlen, -1, dn + dv).transpose(1, 2)
    k_pass, value_states = torch.split(k_pass, [dn, dv], dim=-1)
    k_rot = k_rot.view(batch, 1, seqlen, dr)

    pos = _positions(x, position_ids)
    cos, sin = _cos_sin(rope, dr, pos, x.dtype, x.device)
    layout = rope.get("layout", "half")
    q_rot = _apply_rotary(q_rot, cos, sin, layout)
    k_rot = _apply_rotary(k_rot, cos, sin, layout)
    k_rot = k_rot.expand(*k_pass.shape[:-1], -1)

    query_states = torch.cat((q_pass, q_rot), dim=-1)
    key_states = torch.cat((k_pass, k_rot), dim=-1)
    if allowed is None and spec["causal"]:
        allowed = _causal_mask(seqlen, None, x.device)
    attn = _eager_attention(query_states, key_states, value_states, mla_softmax_scale(spec), allowed)
    assert attn.shape == (batch, H, seqlen, dv)
    return _linear(p, "o_proj", _merge(attn))


def dsa_reference(state_dict: dict[str, torch.Tensor], spec: dict, hidden_states: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' DeepseekV32Attention: MLA where each query sees only the top index_topk
    keys of its lightning indexer's scores (the indexer takes no gradient)."""
    x = hidden_states
    seqlen = x.shape[1]
    causal = _causal_mask(seqlen, None, x.device)
    with torch.no_grad():
        scores = _index_scores(_params(state_dict, x.dtype), spec, x, _positions(x, position_ids))
        scores = scores.masked_fill(~causal, float("-inf"))
        top = scores.topk(min(spec["sparse"]["top_k"], seqlen), dim=-1).indices
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True) & causal
    return mla_reference(state_dict, spec, x, position_ids, allowed=selected[:, None])


def _index_scores(p: dict[str, torch.Tensor], spec: dict, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The lightning indexer, [B, S, S] in fp32 (fp64 for fp64): sum over index heads h of
    w[s, h] * H_I**-0.5 * ReLU(q[s, h] . k[t] * d_I**-0.5), q from c_q and k = LayerNorm(wk(x)),
    RoPE on their first qk_rope_head_dim dims in the indexer's own layout."""
    sparse, dr = spec["sparse"], spec["qk_rope_head_dim"]
    heads, dim = sparse["index_heads"], sparse["index_head_dim"]
    q_resid = _rms_norm(_linear(p, "q_a_proj", x), p["q_a_layernorm.weight"], spec["norm_eps"])
    q = _heads(_linear(p, "indexer.wq_b", q_resid), heads)  # [B, H_I, S, d_I]
    k = F.layer_norm(_linear(p, "indexer.wk", x), (dim,), p["indexer.k_norm.weight"], p["indexer.k_norm.bias"],
                     1e-6)[:, None]  # [B, 1, S, d_I]
    cos, sin = _cos_sin(spec["rope"], dr, pos, x.dtype, x.device)
    layout = sparse["index_rope_layout"]
    q = torch.cat((_apply_rotary(q[..., :dr], cos, sin, layout), q[..., dr:]), dim=-1)
    k = torch.cat((_apply_rotary(k[..., :dr], cos, sin, layout), k[..., dr:]), dim=-1)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = torch.relu(q.to(wide) @ k.to(wide).transpose(-1, -2) * dim**-0.5)  # [B, H_I, S, S]
    weights = _linear(p, "indexer.weights_proj", x).to(wide) * heads**-0.5  # [B, S, H_I]
    return torch.einsum("bsh,bhst->bst", weights, logits)


# ---------------------------------------------------------------------------------------------
# mha / gqa / mqa: Llama (Mistral with a window), attention through torch SDPA
# ---------------------------------------------------------------------------------------------

def gqa_reference(state_dict: dict[str, torch.Tensor], spec: dict, hidden_states: torch.Tensor,
                  position_ids: torch.Tensor | None = None, *, repeat_kv: bool = False) -> torch.Tensor:
    """`repeat_kv`: give SDPA one K/V head per query head (repeat_interleave, as transformers'
    `repeat_kv`) instead of letting it share them (`enable_gqa=True`)."""
    assert spec["family"] in ("mha", "gqa", "mqa"), spec["family"]
    x = hidden_states
    p = _params(state_dict, x.dtype)
    seqlen = x.shape[1]
    H, Hk, D = spec["heads"], spec["kv_heads"], spec["head_dim"]
    q = _heads(_linear(p, "q_proj", x), H)
    k = _heads(_linear(p, "k_proj", x), Hk)
    v = _heads(_linear(p, "v_proj", x), Hk)
    if spec.get("rope") is not None:
        cos, sin = _cos_sin(spec["rope"], D, _positions(x, position_ids), x.dtype, x.device)
        q = _apply_rotary(q, cos, sin, spec["rope"].get("layout", "half"))
        k = _apply_rotary(k, cos, sin, spec["rope"].get("layout", "half"))
    if repeat_kv:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    window = spec.get("window")
    sdpa = dict(scale=D ** -0.5, enable_gqa=not repeat_kv)
    if spec["causal"] and window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
    elif spec["causal"]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(seqlen, window, x.device), **sdpa)
    else:
        assert window is None, "a window without causal masking is not a spec this reference knows"
        out = F.scaled_dot_product_attention(q, k, v, **sdpa)
    return _linear(p, "o_proj", _merge(out))


# ---------------------------------------------------------------------------------------------
# latent: learned latent tokens (DESIGN.md section 2), causal chunks, hybrid window path
# ---------------------------------------------------------------------------------------------

def _block(p: dict[str, torch.Tensor], prefix: str, queries: torch.Tensor, keys: torch.Tensor, heads: int,
           head_dim: int, allowed: torch.Tensor | None = None, rope: tuple | None = None) -> torch.Tensor:
    """One attention block with its own q/k/v projections: [B, Sq, d] x [B, Sk, d] -> [B, H, Sq, D]
    (before any output projection)."""
    q = _heads(_linear(p, f"{prefix}.q_proj", queries), heads)
    k = _heads(_linear(p, f"{prefix}.k_proj", keys), heads)
    v = _heads(_linear(p, f"{prefix}.v_proj", keys), heads)
    if rope is not None:
        cos, sin, layout = rope
        q = _apply_rotary(q, cos, sin, layout)
        k = _apply_rotary(k, cos, sin, layout)
    return _eager_attention(q, k, v, head_dim ** -0.5, allowed)


def _summarise(p: dict[str, torch.Tensor], spec: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Latents after reading `tokens` [B, n, d]: Lat + encode(Lat <- tokens) (+ self-attention)."""
    H, D = spec["heads"], spec["head_dim"]
    batch = tokens.shape[0]
    lat = p["latents"][None].expand(batch, -1, -1)
    lat = lat + _linear(p, "encode.o_proj", _merge(_block(p, "encode", lat, tokens, H, D)))
    if spec.get("self_attention"):
        lat = lat + _linear(p, "process.o_proj", _merge(_block(p, "process", lat, lat, H, D)))
    return lat


def latent_reference(state_dict: dict[str, torch.Tensor], spec: dict, hidden_states: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    assert spec["family"] == "latent", spec["family"]
    x = hidden_states
    p = _params(state_dict, x.dtype)
    batch, seqlen, _ = x.shape
    H, D = spec["heads"], spec["head_dim"]
    chunk = spec.get("chunk_size")

    if not spec["causal"]:
        assert chunk is None and spec.get("window") is None
        lat = _summarise(p, spec, x)  # one set of latents summarises the whole sequence
        return _linear(p, "o_proj", _merge(_block(p, "decode", x, lat, H, D)))

    # causal: per chunk, its own latent summary; tokens of chunk c read the summaries of 0..c-1.
    assert chunk, "a causal latent spec needs chunk_size"
    outputs = []
    summaries: list[torch.Tensor] = []
    for start in range(0, seqlen, chunk):
        tokens = x[:, start:start + chunk]
        if summaries:
            past = torch.cat(summaries, dim=1)  # [B, c*M, d]
            outputs.append(_block(p, "decode", tokens, past, H, D))
        else:  # no earlier chunk: no keys, zero output
            outputs.append(x.new_zeros(batch, H, tokens.shape[1], D))
        summaries.append(_summarise(p, spec, tokens))
    global_path = torch.cat(outputs, dim=2)  # [B, H, S, D]

    if spec.get("window") is None:
        return _linear(p, "o_proj", _merge(global_path))

    rope = None
    if spec.get("rope") is not None:
        cos, sin = _cos_sin(spec["rope"], D, _positions(x, position_ids), x.dtype, x.device)
        rope = (cos, sin, spec["rope"].get("layout", "half"))
    local = _block(p, "local", x, x, H, D, _causal_mask(seqlen, spec["window"], x.device), rope)
    gate = torch.sigmoid(p["global_gate"])[None, :, None, None]
    return _linear(p, "o_proj", _merge(local + gate * global_path))


REFERENCES = {"mla": mla_reference, "mha": gqa_reference, "gqa": gqa_reference, "mqa": gqa_reference,
              "latent": latent_reference}


def reference_for(spec: dict):
    if spec.get("sparse") is not None:
        return dsa_reference
    return REFERENCES[spec["family"]]
