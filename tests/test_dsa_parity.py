"""DeepSeek Sparse Attention against transformers: tiny DeepSeek-V3.2 and GLM-5 attention
layers (DeepseekV32Attention, GlmMoeDsaAttention) -> `mlagen from-hf` -> generated modules
loaded with the layers' own state dicts.

transformers is the oracle, run eagerly in fp32 with the mask its model builds for the
indexer. Sequences are shorter and longer than index_topk (8), so the selection really drops
keys; positions start past yarn's original_max_position. Prefill output and every gradient,
the selected set, and token-by-token decode over the paged cache (and over the FP8 cache,
against transformers with its cache rounded the same way) must agree. The kernels run under
the Triton interpreter (tests/conftest.py). transformers 5.0 has neither model: the module
skips there (importorskip).
"""

from __future__ import annotations

import json

import pytest
import torch

import mlagen
from mlagen.runtime import fp8
from mlagen.spec.from_hf import yaml_from_hf_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf
hf_v32 = pytest.importorskip(
    "transformers.models.deepseek_v32.modeling_deepseek_v32",
    reason="this transformers has no DeepSeek-V3.2 (added after 5.0)",
)
hf_glm = pytest.importorskip(
    "transformers.models.glm_moe_dsa.modeling_glm_moe_dsa",
    reason="this transformers has no GLM-MoE-DSA (GLM-5)",
)

BATCH = 2
TOP_K = 8
SEQS = {"shorter_than_top_k": 6, "longer_than_top_k": 24}
POSITION_OFFSETS = (0, 150)  # the second sequence well past original_max_position (64)
RTOL = 1e-5  # of the largest magnitude of the compared tensor
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

