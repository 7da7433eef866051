"""The `compressed` family (DeepSeek-V4: sliding, CSA and HCA layers) without transformers:
the spec and its errors, the IR and its passes, the kernels against the plain-torch
reference (forward at sequence lengths around every window and rate boundary, gradients,
fp64 gradcheck), causality, the decode cache, and the cache arithmetic of `mlagen check`.

Kernels run under the Triton interpreter (tests/conftest.py). The layer-level oracle is
transformers' DeepseekV4Attention (tests/test_compressed_hf.py); here the generated
module's kernel path is checked against its own reference path, which that file ties to
transformers.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from mlagen import cli
from mlagen.errors import SpecError
from mlagen.ir import OpKind, lower
from mlagen.ir.model_cache import ModelCache
from mlagen.ir.ops import attention_extras
from mlagen.passes import run_pipeline
from mlagen.runtime.compressed import (
    PairRotary,
    attention_reference,
    entry_positions,
    index_scores_reference,
    top_k_reference,
)
from mlagen.runtime.compressed_cache import CachedAttention
from mlagen.runtime.compressed_kernels import AttentionConfig, _Attention, _Compress
from mlagen.spec import CompressedSpec, load_spec, parse_spec
from mlagen.spec.from_hf_v4 import layer_specs
from tests.helpers import ROOT, SPECS, assert_close_to_golden, generated, max_error

LAYERS = ("sliding", "csa", "hca")  # windows of 8 raw tokens; CSA entries of 4 tokens, HCA of 8
# Empty, one token, inside the first window, on and past rate and window boundaries, many windows.
LENGTHS = (0, 1, 3, 4, 8, 9, 17, 40)
CONFIGS = ROOT / "tests" / "hf_configs"


def spec_text(layer: str) -> str:
    return (SPECS / f"tiny_compressed_{layer}.yaml").read_text(encoding="utf-8")


@functools.cache
def make_module(layer: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny layer with every parameter drawn at random (sinks, position biases and norm
    weights included, so a dropped or misplaced one shows)."""
    torch.manual_seed(1234)
    module = generated(f"tiny_compressed_{layer}").Attention()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name == "sinks" or name.endswith("position_bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return module.to(dtype) if dtype != torch.float32 else module


def inputs(batch: int, seqlen: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seqlen, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- spec ---------------------------------------------------------------------------------------


def test_tiny_specs_are_the_three_layer_types():
    kinds = {layer: load_spec(SPECS / f"tiny_compressed_{layer}.yaml").layer_type for layer in LAYERS}
    assert kinds == {
        "sliding": "sliding_attention",
        "csa": "compressed_sparse_attention",
        "hca": "heavily_compressed_attention",
    }


SPEC_ERRORS = {
    "half-layout": (("layout: interleave", "layout: half"), "rope.layout", "write layout: interleave"),
    "mscale": (("beta_slow: 1}", "beta_slow: 1, mscale: 0.5}"), "rope.scaling.mscale", "never scales cos/sin"),
    "groups": (("o_groups: 2", "o_groups: 3"), "o_groups", "must divide heads=4"),
    "rope-too-wide": (("rope_head_dim: 32", "rope_head_dim: 96"), "rope_head_dim", "at most head_dim=64"),
    "not-causal": (("norm_eps: 1e-6", "norm_eps: 1e-6\ncausal: false"), "causal", "set causal: true"),
    "indexer-narrow": (("head_dim: 32, top_k", "head_dim: 16, top_k"), "compression.indexer.head_dim",
                       "at least rope_head_dim=32"),
    "head-dim": (("head_dim: 64\nrope", "head_dim: 48\nrope"), "head_dim", "multiple of 32"),
    "unknown-field": (("overlap: true", "overlapping: true"), "compression.overlapping", "did you mean 'overlap'"),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS))
def test_spec_errors_name_the_line_and_field(case):
    (old, new), field, fragment = SPEC_ERRORS[case]
    text = spec_text("csa")
    assert old in text
    with pytest.raises(SpecError) as info:
        parse_spec(text.replace(old, new), "tiny_compressed_csa.yaml")
    message = str(info.value)
    assert f": {field}: " in message and fragment in message, message
    assert info.value.line is not None and "\n" not in message


# --- IR and passes ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_passes_give_one_attention_over_raw_keys_entries_selection_and_sinks(layer):
    spec = load_spec(SPECS / f"tiny_compressed_{layer}.yaml")
    graph = run_pipeline(lower(spec), "prefill", verify_each=True)
    (attention,) = graph.of_kind(OpKind.ATTENTION)
    extras = attention_extras(attention)
    assert attention.inputs[:3] == ("query", "key", "key")  # one K = V head
    expected = {"sinks": "sinks", "output_rope": "position_ids"}
    if layer != "sliding":
        expected["entries"] = "entries"
    if layer == "csa":
        expected["indexed"] = "selected"
    assert extras == expected
    assert attention.attr("window") == 8 and attention.attr("causal") is True
    assert attention.attr("entry_rate") == {"sliding": None, "csa": 4, "hca": 8}[layer]
    # the literal form's concatenated keys, dense mask and separate inverse rope are gone
    assert not graph.of_kind(OpKind.KEY_MASK) and not graph.of_kind(OpKind.CONCAT)
    assert [n.name for n in graph.of_kind(OpKind.ROPE) if n.attr("inverse")] == []
    assert attention.attr("kernel") == "compressed_attention_d64_rope32"


def test_parameter_count_matches_the_module_and_transformers_names():
    for layer in LAYERS:
        module = generated(f"tiny_compressed_{layer}").Attention()
        from mlagen.ir.analysis import parameter_count

        assert parameter_count(lower(load_spec(SPECS / f"tiny_compressed_{layer}.yaml"))) == sum(
            p.numel() for p in module.parameters()
        )
    names = set(dict(generated("tiny_compressed_csa").Attention().named_parameters()))
    assert names == {
        "q_a_proj.weight", "q_a_norm.weight", "q_b_proj.weight", "kv_proj.weight", "kv_norm.weight",
        "o_a_proj.weight", "o_b_proj.weight", "sinks", "compressor.kv_proj.weight", "compressor.gate_proj.weight",
        "compressor.position_bias", "compressor.kv_norm.weight", "compressor.indexer.kv_proj.weight",
        "compressor.indexer.gate_proj.weight", "compressor.indexer.position_bias",
        "compressor.indexer.kv_norm.weight", "compressor.indexer.q_b_proj.weight",
        "compressor.indexer.scorer.weights_proj.weight",
    }


# --- kernels against the reference --------------------------------------------------------------


@pytest.mark.parametrize("seqlen", LENGTHS)
@pytest.mark.parametrize("layer", LAYERS)
def test_kernels_match_the_reference_path(layer, seqlen):
    module = make_module(layer)
    hidden_states = inputs(2, seqlen)
    with torch.no_grad():
        out = module(hidden_states)
        reference = module.reference_forward(hidden_states)
    assert out.shape == hidden_states.shape
    if seqlen:
        error = max_error(out, reference) / reference.abs().max().item()
        assert error < 1e-5, f"{layer} S={seqlen}: kernels differ from the reference by {error:.2e} (relative)"


@pytest.mark.parametrize("layer", LAYERS)
def test_fp16_kernels_are_as_close_to_the_fp64_golden_as_eager_fp16(layer):
    hidden_states = inputs(1, 37)
    half = make_module(layer, torch.float16)
    with torch.no_grad():
        actual = half(hidden_states.half())
        eager = half.reference_forward(hidden_states.half())
        golden = copy.deepcopy(half).double().reference_forward(hidden_states.half().double())
    assert_close_to_golden(actual, eager, golden, atol=1e-3, what=f"{layer} fp16")


def _gradients(module, hidden_states, forward):
    module.zero_grad(set_to_none=True)
    x = hidden_states.clone().requires_grad_(True)
    out = forward(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return grads, x.grad


@pytest.mark.parametrize("layer", LAYERS)
def test_kernel_gradients_match_the_reference(layer):
    module = make_module(layer)
    hidden_states = inputs(2, 21)
    kernel, kernel_x = _gradients(module, hidden_states, module)
    reference, reference_x = _gradients(module, hidden_states, module.reference_forward)
    torch.testing.assert_close(kernel_x, reference_x, atol=1e-5, rtol=1e-4)
    for name, grad in reference.items():
        if name.startswith("compressor.indexer."):  # the selection is not differentiable
            assert kernel[name] is None and grad is None, name
            continue
        assert grad is not None and grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(kernel[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


GRADCHECK = dict(eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


# Programs keep the output's columns in one accumulator (sm_90), as two halves (mma.sync archs)
# or one half each (sm_100).
HALVES = pytest.mark.parametrize("halves", ["whole", "halves", "split"])


def _attention_kernels(halves: str):
    launch, backward = generated("tiny_compressed_csa").kernels.COMPRESSED_OPS.attentions[
        "compressed_attention_d64_rope32"
    ]
    config = AttentionConfig(16, 16, 1, 1, columns=halves)
    return functools.partial(launch, config=config), backward  # the backward walks the columns in chunks


@HALVES
@pytest.mark.parametrize("entries", ["none", "dense", "selected"])
def test_attention_kernel_gradcheck_in_fp64(entries, halves):
    # The interpreter runs the kernels in fp64: the backward (atomic dK + dV, dQ, the sinks)
    # against finite differences of the forward, raw keys and entries, inverse rope included.
    launch, backward = _attention_kernels(halves)
    torch.manual_seed(0)
    batch, seqlen, heads, dim = 1, 6, 2, 64
    double = torch.float64
    cos, sin = PairRotary(32, 10000.0, None)(torch.arange(seqlen).expand(batch, seqlen), double)
    query = torch.randn(batch, seqlen, heads, dim, dtype=double, requires_grad=True)
    key = torch.randn(batch, seqlen, 1, dim, dtype=double, requires_grad=True)
    sinks = torch.randn(heads, dtype=double, requires_grad=True)
    compressed = None if entries == "none" else torch.randn(batch, 3, 1, dim, dtype=double, requires_grad=True)
    selected = None
    if entries == "selected":  # -1: none; entries a query may not see yet are picked too (the kernel drops them)
        selected = torch.tensor([[[-1, -1], [0, -1], [0, 2], [1, 0], [2, -1], [1, 2]]], dtype=torch.int32)

    def attention(query, key, compressed, sinks):
        return _Attention.apply(query, key, compressed, selected, sinks, cos, sin, launch, backward, 0.3, 3, 2)

    leaves = (query, key, compressed, sinks)
    assert torch.autograd.gradcheck(attention, leaves, **GRADCHECK)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_compressor_kernel_gradcheck_in_fp64(overlap):
    launch, backward = generated("tiny_compressed_csa").kernels.COMPRESSED_OPS.compressors["compress_d64_rope32"]
    torch.manual_seed(0)
    batch, tokens, rate, dim = 1, 7, 2, 64  # 3 closed windows and a token of an unfinished one
    double = torch.float64
    width = dim * (2 if overlap else 1)
    kv = torch.randn(batch, tokens, width, dtype=double, requires_grad=True)
    gate = torch.randn(batch, tokens, width, dtype=double, requires_grad=True)
    bias = torch.randn(rate, width, dtype=double, requires_grad=True)
    weight = (1 + 0.2 * torch.randn(dim, dtype=double)).requires_grad_(True)
    cos, sin = PairRotary(32, 10000.0, None)(entry_positions(0, tokens // rate, rate, batch, kv.device), double)

    def compress(kv, gate, bias, weight):
        return _Compress.apply(kv, gate, bias, weight, cos, sin, launch, backward, rate, overlap, 1e-6)

    assert torch.autograd.gradcheck(compress, (kv, gate, bias, weight), **GRADCHECK)


def test_entry_indexer_kernel_matches_the_reference_and_selects_the_same_entries():
    launch = generated("tiny_compressed_csa").kernels.COMPRESSED_OPS.indexers["entry_indexer_logits_d32"]
    torch.manual_seed(0)
    batch, seqlen, heads, rate = 2, 37, 2, 4
    query = torch.randn(batch, seqlen, heads, 32)
    keys = torch.randn(batch, seqlen // rate, 1, 32)
    weights = torch.randn(batch, seqlen, heads)
    scores = launch(query, keys, weights, scale=32**-0.5, weight_scale=heads**-0.5, rate=rate)
    positions = torch.arange(seqlen).expand(batch, seqlen)
    expected = index_scores_reference(query, keys, weights, positions, scale=32**-0.5, weight_scale=heads**-0.5,
                                      rate=rate)
    assert torch.equal(scores.isinf(), expected.isinf())  # the same entries are not visible yet
    finite = expected.isfinite()
    torch.testing.assert_close(scores[finite], expected[finite], atol=1e-5, rtol=1e-5)
    assert torch.equal(top_k_reference(scores, 3), top_k_reference(expected, 3))


# --- causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 3, 4, 7, 8, 9, 16, 25])
@pytest.mark.parametrize("layer", LAYERS)
def test_the_future_never_reaches_the_past(layer, t):
    """Perturbing tokens t.. changes no output before t (kernel path): not through the window,
    not through an entry of an unfinished window, not through the indexer's selection."""
    module = make_module(layer)
    hidden_states = inputs(1, 33)
    changed = hidden_states.clone()
    changed[:, t:] += 3.0 * torch.randn(changed[:, t:].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base, after = module(hidden_states), module(changed)
    assert max_error(after[:, :t], base[:, :t]) == 0.0, f"changing tokens >= {t} changed earlier outputs"
    assert max_error(after[:, t], base[:, t]) > 1e-3, "the perturbation did not reach position t itself"


def test_entries_carry_information_from_beyond_the_window():
    """The entries are the layer's long-range path: with a window of 8, token 30 still
    depends on tokens 0..7 through HCA's entries, and a sliding layer does not. (CSA's reach
    depends on which entries the indexer picks.)"""
    hidden_states = inputs(1, 31)
    changed = hidden_states.clone()
    changed[:, :8] += 3.0
    with torch.no_grad():
        for layer, reaches in (("sliding", False), ("hca", True)):
            module = make_module(layer)
            moved = max_error(module(changed)[:, -1], module(hidden_states)[:, -1])
            assert (moved > 1e-4) == reaches, f"{layer}: the last token moved by {moved:.2e}"


# --- the decode cache ---------------------------------------------------------------------------


def _decode(module, hidden_states, steps, *, reference=False, new_tokens=None):
    cache = module.new_cache(hidden_states.shape[0], 64)
    run = module.reference_forward if reference else module
    outs, seen = [], 0
    with torch.no_grad():
        for step in steps:
            outs.append(run(hidden_states[:, seen : seen + step], cache=cache, new_tokens=new_tokens))
            seen += step
    return torch.cat(outs, dim=1), cache


STEPS = {
    "token-by-token": (3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "speculative-1-to-4": (5, 2, 4, 3, 1, 4, 2, 1, 4),
    "long-prefill": (21, 1, 2, 3, 4),
}


@pytest.mark.parametrize("steps", list(STEPS))
@pytest.mark.parametrize("layer", LAYERS)
def test_decode_over_the_cache_equals_recomputing_the_whole_sequence(layer, steps):
    """Prefill then decode steps of 1 to 4 tokens, entries emitted mid-generation: the ring,
    the pending projections and the pages give what one pass over the sequence gives."""
    module = make_module(layer)
    sizes = STEPS[steps]
    hidden_states = inputs(2, sum(sizes), seed=3)
    with torch.no_grad():
        whole = module(hidden_states)
    for reference in (False, True):
        decoded, cache = _decode(module, hidden_states, sizes, reference=reference)
        error = max_error(decoded, whole) / whole.abs().max().item()
        assert error < 1e-5, f"{layer} {steps} ({'reference' if reference else 'kernels'}): {error:.2e}"
        assert cache.host_lengths() == [sum(sizes)] * 2


@pytest.mark.parametrize("layer", LAYERS)
def test_ragged_rows_decode_as_if_alone(layer):
    """Right-padded rows (new_tokens) cache only their real tokens: each row equals itself alone."""
    module = make_module(layer)
    lengths = (13, 6)
    hidden_states = inputs(2, 13, seed=4)
    cache = module.new_cache(2, 40)
    with torch.no_grad():
        prompt = module(hidden_states, cache=cache, new_tokens=list(lengths))
        follow = inputs(2, 3, seed=5)
        steps = [module(follow[:, i : i + 1], cache=cache) for i in range(3)]
        for row, length in enumerate(lengths):
            alone = module(torch.cat((hidden_states[row : row + 1, :length], follow[row : row + 1]), dim=1))
            torch.testing.assert_close(prompt[row, :length], alone[0, :length], atol=1e-5, rtol=1e-5)
            assert torch.all(prompt[row, length:] == 0)  # padding gives zeros
            for i, step in enumerate(steps):
                torch.testing.assert_close(step[row, 0], alone[0, length + i], atol=1e-5, rtol=1e-5)


def test_cache_errors_are_one_line_and_change_nothing():
    module = make_module("csa")
    cache = module.new_cache(1, 10)
    with torch.no_grad():
        module(inputs(1, 8), cache=cache)
        with pytest.raises(ValueError, match="would hold 11 tokens, more than the cache's max_tokens=10"):
            module(inputs(1, 3), cache=cache)
        assert cache.host_lengths() == [8]
        with pytest.raises(ValueError, match="batch 2 but the cache holds 1"):
            module(inputs(2, 1), cache=cache)
        with pytest.raises(ValueError, match="position_ids must be each sequence's cached length"):
            module(inputs(1, 1), torch.tensor([[3]]), cache=cache)
    with pytest.raises(ValueError, match="the paged cache is for inference"):
        module(inputs(1, 1), cache=cache)
    with pytest.raises(ValueError, match="new_tokens is only read with cache="):
        module(inputs(1, 2), new_tokens=[1])
    with pytest.raises(ValueError, match="position_ids must be 0..4"):
        module(inputs(1, 5), torch.arange(1, 6)[None])


def test_cache_bytes_grow_with_entries_only():
    spec = load_spec(SPECS / "deepseek_v4_flash_csa.yaml")
    assert spec.cache_values_per_token() * spec.dtype_bytes == 320  # (512 + 128) x 2 bytes per 4 tokens
    module = make_module("csa")
    cache = module.new_cache(1, 64)
    assert cache.bytes_per_token == (64 + 32) * 4 / 4
    assert make_module("sliding").new_cache(1, 64).bytes_per_token == 0


# --- from-hf and check --------------------------------------------------------------------------


def test_published_and_transformers5_configs_give_the_same_layer_specs():
    published = layer_specs(json.loads((CONFIGS / "deepseek_v4_flash.json").read_text()), "deepseek_v4_flash")
    saved = layer_specs(json.loads((CONFIGS / "deepseek_v4_flash_transformers5.json").read_text()), "deepseek_v4_flash")
    assert published.layer_types == saved.layer_types
    assert published.pattern == "SS" + "CH" * 20 + "C"
    for kind, spec in published.specs.items():
        assert spec == saved.specs[kind]
        shipped = load_spec(SPECS / f"{spec.name}.yaml")
        assert shipped == spec, f"specs/{spec.name}.yaml differs from the published config's conversion"
    csa = published.specs["compressed_sparse_attention"]
    assert isinstance(csa, CompressedSpec) and csa.compression.indexer.top_k == 512
    assert csa.rope.theta == 160000 and csa.rope.scaling.factor == 16
    assert published.specs["sliding_attention"].rope.scaling is None


def test_v4_pro_cache_at_1m_tokens_against_an_mla_stack():
    """vLLM's figures for DeepSeek-V4-Pro (61 layers, bf16): 9.62 GiB of compressed entries per
    1M-token sequence, 83.9 GiB for a V3.2-style stack (latent + rope key + indexer key)."""
    pro = layer_specs(json.loads((CONFIGS / "deepseek_v4_pro.json").read_text()), "pro")
    assert pro.describe().startswith("61 layers: 30 compressed_sparse_attention")
    cache = ModelCache(tuple((k, pro.layer_types.count(k), s) for k, s in pro.specs.items()), 1 << 20)
    assert f"{cache.entries_bytes() / 2**30:.2f}" == "9.62"
    assert f"{cache.mla_bytes(index=True) / 2**30:.2f}" == "83.88"
    assert f"{cache.mla_bytes(index=False) / 2**30:.2f}" == "68.62"


def test_check_and_from_hf_on_a_v4_config(capsys, tmp_path):
    assert cli.main(["check", str(CONFIGS / "deepseek_v4_pro.json")]) == 0
    out = capsys.readouterr().out
    assert "pattern HHCHCH" in out and "9.62 GiB" in out and "83.88 GiB, 8.7x more" in out
    assert cli.main(["from-hf", str(CONFIGS / "deepseek_v4_flash.json"), "-o", str(tmp_path / "flash.yaml")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flash_csa.yaml", "flash_hca.yaml", "flash_sliding.yaml"]
    assert "2 sliding_attention (0, 1), 21 compressed_sparse_attention (2, 4, ..., 42)" in out
    for layer in LAYERS:
        assert load_spec(tmp_path / f"flash_{layer}.yaml").name == f"flash_{layer}"


CONFIG_ERRORS = {
    "kv-heads": ({"num_key_value_heads": 8}, "num_key_value_heads: 8: DeepSeek-V4 attends with one shared K = V head"),
    "bias": ({"attention_bias": True}, "attention_bias: true: DeepseekV4Attention has no biases"),
    "ratios": ({"compress_ratios": [0, 0, 4, 64]}, "compress_ratios: must be a list of 0, 4 and 128"),
    "attention-factor": ({"rope_scaling": {"type": "yarn", "factor": 16, "attention_factor": 1.3}},
                         "attention_factor: 1.3: DeepSeek-V4 keeps cos/sin unscaled"),
    "rope-type": ({"rope_scaling": {"type": "longrope", "factor": 2}}, "rope scaling 'longrope' is not supported"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_inexpressible_v4_configs_are_refused_in_one_line(case):
    changes, fragment = CONFIG_ERRORS[case]
    config = {**json.loads((CONFIGS / "deepseek_v4_flash.json").read_text()), **changes}
    with pytest.raises(SpecError) as info:
        layer_specs(config, "flash", "config.json")
    assert fragment in str(info.value) and str(info.value).startswith("config.json: ")


@HALVES
@pytest.mark.parametrize("heads", [1, 3, 16])
@pytest.mark.parametrize("entries", ["none", "dense", "selected"])
def test_attention_kernel_at_any_head_count(entries, heads, halves):
    """Rows are (token, head) pairs: a block may hold parts of several tokens (heads < 16) or a
    part of one token's heads; the kernel against the reference at head counts that split blocks unevenly."""
    launch, _ = _attention_kernels(halves)
    torch.manual_seed(heads)
    batch, seqlen, rate = 2, 19, 4
    cos, sin = PairRotary(32, 10000.0, None)(torch.arange(seqlen).expand(batch, seqlen), torch.float32)
    query, key = torch.randn(batch, seqlen, heads, 64), torch.randn(batch, seqlen, 1, 64)
    compressed = None if entries == "none" else torch.randn(batch, seqlen // rate, 1, 64)
    selected = None
    if entries == "selected":
        scores = torch.randn(batch, seqlen, seqlen // rate).masked_fill(
            torch.arange(seqlen // rate) >= (torch.arange(seqlen)[:, None] + 1) // rate, float("-inf")
        )
        selected = top_k_reference(scores, 3).to(torch.int32)
    sinks = torch.randn(heads)
    out, _ = launch(query, key, compressed, selected, sinks, cos, sin, scale=0.125, window=5, rate=rate)
    expected = attention_reference(query, key, compressed, selected, sinks, cos, sin, scale=0.125, window=5, rate=rate)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@HALVES
@pytest.mark.parametrize("heads", [1, 16])
@pytest.mark.parametrize("entries", ["none", "dense", "selected"])
def test_attention_kernel_over_tiles_every_row_sees_whole(entries, heads, halves):
    """A window and entry counts wider than the 16-key tiles, so that some tiles hold no pair a
    real row cannot see (the "whole" programs skip the mask there) beside masked ones; 16
    heads make a block one token's rows, as DeepSeek-V4's 64 heads on sm_90."""
    launch, _ = _attention_kernels(halves)
    torch.manual_seed(heads)
    batch, seqlen, rate, window = 1, 64, 2, 40
    cos, sin = PairRotary(32, 10000.0, None)(torch.arange(seqlen).expand(batch, seqlen), torch.float32)
    query, key = torch.randn(batch, seqlen, heads, 64), torch.randn(batch, seqlen, 1, 64)
    compressed = None if entries == "none" else torch.randn(batch, seqlen // rate, 1, 64)
    selected = None
    if entries == "selected":
        scores = torch.randn(batch, seqlen, seqlen // rate).masked_fill(
            torch.arange(seqlen // rate) >= (torch.arange(seqlen)[:, None] + 1) // rate, float("-inf")
        )
        selected = top_k_reference(scores, 16).to(torch.int32)
    sinks = torch.randn(heads)
    options = dict(scale=0.125, window=window, rate=rate)
    out, _ = launch(query, key, compressed, selected, sinks, cos, sin, **options)
    expected = attention_reference(query, key, compressed, selected, sinks, cos, sin, **options)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@HALVES
@pytest.mark.parametrize("heads", [1, 16])
def test_attention_kernel_over_a_ring_wider_than_its_tiles(heads, halves):
    """Decode-time keys from the cache's ring (position p at slot p % window) beside this step's
    rows, the window wide enough that ring tiles hold no pair a real row cannot see (the
    "whole" programs skip the mask there): the last 24 rows of one pass over 64 tokens."""
    launch, _ = _attention_kernels(halves)
    torch.manual_seed(heads)
    seqlen, cached, window = 64, 40, 40
    cos, sin = PairRotary(32, 10000.0, None)(torch.arange(seqlen).expand(1, seqlen), torch.float32)
    query, key = torch.randn(1, seqlen, heads, 64), torch.randn(1, seqlen, 1, 64)
    sinks = torch.randn(heads)
    ring = torch.zeros(1, window, 64)
    ring[0, torch.arange(cached) % window] = key[0, :cached, 0]
    state = CachedAttention(ring, torch.tensor([cached], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                            torch.zeros(1, 1, dtype=torch.int32), 16)
    out, _ = launch(query[:, cached:], key[:, cached:], None, None, sinks, cos[:, cached:], sin[:, cached:],
                    scale=0.125, window=window, rate=1, cached=state)
    expected = attention_reference(query, key, None, None, sinks, cos, sin, scale=0.125, window=window, rate=1)
    torch.testing.assert_close(out, expected[:, cached:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version, csa_stages", [("3.6.0", 1), ("3.9.0", 2), ("3.10.1", 2)])
def test_sm100_csa_stages_follow_the_triton_that_compiles_them(version, csa_stages, monkeypatch):
    """Triton 3.6 spills 352 B of sm_100's CSA program at two stages, with local loads and
    stores in every step (3.9: none): the program that walks selected entries takes one stage
    there; HCA's and the window's keep two, and sm_90's programs are alike on both."""
    import triton

    from mlagen.runtime.compressed_kernels import compressed_attention_config
    from mlagen.runtime.launch import LaunchTarget, launching_for

    monkeypatch.setattr(triton, "__version__", version)
    with launching_for(LaunchTarget(100, 148)):
        assert compressed_attention_config(512, 64, torch.device("meta"), torch.bfloat16, selects=True).num_stages \
            == csa_stages
        assert compressed_attention_config(512, 64, torch.device("meta"), torch.bfloat16).num_stages == 2
    with launching_for(LaunchTarget(90, 132)):
        assert compressed_attention_config(512, 64, torch.device("meta"), torch.bfloat16, selects=True) \
            == compressed_attention_config(512, 64, torch.device("meta"), torch.bfloat16)


@pytest.mark.parametrize("layer", LAYERS)
def test_the_launcher_says_whether_it_walks_selected_entries(layer, monkeypatch):
    kernels = generated(f"tiny_compressed_{layer}").kernels
    config, asked = kernels.compressed_attention_config, []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("selects"))
        return config(*args, **kwargs)

    monkeypatch.setattr(kernels, "compressed_attention_config", recording)
    with torch.no_grad():
        make_module(layer)(inputs(1, 9))
    assert asked and set(asked) == {layer == "csa"}, asked
