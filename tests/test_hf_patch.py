"""mlagen.patch on whole transformers models: tiny random DeepSeek-V3/V2, Llama and
Mistral causal LMs, fp32 on CPU with the kernels under the Triton interpreter.

The unpatched model is the oracle: greedy generate() must give the same tokens (and
logits to fp32 noise) for batch 1 and a left-padded batch of 3, with the patched MLA
layers decoding from the compressed paged cache, not transformers' cache.
"""

from __future__ import annotations

import pytest
import torch

import mlagen

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf  # also run against the oldest transformers pyproject allows (make test)
from mlagen.hf import MlagenCache  # noqa: E402
from mlagen.runtime.paged_cache import PagedLatentCache  # noqa: E402

VOCAB = 97
LOGIT_RTOL = 1e-4  # of the largest logit: fp32 sums in another order


@pytest.fixture(autouse=True)
def _generated_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mlagen-cache"))


def tiny_model(kind: str, layers: int = 2, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    mla = dict(
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe_intermediate_size=32,
        first_k_dense_replace=layers,
    )
    if kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(**common, **mla, rope_interleave=True, **overrides)
        model = transformers.DeepseekV3ForCausalLM(config)
    elif kind == "deepseek_v2":
        config = transformers.DeepseekV2Config(**common, **mla, **overrides)
        model = transformers.DeepseekV2ForCausalLM(config)
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2, **overrides))
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=5, **overrides)
        model = transformers.MistralForCausalLM(config)
    else:
        raise AssertionError(kind)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that make attention matter: unit-scale projections, uneven norms
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise / param.shape[-1] ** 0.5)
    return model.eval()


def prompts(batch: int, seqlen: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has 2b padding tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def cache_kwargs(model, cache) -> dict:
    """The cache under the name this transformers version's forward takes (`cache` from 5.24)."""
    from mlagen.hf.compat import cache_argument

    return {cache_argument(model): cache}


def output_cache(output):
    """The cache a model output or generate() returns (`.cache` from transformers 5.24)."""
    return output.cache if "cache" in output else output.past_key_values


def greedy(model, ids, mask, steps: int = 6):
    return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "mistral"])
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
    if kind.startswith("deepseek"):
        for layer in cache.layers:  # only the real tokens, as latent + rope key rows, in pages
            storage = layer.storage()
            assert isinstance(storage, PagedLatentCache)
            assert storage.width == 32 + 8
            assert storage.host_lengths() == [n + 5 for n in real]  # the last token is not cached yet
    else:
        assert all(layer.lengths == [n + 5 for n in real] for layer in cache.layers)


def test_patch_shares_parameters_and_unpatch_restores(capsys):
    model = tiny_model("deepseek_v3")
    before = {name: (param, param.data_ptr()) for name, param in model.named_parameters()}
    keys = list(model.state_dict())
    originals = [layer.self_attn for layer in model.model.layers]
    report = mlagen.patch(model)
    line = capsys.readouterr().out.strip()
    assert line == str(report) and "\n" not in line
    assert "2 DeepseekV3Attention layers" in line
    after = dict(model.named_parameters())
    assert list(model.state_dict()) == keys
    assert all(after[name] is param and param.data_ptr() == ptr for name, (param, ptr) in before.items())
    assert type(model.model.layers[0].self_attn).__name__ == "MlagenDeepseekV3Attention"
    assert model.config._attn_implementation == "mlagen"
    assert mlagen.unpatch(model) == 2
    assert [layer.self_attn for layer in model.model.layers] == originals
    assert model.config._attn_implementation != "mlagen"
    assert "_prepare_cache_for_generation" not in vars(model)
    with pytest.raises(ValueError, match="not patched"):
        mlagen.unpatch(model)


