"""MLA inference: the absorbed decode IR, the paged latent cache, prefill followed by
decode matching the full causal forward at every position, and right padding that changes
no real token (causal and non-causal)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

import mlagen
from mlagen.ir import S, T, lower
from mlagen.ir.ops import OpKind
from mlagen.passes import run_pipeline
from mlagen.runtime.attention import CACHE_BYTES_PER_PARTIAL_BYTE, decode_splits
from mlagen.runtime.launch import LaunchTarget, decode_column_halves, default_decode_config, launching_for
from mlagen.runtime.mla_decode import CachedTokens
from mlagen.spec import load_spec, parse_spec
from tests.helpers import SPECS, assert_close_to_golden, generated, max_error

MLA_SPECS = ["tiny_mla", "tiny_mla_yarn"]
SHIPPED_MLA = ["deepseek_v3", "deepseek_v2_lite", "kimi_k2"]


def tiny_mla_package(causal: bool, out_root: Path) -> ModuleType:
    """tiny_mla as shipped (causal), or the same spec with `causal: false` generated under
    out_root: no shipped mla spec is bidirectional."""
    if causal:
        return generated("tiny_mla")
    text = (SPECS / "tiny_mla.yaml").read_text(encoding="utf-8")
    text = text.replace("name: tiny_mla", "name: tiny_mla_bidirectional").replace("causal: true", "causal: false")
    package = mlagen.load(parse_spec(text, "tiny_mla_bidirectional.yaml"), out_root)
    assert package.SPEC["causal"] is False
    return package


def randomized(module: torch.nn.Module, dtype=torch.float32) -> torch.nn.Module:
    """Random weights in fp64 (rounded once to `dtype`), norm weights too, so they matter."""
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5 + (1.0 if param.dim() == 1 else 0.0))
    return module.to(dtype)


def _module(name: str, dtype=torch.float32) -> torch.nn.Module:
    return randomized(generated(name).Attention(dtype=torch.float64), dtype)


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "non-causal"])
def mla_package(request, tmp_path_factory) -> ModuleType:
    return tiny_mla_package(request.param, tmp_path_factory.mktemp("specs"))


@pytest.mark.parametrize("name", SHIPPED_MLA + MLA_SPECS)
def test_decode_graph_never_expands_the_cache_per_head(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    graph = run_pipeline(lower(spec, "decode"), "decode", verify_each=True)
    for node in graph.nodes:
        if T in node.shape:
            assert len(node.shape) < 4 or node.shape[2] == 1, f"{node.name} {node.shape}: per-head over the cache"
    assert not any(node.op is OpKind.LINEAR and T in node.shape for node in graph.nodes), "kv_b_proj over T"
    (attention,) = graph.of_kind(OpKind.ATTENTION)
    latent = spec.kv_lora_rank
    assert attention.shape[-1] == latent and attention.attr("kernel") == f"mla_decode_lat{latent}_rope" \
        f"{spec.qk_rope_head_dim}"
    assert [n.attr("transpose") for n in graph.of_kind(OpKind.HEAD_MATMUL)] == [False, True]
    assert graph.node("output").shape == (graph.node("hidden_states").shape[0], S, spec.d_model)


@pytest.mark.parametrize("batch, prompt, step, page_size", [(1, 5, 1, 64), (3, 9, 1, 4), (2, 16, 3, 4), (4, 1, 2, 8)],
                         ids=["batch1-one-token-steps", "batch3-pages-of-4", "speculative-3-tokens", "batch4-prompt1"])
@pytest.mark.parametrize("name", MLA_SPECS)
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_prefill_then_decode_equals_full_causal_forward(name, batch, prompt, step, page_size, path):
    module = _module(name)
    seqlen = prompt + 4 * step
    x = torch.randn(batch, seqlen, module.o_proj.out_features)
    full = module.reference_forward(x)
    run = module.forward if path == "kernels" else module.reference_forward
    cache = module.new_cache(batch, seqlen + 3, page_size=page_size)
    with torch.no_grad():
        outs = [run(x[:, :prompt], cache=cache)]
        for start in range(prompt, seqlen, step):
            outs.append(run(x[:, start : start + step], cache=cache))
    assert cache.host_lengths() == [seqlen] * batch
    assert max_error(torch.cat(outs, dim=1), full) < 2e-5


def test_ragged_lengths_in_one_batch():
    # Three sequences with prompts of 7, 3 and 12 tokens (right padding), then decode steps
    # with one token each; every real position equals its own sequence's full forward.
    module = _module("tiny_mla")
    lengths = [7, 3, 12]
    x = torch.randn(3, 16, 64)
    cache = module.new_cache(3, 20, page_size=4)
    with torch.no_grad():
        prefill = module(x[:, :12], cache=cache, new_tokens=lengths)
        assert cache.host_lengths() == lengths
        assert torch.equal(prefill[1, 3:], torch.zeros_like(prefill[1, 3:])), "padding outputs are zero"
        steps = [module(x[:, 12 + i : 13 + i], cache=cache) for i in range(3)]
    for row, length in enumerate(lengths):
        sequence = torch.cat([x[row, :length], x[row, 12:15]])[None]
        expected = module.reference_forward(sequence)[0]
        got = torch.cat([prefill[row, :length]] + [s[row] for s in steps])
        assert max_error(got, expected) < 2e-5, f"sequence {row}"


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_right_padding_changes_no_real_token_and_gives_zeros(mla_package, path):
    """README: right padding "gives zeros", and nothing else: every real token's output equals
    running its row alone, in a prefill into an empty cache and in a decode step of several new
    tokens. Non-causal attention over the padded rows would let real tokens see the padding."""
    module = randomized(mla_package.Attention())
    run = module.forward if path == "kernels" else module.reference_forward
    prompt_counts, step_counts = [3, 5, 1, 0], [2, 3, 0, 1]
    prompts, steps = torch.randn(4, 5, 64), torch.randn(4, 3, 64)
    cache = module.new_cache(4, 8, page_size=2)
    with torch.no_grad():
        prefill = run(prompts, cache=cache, new_tokens=prompt_counts)
        step = run(steps, cache=cache, new_tokens=step_counts)
        for row, (prompt, new) in enumerate(zip(prompt_counts, step_counts)):
            # Alone: the row's real tokens so far (without a cache); the newest tokens of a
            # non-causal row see every token before and beside them.
            prompt_alone = module.reference_forward(prompts[row : row + 1, :prompt])[0]
            history = torch.cat([prompts[row, :prompt], steps[row, :new]])[None]
            step_alone = module.reference_forward(history)[0, prompt:]
            # (assert_close: a row without new tokens compares empty tensors)
            torch.testing.assert_close(prefill[row, :prompt], prompt_alone, atol=2e-5, rtol=0)
            torch.testing.assert_close(step[row, :new], step_alone, atol=2e-5, rtol=0)
            assert not prefill[row, prompt:].any() and not step[row, new:].any(), f"padding of row {row}"
    assert cache.host_lengths() == [p + n for p, n in zip(prompt_counts, step_counts)]


@pytest.mark.parametrize("halves", [False, True], ids=["all-columns", "column-halves"])
@pytest.mark.parametrize(
    "page_size, descriptors",
    [(8, False), (16, True), (16, False), (32, True)],
    ids=["pages-smaller-than-a-tile", "tiles-through-descriptors", "tiles-through-pointers", "two-tiles-a-page"],
)
def test_split_kv_partials_merge_exactly(page_size, descriptors, halves, monkeypatch):
    # The decode kernel splits a long cache across programs; any split count gives the same result,
    # whichever way it reads whole key tiles (one page lookup per tile and tensor descriptors, or
    # plain loads as on sm_80), and one split writes the output with no combine launch; a program
    # keeps all latent columns (sm_90, sm_100) or one half of them (mma.sync archs, fp32).
    module = _module("tiny_mla_yarn")
    kernels = generated("tiny_mla_yarn").kernels
    decode = next(name for name in dir(kernels) if name.startswith("mla_decode_") and name.endswith("_launch")
                  and "append" not in name)
    monkeypatch.setattr(kernels, "decode_column_halves", lambda *args, **kwargs: halves)
    if not descriptors:
        monkeypatch.setattr(kernels, "cache_descriptors", lambda *args, **kwargs: (None, None))
    cache = module.new_cache(2, 80, page_size=page_size)
    x = torch.randn(2, 70, 64)
    with torch.no_grad():
        module(x, cache=cache)
    q_latent = torch.randn(2, 3, 2, 32)
    q_rope = torch.randn(2, 3, 2, 16)
    cached = CachedTokens(cache, cache.lengths - 3, (3, 3))
    reference = generated("tiny_mla_yarn").module.REFERENCE_DECODE.attend(q_latent, q_rope, cached, scale=0.2,
                                                                            causal=True)
    for splits in (1, 2, 3, 5):
        with monkeypatch.context() as patch:
            if splits == 1:
                patch.setattr(kernels, decode.removesuffix("_launch") + "_combine", None)
            out = getattr(kernels, decode)(q_latent, q_rope, cached, scale=0.2, causal=True, num_splits=splits)
        assert max_error(out, reference) < 1e-5, f"{splits} splits"


@pytest.mark.parametrize("heads", [128, 16, 1])
@pytest.mark.parametrize("batch", [1, 64])
def test_split_count_fills_an_h100_once_and_bounds_the_partials(batch, heads):
    # DeepSeek-V3's decode (latent 512 + rope 64, bf16) over 4096 cached tokens on 132 SMs
    meta = torch.device("meta")
    with launching_for(LaunchTarget(90, 132)):
        config = default_decode_config(heads, meta, dtype=torch.bfloat16)
        assert not decode_column_halves(meta, dtype=torch.bfloat16), "one program keeps all 512 columns"
        programs = -(-heads // config.block_m) * batch  # row blocks x batch
        rows = min(heads, config.block_m)
        splits, keys_per_split = decode_splits(
            programs, rows, 4096, meta, block_n=config.block_n, latent=512, rope=64, dtype=torch.bfloat16
        )
    assert keys_per_split % config.block_n == 0 and splits * keys_per_split >= 4096
    if 2 * programs > 132:
        assert splits == 1, "the grid (nearly) fills the GPU: no split, no combine"
    else:
        assert 1 < splits and programs * splits <= 132, "at most one wave"
        partial_bytes, cache_bytes = rows * 512 * 4, keys_per_split * 576 * 2
        assert CACHE_BYTES_PER_PARTIAL_BYTE * partial_bytes <= cache_bytes


def test_decode_in_fp16_follows_the_error_rule():
    module64 = _module("tiny_mla", torch.float64)
    module16 = _module("tiny_mla", torch.float16)
    x = torch.randn(2, 12, 64, dtype=torch.float64)

    def run(module, dtype, kernels):
        cache = module.new_cache(2, 16, page_size=4)
        forward = module.forward if kernels else module.reference_forward
        with torch.no_grad():
            outs = [forward(x[:, :8].to(dtype), cache=cache)]
            outs += [forward(x[:, t : t + 1].to(dtype), cache=cache) for t in range(8, 12)]
        return torch.cat(outs, dim=1)

    golden = run(module64, torch.float64, kernels=False)
    assert_close_to_golden(run(module16, torch.float16, True), run(module16, torch.float16, False), golden,
                           atol=2e-3, what="fp16 decode")


def test_cache_allocates_appends_and_frees_pages():
    module = _module("tiny_mla")
    cache = module.new_cache(2, 10, page_size=4)
    assert cache.buffer.shape == (2 * 3, 4, 32 + 8) and cache.bytes_per_token == 40 * 4
    with torch.no_grad():
        module(torch.randn(2, 6, 64), cache=cache, new_tokens=[6, 2])
    assert cache.host_lengths() == [6, 2]
    used = {int(p) for p in cache.page_table[0, :2]} | {int(cache.page_table[1, 0])}
    assert len(used) == 3, "each sequence has its own pages"
    cache.free([0])
    assert cache.host_lengths() == [0, 2]
    with torch.no_grad():
        module(torch.randn(2, 1, 64), cache=cache, new_tokens=[1, 1])
    assert cache.host_lengths() == [1, 3]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: (m.new_cache(2, 8), torch.randn(2, 9, 64)), "max_tokens=8"),
        (lambda m: (m.new_cache(3, 8), torch.randn(2, 4, 64)), "cache holds 3 sequences"),
        (lambda m: (m.new_cache(2, 64, page_size=4, num_pages=3), torch.randn(2, 8, 64)), "pages"),
        (lambda m: (m.new_cache(2, 8), torch.randn(2, 4, 64)), None),
    ],
    ids=["cache-overflow", "batch-mismatch", "out-of-pages", "fits"],
)
def test_cache_misuse_raises_before_writing(make, message):
    module = _module("tiny_mla")
    cache, x = make(module)
    before = cache.buffer.clone()
    with torch.no_grad():
        if message is None:
            module(x, cache=cache)
            return
        with pytest.raises(ValueError, match=message):
            module(x, cache=cache)
    assert torch.equal(cache.buffer, before) and cache.host_lengths() == [0] * cache.batch_size


def test_positions_beyond_the_rope_table_are_rejected():
    module = _module("tiny_mla")
    cache = module.new_cache(1, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="max_position"):
        module(torch.randn(1, 2, 64), torch.tensor([[510, 512]]), cache=cache)


def test_generation_example_matches_recomputation():
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("generate_tiny_mla", ROOT / "examples" / "generate_tiny_mla.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cached, recomputed, _ = example.generate(steps=6)
    assert torch.equal(cached, recomputed)
