"""What an FP8 cache costs in accuracy, against an fp64 golden (the README's table).

1. Random data at DeepSeek-V3.2's widths (latent 512 + rope 64, a 64-head indexer of 128,
   16 query heads, top 256 of 1024 cached keys): the cached rows rounded as a bf16 cache and
   as the FP8 cache stores them (FlashMLA's layout: e4m3 latent with a scale per 128 values,
   bf16 rope key; e4m3 indexer keys with one scale), everything else in fp64. Reported: the
   attention output's error with the golden selection (what rounding the rows costs), the
   share of selected keys that changed, and the output's error with the selection the
   rounded indexer keys give.
2. A tiny random DeepSeek-V3.2 causal LM (transformers, 2 layers, top 8 keys), patched by
   mlagen, fed a prompt and then one token at a time (teacher forcing) through an
   MlagenCache in the model's dtype or FP8; its logits against the unpatched model in fp64.

    python examples/fp8_cache_accuracy.py          # CPU: kernels under the Triton interpreter (fp32),
                                                   # the reference path for bf16 (a one-time warning)
"""

from __future__ import annotations

import os
import warnings

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before mlagen imports any kernel

from mlagen.runtime import fp8  # noqa: E402
from mlagen.runtime.sparse import reference_index_scores, reference_sparse_attention, top_k  # noqa: E402

ROUNDINGS = ("bf16", "fp8")


def rounded_rows(latent, rope, keys, rounding: str):
    """The rows as a cache of this kind hands them back (fp64)."""
    if rounding == "bf16":
        return tuple(t.to(torch.bfloat16).double() for t in (latent, rope, keys))
    codes, scales = fp8.quantize(latent, fp8.SCALE_GROUP)
    key_codes, key_scales = fp8.quantize(keys, keys.shape[-1])
    return (
        fp8.dequantize(codes, scales, fp8.SCALE_GROUP).double(),
        rope.to(torch.bfloat16).double(),
        fp8.dequantize(key_codes, key_scales, keys.shape[-1]).double(),
    )


def random_data_errors(cached: int = 1024, queries: int = 8, heads: int = 16, keep: int = 256, seed: int = 0):
    """{rounding: (output error with the golden selection, share of selected keys changed,
    output error)}; errors are relative RMS: ||out - golden|| / ||golden||."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    latent, rope, keys = draw(cached, 512), draw(cached, 64), draw(cached, 128)
    q_latent, q_rope = draw(1, queries, heads, 512), draw(1, queries, heads, 64)
    q_index, weights = draw(1, queries, 64, 128), draw(1, queries, 64)
    scale, index_scale, weight_scale = 192**-0.5, 128**-0.5, 64**-0.5

    def attend(latent, rope, keys, selection=None):
        if selection is None:
            scores = reference_index_scores(
                q_index, keys[None, :, None], weights, scale=index_scale, weight_scale=weight_scale
            )
            selection = top_k(scores, keep)
        out = reference_sparse_attention(
            q_latent,
            q_rope,
            latent[None, :, None],
            rope[None, :, None],
            latent[None, :, None],
            index=selection,
            scale=scale,
        )
        return out, selection

    golden, golden_selection = attend(latent, rope, keys)
    results = {}
    for rounding in ROUNDINGS:
        rows = rounded_rows(latent, rope, keys, rounding)
        fixed, _ = attend(*rows, golden_selection)
        chosen, selection = attend(*rows)
        changed = (
            1
            - torch.tensor(
                [
                    len(set(a.tolist()) & set(b.tolist())) / keep
                    for a, b in zip(selection[0], golden_selection[0])
                ]
            )
            .mean()
            .item()
        )
        results[rounding] = (relative_rms(fixed, golden), changed, relative_rms(chosen, golden))
    return results


def relative_rms(got: torch.Tensor, golden: torch.Tensor) -> float:
    return ((got.double() - golden).norm() / golden.norm()).item()


def tiny_deepseek_v32(dtype: torch.dtype, layers: int = 2):
    import transformers

    config = transformers.DeepseekV32Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        first_k_dense_replace=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=128,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=8,
        max_position_embeddings=256,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.DeepseekV32ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # unit-scale random weights, so that attention decides the tokens
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise / param.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def model_logits_errors(prompt: int = 12, steps: int = 12):
    """{(model dtype, cache dtype): (relative RMS logit error, share of next tokens that differ)}
    of the patched model against the fp64 golden, every step fed the golden sequence's token."""
    import mlagen
    from mlagen.hf import MlagenCache
    from mlagen.hf.compat import cache_argument

    tokens = torch.randint(1, 97, (2, prompt + steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        golden = tiny_deepseek_v32(torch.float64)(tokens).logits
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_deepseek_v32(dtype)
        mlagen.patch(model, verbose=False)
        for cache_dtype in ("model", "fp8"):
            cache = MlagenCache(model, 2, prompt + steps, cache_dtype=cache_dtype)
            chunks = [tokens[:, :prompt]] + [tokens[:, t : t + 1] for t in range(prompt, prompt + steps)]
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bf16 on CPU takes the reference path, and says so
                logits = torch.cat(
                    [model(chunk, **{cache_argument(model): cache}).logits for chunk in chunks], 1
                )
            error = relative_rms(logits, golden)
            flipped = (logits.argmax(-1) != golden.argmax(-1)).double().mean().item()
            results[(str(dtype).removeprefix("torch."), cache_dtype)] = (error, flipped)
    return results


def main() -> None:
    print("random rows at DeepSeek-V3.2 widths (1024 cached, top 256, 16 heads), relative RMS error vs fp64:")
    print(f"  {'cache':6s} {'output, golden selection':>26s} {'selected keys changed':>23s} {'output':>10s}")
    for rounding, (fixed, changed, chosen) in random_data_errors().items():
        print(f"  {rounding:6s} {fixed:26.2e} {changed:23.1%} {chosen:10.2e}")
    print("tiny random DeepSeek-V3.2 LM (2 layers, top 8), logits vs fp64 over 12 + 12 tokens:")
    for (dtype, cache_dtype), (error, flipped) in model_logits_errors().items():
        print(
            f"  model {dtype:8s} cache {cache_dtype:5s}  logits relative RMS error {error:.2e}, "
            f"next-token argmax differs at {flipped:.0%} of positions"
        )


if __name__ == "__main__":
    main()