def test_cache_bytes_reported_against_transformers():
    model = tiny_model("deepseek_v3", layers=3)
    report = mlagen.patch(model, verbose=False)
    # latent 32 + rope key 8 per token and layer, fp32
    assert report.cache_bytes_per_token == 3 * (32 + 8) * 4
    cache = transformers.DynamicCache(config=model.config)
    mlagen.unpatch(model)
    with torch.no_grad():
        model(torch.ones(1, 5, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert report.transformers_cache_bytes_per_token == stored // 5


def test_forward_with_cache_matches_transformers_step_by_step():
    """The model's forward with an explicit MlagenCache: a padded prefill, then chunks of 1 and 2 tokens."""
    model = tiny_model("deepseek_v3")
    ids, mask = prompts(3)
    extra = torch.randint(1, VOCAB, (3, 3), generator=torch.Generator().manual_seed(2))
    chunks = [(ids, mask), (extra[:, :1], None), (extra[:, 1:], None)]

    def run(cache):
        logits, full_mask = [], torch.zeros(3, 0, dtype=torch.long)
        for chunk, chunk_mask in chunks:
            chunk_mask = torch.ones_like(chunk) if chunk_mask is None else chunk_mask
            full_mask = torch.cat([full_mask, chunk_mask], dim=1)
            positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, -chunk.shape[1] :]
            with torch.no_grad():
                out = model(chunk, attention_mask=full_mask, position_ids=positions, **cache_kwargs(model, cache),
                            use_cache=True)
            logits.append(out.logits * full_mask[:, -chunk.shape[1] :, None])
        return logits

    expected = run(transformers.DynamicCache(config=model.config))
    mlagen.patch(model, verbose=False)
    got = run(MlagenCache(model, batch_size=3, max_tokens=16, page_size=4))
    scale = max(t.abs().max().item() for t in expected)
    for a, b in zip(got, expected):
        assert (a - b).abs().max().item() <= LOGIT_RTOL * scale


def test_training_gradients_match_unpatched():
    model = tiny_model("deepseek_v3")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    model.train()
    expected = gradients()
    mlagen.patch(model, verbose=False)
    got = gradients()
    assert got.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (got[name] - expected[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_reusing_a_transformers_cache_fails_clearly():
    model = tiny_model("llama")
    mlagen.patch(model, verbose=False)
    ids = torch.randint(1, VOCAB, (1, 4))
    with torch.no_grad():
        out = model(ids)  # transformers makes a DynamicCache; the patched layers leave it alone
        with pytest.raises(ValueError, match="was not filled by the mlagen-patched layers"):
            model(ids[:, :1], **cache_kwargs(model, output_cache(out)))


def test_refusals_are_one_line():
    model = tiny_model("llama")
    mlagen.patch(model, verbose=False)
    with pytest.raises(ValueError, match="already patched"):
        mlagen.patch(model)
    with pytest.raises(ValueError, match="num_beams=1"):
        ids, mask = prompts(1)
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, do_sample=False)
    qwen = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(ValueError, match="cannot patch this model.*qwen2") as info:
        mlagen.patch(qwen)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="takes a transformers model"):
        mlagen.patch(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="no `self_attn`"):
        mlagen.patch(gpt2)


def test_decode_benchmark_harness(tmp_path):
    """`python -m mlagen.bench.hf_decode --smoke`: every contender runs and is recorded."""
    import json

    from mlagen.bench import hf_decode

    out = tmp_path / "hf_decode.json"
    hf_decode.main(["--smoke", "--layers", "2", "--batch", "1", "3", "--context", "8", "--steps", "2",
                    "--warmup", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["contender"], r["batch"]) for r in results] == [
        (contender, batch) for contender in hf_decode.CONTENDERS for batch in (1, 3)
    ]
    assert all(r["tokens_per_s"] > 0 for r in results)
    ours = {r["cache_bytes_per_token"] for r in results if r["contender"] == "mlagen"}
    theirs = {r["cache_bytes_per_token"] for r in results if r["contender"] != "mlagen"}
    assert ours == {2 * (32 + 8) * 4}
    # transformers 5.0 caches MLA's expanded K/V (2 x 4 heads x 24 + 16 values), later releases the latent
    assert theirs in ({2 * (32 + 8) * 4}, {2 * 4 * (24 + 16) * 4})
    # The report shows non-smoke runs as a table (a smoke run relabelled here to stand for a GPU run).
    import shutil

    from mlagen.bench.report import load_runs, render_report
    from tests.conftest import ROOT

    data = json.loads(out.read_text())
    data["meta"]["smoke"] = False
    (tmp_path / "hf_decode_gpu.json").write_text(json.dumps(data))
    shutil.copy(ROOT / "benchmarks" / "deepseek_v3_decode_cpu_smoke.json", tmp_path)
    text = render_report(load_runs(tmp_path), tmp_path)
    assert "| transformers-sdpa | 2 | 3 | 8 |" in text and "| mlagen | 2 | 1 | 8 |" in text


def test_readme_example_generates_the_same_tokens():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("hf_generate", ROOT / "examples" / "hf_generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before, after = example.main([])
    assert torch.equal(before, after)


def test_masks_the_kernels_do_not_compute_are_refused():
    """Packed sequences (position_ids restarting in a row) and 4-D masks would be silently
    turned into plain causal attention; they are refused instead."""
    model = tiny_model("llama")
    mlagen.patch(model, verbose=False)
    ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad(), pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), use_cache=False)
    block = torch.zeros(1, 1, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=block, use_cache=False)


def test_cache_refuses_gradients():
    model = tiny_model("deepseek_v3")
    mlagen.patch(model, verbose=False)
    with pytest.raises(ValueError, match="for inference"):
        model(torch.ones(1, 3, dtype=torch.long), **cache_kwargs(model, MlagenCache(model, 1, 8)), use_cache=True)