CASES = {
    "v32-yarn": dict(model="deepseek_v32", rope=YARN),
    "v32-bias-8_index_heads": dict(
        model="deepseek_v32",
        rope={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=True,
        index_n_heads=8,
    ),
    "glm5-yarn": dict(model="glm_moe_dsa", rope=YARN, v_head_dim=24),
}


def dsa_config(case: dict):
    cls = transformers.DeepseekV32Config if case["model"] == "deepseek_v32" else transformers.GlmMoeDsaConfig
    return cls(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=case.get("v_head_dim", 16),
        index_n_heads=case.get("index_n_heads", 4),
        index_head_dim=32,
        index_topk=TOP_K,
        max_position_embeddings=256,
        rope_parameters=case["rope"],
        attention_bias=case.get("attention_bias", False),
        num_hidden_layers=1,
        attn_implementation="eager",
        dtype="float32",
    )


def modeling(config):
    return (hf_v32, "DeepseekV32") if config.model_type == "deepseek_v32" else (hf_glm, "GlmMoeDsa")


def transformers_layer(config):
    module, prefix = modeling(config)
    layer = getattr(module, f"{prefix}Attention")(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter re-drawn, norms included, so none can be ignored
        for name, param in sorted(layer.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("layernorm.weight", "k_norm.weight")):
                param.copy_(1 + 0.3 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.3 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return layer, getattr(module, f"{prefix}RotaryEmbedding")(config)


def causal_mask(batch: int, new: int, total: int) -> torch.Tensor:
    """What transformers' eager mask builder gives a layer: [B, 1, new, total], the min float
    where a key is later than the query (the last query sees the last key)."""
    visible = torch.ones(new, total, dtype=torch.bool).tril(total - new)
    return torch.zeros(batch, 1, new, total).masked_fill(~visible, torch.finfo(torch.float32).min)


def inputs(seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, seqlen, 64, generator=gen)
    return hidden, torch.arange(seqlen)[None, :] + torch.tensor(POSITION_OFFSETS)[:, None]


def run_transformers(layer, rotary, hidden, positions, mask=None, cache=None):
    mask = causal_mask(hidden.shape[0], hidden.shape[1], hidden.shape[1]) if mask is None else mask
    out = layer(hidden, rotary(hidden, positions), mask, cache, position_ids=positions)
    return out[0]


def mlagen_layer(config, layer, tmp_path, name: str):
    text = yaml_from_hf_config(json.loads(config.to_json_string()), name, source=f"{name}/config.json")
    (tmp_path / f"{name}.yaml").write_text(text)
    package = mlagen.load(tmp_path / f"{name}.yaml", out_root=tmp_path / "generated")
    ours = package.Attention()
    ours.load_state_dict(layer.state_dict(), strict=True)
    return ours


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


_worst: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_worst():
    yield
    if _worst:
        print("\nmax |mlagen - transformers| / max |transformers| per case:")
        for name, error in sorted(_worst.items()):
            print(f"  {name:55s} {error:.2e}")


@pytest.mark.parametrize("seq", list(SEQS))
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_every_gradient_match_transformers(case, seq, tmp_path):
    config = dsa_config(CASES[case])
    layer, rotary = transformers_layer(config)
    ours = mlagen_layer(config, layer, tmp_path, case.replace("-", "_"))
    hidden, positions = inputs(SEQS[seq])
    grad_out = torch.randn(BATCH, SEQS[seq], 64, generator=torch.Generator().manual_seed(2))

    theirs_in = hidden.clone().requires_grad_()
    expected = run_transformers(layer, rotary, theirs_in, positions)
    expected.backward(grad_out)
    for path, forward in (("kernel", ours), ("reference", ours.reference_forward)):
        ours.zero_grad()
        ours_in = hidden.clone().requires_grad_()
        got = forward(ours_in, positions)
        got.backward(grad_out)
        errors = {
            "output": relative(got, expected),
            "d hidden_states": relative(ours_in.grad, theirs_in.grad),
        }
        theirs = dict(layer.named_parameters())
        for name, param in ours.named_parameters():
            if name.startswith("indexer."):  # the selection is not differentiable, in either
                assert param.grad is None and theirs[name].grad is None, name
                continue
            errors[f"d {name}"] = relative(param.grad, theirs[name].grad)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= RTOL, (
            f"{case} {seq} {path}: {worst} differs by {errors[worst]:.3g} (relative)"
        )
        _worst[f"{case} {seq} {path} (output and gradients)"] = errors[worst]


@pytest.mark.parametrize("case", list(CASES))
def test_selected_keys_are_transformers_top_k(case, tmp_path):
    """The indexer's choice, query by query (as sets: top-k lists no order; ties aside: the
    scores are random floats, and a tie would show as a test failure worth a look)."""
    config = dsa_config(CASES[case])
    layer, rotary = transformers_layer(config)
    ours = mlagen_layer(config, layer, tmp_path, case.replace("-", "_"))
    hidden, positions = inputs(SEQS["longer_than_top_k"])
    seqlen = hidden.shape[1]
    with torch.no_grad():
        q_resid = layer.q_a_layernorm(layer.q_a_proj(hidden))
        mask = causal_mask(BATCH, seqlen, seqlen)
        expected = layer.indexer(hidden, q_resid, rotary(hidden, positions), mask[:, 0], positions)
        _, got = ours(hidden, positions, return_selected=True)
        _, reference = ours.reference_forward(hidden, positions, return_selected=True)
    for query in range(seqlen):
        for row in range(BATCH):
            # transformers keeps min(top_k, seqlen) indices, masked ones too when fewer are visible
            theirs = {int(t) for t in expected[row, query] if t <= query}
            for path, selection in (("kernel", got), ("reference", reference)):
                ours_set = {int(t) for t in selection[row, query] if t >= 0}
                assert ours_set == theirs, (
                    f"{case} {path}: row {row} query {query}: {sorted(ours_set)} != {sorted(theirs)}"
                )
    assert (got[:, TOP_K:] >= 0).all(), "every query past the first top_k selects top_k keys"


def fp8_round_trip(cache_layer) -> None:
    """Make a transformers cache layer store what mlagen's FP8 cache stores: the latent in e4m3
    with a scale per 128 values, the rope key in bf16, the indexer keys in e4m3 with one scale."""
    update, update_indexer = cache_layer.update, cache_layer.update_indexer

    def rounded_update(latent, rope_key, *args, **kwargs):
        codes, scales = fp8.quantize(latent.reshape(-1, latent.shape[-1]), fp8.SCALE_GROUP)
        latent = fp8.dequantize(codes, scales, fp8.SCALE_GROUP).view_as(latent)
        return update(latent, rope_key.to(torch.bfloat16).float(), *args, **kwargs)

    def rounded_update_indexer(keys):
        codes, scales = fp8.quantize(keys.reshape(-1, keys.shape[-1]), keys.shape[-1])
        return update_indexer(fp8.dequantize(codes, scales, keys.shape[-1]).view_as(keys))

    cache_layer.update, cache_layer.update_indexer = rounded_update, rounded_update_indexer


@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
@pytest.mark.parametrize("case", ["v32-yarn", "glm5-yarn"])
def test_decode_matches_transformers_with_its_cache(case, cache_dtype, tmp_path):
    """Prefill 12 tokens through the cache, then decode one token at a time past top_k:
    transformers with its DynamicCache (latent, rope key and indexer keys) against mlagen's
    paged cache (pages of 4 tokens). With cache_dtype fp8, transformers' cache holds the same
    rounded values as mlagen's FP8 rows."""
    config = dsa_config(CASES[case])
    layer, rotary = transformers_layer(config)
    ours = mlagen_layer(config, layer, tmp_path, case.replace("-", "_"))
    hidden, positions = inputs(SEQS["longer_than_top_k"])
    hf_cache = transformers.DynamicCache(config=config)
    if cache_dtype == "fp8":
        fp8_round_trip(hf_cache.layers[0])
    cache = ours.new_cache(BATCH, hidden.shape[1], page_size=4, cache_dtype=cache_dtype)
    prompt = 12
    worst = 0.0
    with torch.no_grad():
        for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, hidden.shape[1])]:
            x, pos = hidden[:, start:stop], positions[:, start:stop]
            expected = run_transformers(
                layer, rotary, x, pos, causal_mask(BATCH, stop - start, stop), hf_cache
            )
            got = ours(x, pos, cache=cache)
            error = relative(got, expected)
            assert error <= RTOL, f"{case} {cache_dtype} tokens {start}:{stop}: {error:.3g}"
            worst = max(worst, error)
    assert cache.host_lengths() == [hidden.shape[1]] * BATCH
    _worst[f"{case} decode, {cache_dtype} cache"] = worst
