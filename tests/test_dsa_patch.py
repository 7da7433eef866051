"""mlagen.patch on tiny random DeepSeek-V3.2 and GLM-5 causal LMs (fp32, CPU, kernels under
the Triton interpreter): greedy generate() must give the unpatched model's tokens (and its
logits to fp32 noise) for batch 1 and a left-padded batch of 3, with prompts longer than
index_topk, prefill and decode running the sparse kernels over mlagen's paged cache (latent +
rope key + indexer key). GLM-5's second layer reuses the first layer's selection
(indexer_types ["full", "shared"]). transformers 5.0 has neither model: skipped there.
"""

from __future__ import annotations

import pytest
import torch

import mlagen

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf
pytest.importorskip(
    "transformers.models.deepseek_v32", reason="this transformers has no DeepSeek-V3.2 (after 5.0)"
)
pytest.importorskip(
    "transformers.models.glm_moe_dsa", reason="this transformers has no GLM-MoE-DSA (after 5.0)"
)
from mlagen.hf import MlagenCache  # noqa: E402
from mlagen.runtime.sparse_cache import PagedSparseCache  # noqa: E402

VOCAB = 97
TOP_K = 4  # prompts of 7 tokens and 6 new ones: every later query drops keys
LOGIT_RTOL = 1e-4  # of the largest logit: fp32 sums in another order


@pytest.fixture(autouse=True)
def _generated_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mlagen-cache"))


def tiny_model(kind: str, layers: int = 2):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe_intermediate_size=32,
        first_k_dense_replace=layers,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=TOP_K,
    )
    if kind == "deepseek_v32":
        model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**common))
    else:
        config = transformers.GlmMoeDsaConfig(**common, indexer_types=["full", "shared"][:layers])
        model = transformers.GlmMoeDsaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that make attention matter: unit-scale projections, uneven norms
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise / param.shape[-1] ** 0.5)
    return model.eval()


def prompts(batch: int, seqlen: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has 2b padding tokens."""
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, mask, **options):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **options,
    )


def output_cache(output):
    return output.cache if "cache" in output else output.past_key_values


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["deepseek_v32", "glm_moe_dsa"])
def test_generate_matches_unpatched(kind, batch):
    model = tiny_model(kind)
    ids, mask = prompts(batch)
    expected = greedy(model, ids, mask)
    mlagen.patch(model, verbose=False)
    got = greedy(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    scale = max(logits.abs().max().item() for logits in expected.logits)
    error = max((a - b).abs().max().item() for a, b in zip(got.logits, expected.logits))
    assert error <= LOGIT_RTOL * scale, f"logits differ by {error:.3g} (scale {scale:.3g})"
    cache = output_cache(got)
    assert isinstance(cache, MlagenCache)
    real = mask.sum(1).tolist()
    for index, layer in enumerate(cache.layers):
        storage = layer.storage()
        assert isinstance(storage, PagedSparseCache)
        assert storage.host_lengths() == [
            n + 5 for n in real
        ]  # only real tokens; the last one not cached yet
        shares = kind == "glm_moe_dsa" and index == 1
        assert (storage.index_buffer is None) == shares, (
            "a layer that reuses a selection keeps no indexer keys"
        )


def test_patch_reports_cache_bytes_with_the_indexer_and_layers_without_one(capsys):
    model = tiny_model("glm_moe_dsa")
    report = mlagen.patch(model)
    assert "2 GlmMoeDsaAttention layers" in capsys.readouterr().out
    # fp32: layer 0 latent 32 + rope 8 + indexer key 32, layer 1 (shared) latent + rope only
    assert report.cache_bytes_per_token == (32 + 8 + 32) * 4 + (32 + 8) * 4
    assert report.transformers_cache_bytes_per_token == report.cache_bytes_per_token
    assert model.model.layers[1].self_attn.indexer is None
    assert [name for name, _ in model.named_parameters()] == [
        name for name, _ in tiny_model("glm_moe_dsa").named_parameters()
    ]
    fp8 = MlagenCache(model, batch_size=1, max_tokens=8, cache_dtype="fp8")
    assert fp8.bytes_per_token() == (32 + 4 + 2 * 8) + (32 + 4) + (32 + 4 + 2 * 8)


def test_generate_over_an_fp8_cache():
    """The FP8 cache through generate(): rows are quantised on the way in and read by the
    decode kernels; the first new token follows the prompt's prefill, which reads the FP8
    rows too (DeepSeek's reference does the same), so only the shape and finiteness of the
    path are fixed here; README's table measures the accuracy (examples/fp8_cache_accuracy.py)."""
    model = tiny_model("deepseek_v32")
    ids, mask = prompts(3)
    mlagen.patch(model, verbose=False)
    cache = MlagenCache(model, batch_size=3, max_tokens=13, cache_dtype="fp8")
    from mlagen.hf.compat import cache_argument

    got = greedy(model, ids, mask, **{cache_argument(model): cache})
    assert got.sequences.shape == (3, 13)
    assert all(torch.isfinite(logits).all() for logits in got.logits)
    assert all(layer.storage().fp8 and layer.storage().buffer.dtype == torch.uint8 for layer in cache.layers)


def test_dense_models_refuse_a_cache_dtype():
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            dtype="float32",
        )
    )
    mlagen.patch(model, verbose=False)
    with pytest.raises(ValueError, match="cache_dtype applies to sparse MLA layers"):
        MlagenCache(model, batch_size=1, max_tokens=8, cache_dtype="fp8")