def test_other_models_sharing_the_config_are_untouched():
    config = tiny_model("llama").config
    patched, other = (transformers.LlamaForCausalLM(config).eval() for _ in range(2))
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        expected = other(ids).logits
        mlagen.patch(patched, verbose=False)
        assert torch.equal(other(ids).logits, expected)
        assert config._attn_implementation != "mlagen"
    mlagen.unpatch(patched)
    assert patched.config is config


def test_attention_dropout_is_refused():
    model = tiny_model("llama", attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        mlagen.patch(model)


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "mistral"])
def test_every_layer_receives_the_mlagen_cache_at_every_step(kind, monkeypatch):
    """transformers 5.24 renamed the cache argument of the attention layers; a layer that
    missed it would attend over the new token alone. Spy on what each layer gets."""
    from mlagen.hf.attention import TransformersAttention

    model = tiny_model(kind)
    mlagen.patch(model, verbose=False)
    received = []
    original = TransformersAttention._cache_layer

    def spy(self, cache):
        received.append((self.layer_idx, cache))
        return original(self, cache)

    monkeypatch.setattr(TransformersAttention, "_cache_layer", spy)
    ids, mask = prompts(1)
    out = greedy(model, ids, mask, steps=3)
    cache = output_cache(out)
    assert isinstance(cache, MlagenCache)
    assert [index for index, _ in received] == [0, 1] * 3  # prefill + 2 decode steps (the 3rd token is not fed back)
    assert all(got is cache for _, got in received)


def test_layer_takes_the_cache_under_either_name():
    model = tiny_model("deepseek_v3", layers=1)
    mlagen.patch(model, verbose=False)
    layer = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    outputs = []
    for name in ("cache", "past_key_values"):
        cache = MlagenCache(model, batch_size=2, max_tokens=8)
        with torch.no_grad():
            layer(x, attention_mask=None, position_ids=torch.arange(5)[None], **{name: cache})
            outputs.append(layer(x[:, :1], attention_mask=None, position_ids=torch.tensor([[5]]), **{name: cache})[0])
        assert cache.layers[0].storage().host_lengths() == [6, 6]
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad(), pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        layer(x, attention_mask=None, cache=MlagenCache(model, 2, 8), past_key_values=MlagenCache(model, 2, 8))


@pytest.mark.parametrize(
    "argument, match",
    [
        ({"shiny_new_argument": 1}, "does not understand the argument.*shiny_new_argument"),
        ({"output_attentions": True}, "output_attentions"),
        ({"is_causal": False}, "is_causal=False"),
        ({"cu_seq_lens_q": torch.tensor([0, 3, 5])}, "packed sequences.*cu_seq_lens_q"),
    ],
    ids=["unknown", "attention-weights", "bidirectional", "packed"],
)
def test_layer_refuses_arguments_it_cannot_honour(argument, match):
    model = tiny_model("llama", layers=1)
    mlagen.patch(model, verbose=False)
    layer = model.model.layers[0].self_attn
    with torch.no_grad(), pytest.raises(ValueError, match=match) as info:
        layer(torch.randn(1, 5, 64), attention_mask=None, position_ids=torch.arange(5)[None], **argument)
    assert "\n" not in str(info.value)


def test_layer_accepts_what_transformers_passes_through():
    """Flags every decoder layer forwards (some versions only) change nothing in attention."""
    model = tiny_model("llama", layers=1)
    mlagen.patch(model, verbose=False)
    layer = model.model.layers[0].self_attn
    x, positions = torch.randn(1, 5, 64), torch.arange(5)[None]
    with torch.no_grad():
        plain = layer(x, attention_mask=None, position_ids=positions)[0]
        flagged = layer(x, attention_mask=None, position_ids=positions, use_cache=False, output_attentions=False,
                        cache_position=torch.arange(5), is_causal=True, output_hidden_states=False)[0]
    assert torch.equal(plain, flagged)


def test_pyproject_range_is_what_make_test_runs():
    """`make test` runs the hf tests (and the kernels' interpreter tests) against pyproject's
    lower bounds for transformers and Triton."""
    import re
    import subprocess

    from tests.conftest import ROOT

    text = (ROOT / "pyproject.toml").read_text()
    bounds = set(re.findall(r'"transformers>=([0-9.]+)"', text))
    assert len(bounds) == 1, f"the hf and test extras disagree: {bounds}"
    (triton,) = re.findall(r'"triton>=([0-9.]+)"', text)
    plan = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True)
    assert f"'transformers=={bounds.pop()}' 'triton=={triton}'" in plan.stdout, plan.stdout
    assert "-m pytest -q -m hf" in plan.stdout and "tests/test_training.py" in plan.stdout, plan.stdout
