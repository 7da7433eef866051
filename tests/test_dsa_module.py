"""The generated sparse MLA module (tiny_dsa): its kernel path against its plain-torch
reference, the selection as an input and an output (GLM-5's layers without an indexer take
another layer's), keys outside a query's selection, the FP8 cache option, and bad inputs.
(Parity with transformers: tests/test_dsa_parity.py; the kernels alone: test_sparse_kernels.py.)
"""

from __future__ import annotations

import pytest
import torch

import mlagen
from mlagen.runtime.paged_cache import PagedLatentCache
from mlagen.runtime.sparse_cache import PagedSparseCache
from tests.helpers import SPECS, assert_close_to_golden, generated

PACKAGE = generated("tiny_dsa")
MODULE = PACKAGE.module
TOP_K = MODULE.TOP_K


def layer(indexer: bool = True, seed: int = 0):
    attn = PACKAGE.Attention(indexer=indexer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(attn.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return attn


def hidden(batch: int = 2, seqlen: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seqlen, PACKAGE.D_MODEL, generator=torch.Generator().manual_seed(seed))


def test_parameters_are_transformers_names_in_its_order():
    names = [name for name, _ in layer().named_parameters()]
    assert names == [
        "q_a_proj.weight",
        "q_a_layernorm.weight",
        "q_b_proj.weight",
        "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight",
        "kv_b_proj.weight",
        "o_proj.weight",
        "indexer.wq_b.weight",
        "indexer.wk.weight",
        "indexer.k_norm.weight",
        "indexer.k_norm.bias",
        "indexer.weights_proj.weight",
    ]
    assert layer().indexer.weights_proj.weight.dtype == torch.float32, (
        "kept in fp32, as transformers keeps it"
    )
    assert not any(name.startswith("indexer") for name, _ in layer(indexer=False).named_parameters())


def test_kernels_match_the_reference_and_select_top_k_keys():
    attn, x = layer(), hidden()
    with torch.no_grad():
        out, selected = attn(x, return_selected=True)
        expected, expected_selected = attn.reference_forward(x, return_selected=True)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(selected.sort(-1).values, expected_selected.sort(-1).values)
    assert selected.shape == (2, 21, TOP_K) and selected.dtype == torch.int32
    for query in range(21):  # every visible key while they fit, then top_k of them
        real = selected[:, query][selected[:, query] >= 0].view(2, -1)
        assert real.shape[1] == min(query + 1, TOP_K) and (real <= query).all()


def test_a_key_outside_the_selection_does_not_change_the_output():
    """With the selection fixed, a token that query t does not select changes no output of t,
    however far it moves; the token's own output changes."""
    attn, x = layer(), hidden(batch=1)
    with torch.no_grad():
        out, selected = attn(x, return_selected=True)
        t = 20
        outside = sorted(set(range(t)) - set(selected[0, t].tolist()))
        assert outside, "query 20 selects 8 of 21 keys"
        moved = x.clone()
        moved[0, outside] = 1000 * torch.randn(len(outside), x.shape[-1])
        changed = attn(moved, selected=selected)
    assert torch.equal(changed[0, t], out[0, t])
    assert not torch.equal(changed[0, outside[0]], out[0, outside[0]])


def test_a_layer_without_indexer_takes_another_layers_selection():
    """GLM-5's "shared" layers: the same attention over a given selection, in prefill and over
    the cache, and nothing of the indexer in the cache."""
    full, shared = layer(), layer(indexer=False)
    shared.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("indexer")})
    x = hidden()
    with torch.no_grad():
        out, selected = full(x, return_selected=True)
        assert torch.equal(shared(x, selected=selected), out)
        full_cache, shared_cache = full.new_cache(2, 32), shared.new_cache(2, 32)
        assert shared_cache.index_buffer is None and full_cache.index_buffer is not None
        assert shared_cache.bytes_per_token < full_cache.bytes_per_token
        for chunk in (x[:, :12], x[:, 12:13], x[:, 13:17]):  # prefill, decode, 4 speculative tokens
            step, step_selected = full(chunk, cache=full_cache, return_selected=True)
            assert torch.equal(shared(chunk, cache=shared_cache, selected=step_selected), step)
        with pytest.raises(ValueError, match="no indexer.*pass selected="):
            shared(x)
        with pytest.raises(ValueError, match="keeps indexer keys but this layer has no indexer"):
            shared(x[:, :1], cache=full.new_cache(2, 8), selected=selected[:, :1])


def test_decode_over_the_cache_equals_the_whole_sequence_at_once():
    """Causal, and the selection of token t looks at keys up to t only: prefill through the cache,
    then one token at a time, gives the outputs of one pass over the whole sequence, with pages
    of 4 and a ragged batch (row 1 holds 3 tokens fewer: right padding)."""
    attn, x = layer(), hidden()
    with torch.no_grad():
        whole = attn(x)
        cache = attn.new_cache(2, 32)
        steps = [attn(x[:, :10], cache=cache, new_tokens=[10, 7])]
        assert steps[0][1, 7:].abs().max() == 0, "right padding gives zeros"
        assert cache.host_lengths() == [10, 7]
        row1 = torch.cat([x[1:, 7:10], x[1:, 10:21]], dim=1)  # row 1 continues with its padded tokens
        for t in range(10, 21):
            step = torch.stack([x[0, t : t + 1], row1[0, t - 10 : t - 9]])
            steps.append(attn(step, cache=cache))
    got = torch.cat(steps, dim=1)
    assert (got[0] - whole[0]).abs().max() <= 1e-5 * whole.abs().max()
    partial = attn(torch.cat([x[1:, :7], row1[:, :11]], dim=1))
    assert (got[1, [*range(7), *range(10, 21)]] - partial[0]).abs().max() <= 1e-5 * partial.abs().max()


def test_fp8_cache_from_the_spec_or_per_cache(tmp_path):
    text = (SPECS / "tiny_dsa.yaml").read_text().replace("name: tiny_dsa", "name: tiny_dsa_fp8")
    (tmp_path / "tiny_dsa_fp8.yaml").write_text(text + "cache_dtype: fp8\n")
    package = mlagen.load(tmp_path / "tiny_dsa_fp8.yaml", out_root=tmp_path / "generated")
    assert package.Attention().new_cache(1, 8).cache_dtype == "fp8"
    cache = layer().new_cache(1, 8, cache_dtype="fp8")
    assert cache.fp8 and cache.bytes_per_token == (32 + 4 + 2 * 8) + (32 + 4)
    with torch.no_grad():
        out = layer()(hidden(batch=1, seqlen=8), cache=cache)
        reference = layer().reference_forward(
            hidden(batch=1, seqlen=8), cache=layer().new_cache(1, 8, cache_dtype="fp8")
        )
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a, x: a(x, selected=torch.zeros(2, 21, 4)), "selected must be integer key positions"),
        (
            lambda a, x: a(x, selected=torch.zeros(2, 20, 4, dtype=torch.int32)),
            r"selected must be .*\[2, 21, K\]",
        ),
        (
            lambda a, x: a(x, cache=PagedLatentCache(2, 32, latent_dim=32, rope_dim=8, dtype=torch.float32)),
            "cache must be a PagedSparseCache",
        ),
        (lambda a, x: a.new_cache(2, 32, cache_dtype="int8"), "cache_dtype must be one of model, fp8"),
        (lambda a, x: a(x, cache=a.new_cache(2, 32)), "the paged cache is for inference"),
    ],
    ids=[
        "float_selection",
        "selection_of_other_length",
        "dense_cache",
        "unknown_cache_dtype",
        "cache_with_grad",
    ],
)
def test_bad_inputs_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        call(layer(), hidden())
    assert "\n" not in str(excinfo.value)


def test_fp8_cache_holds_deepseek_v32_widths():
    cache = PagedSparseCache(1, 64, latent_dim=512, rope_dim=64, index_dim=128, cache_dtype="fp8")
    assert cache.bytes_per_token == 656 + 132
    bf16 = PagedSparseCache(1, 64, latent_dim=512, rope_dim=64, index_dim=128)
    assert bf16.bytes_per_token == 1152 + 256


def test_context_parallelism_refuses_sparse_attention():
    import mlagen.parallel as mp

    with pytest.raises(ValueError, match="context parallelism does not support sparse attention"):
        mp.context_parallel(layer())


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_bf16_kernels_on_gpu_by_the_error_ratio_rule(cache_dtype):
    """bf16 (which the interpreter cannot run): prefill forward and gradients, then decode over
    the paged cache, against the fp64 reference path by the error-ratio rule. The selection is
    the fp64 run's, passed in, so that bf16 rounding cannot move keys across the top-k edge."""
    golden_layer = layer().double().cuda()
    x = hidden().double().cuda()
    with torch.no_grad():
        _, selected = golden_layer.reference_forward(x, return_selected=True)
    grad_out = torch.randn_like(x)

    def prefill(module, forward, dtype):
        module.zero_grad(set_to_none=True)
        leaf = x.to(dtype).requires_grad_(True)
        out = forward(leaf, selected=selected)
        out.backward(grad_out.to(dtype))
        named = [param.grad for name, param in module.named_parameters() if not name.startswith("indexer.")]
        return [out.detach(), leaf.grad, *named]

    bf16 = layer().bfloat16().cuda()
    for got, eager, golden in zip(
        prefill(bf16, bf16, torch.bfloat16),
        prefill(bf16, bf16.reference_forward, torch.bfloat16),
        prefill(golden_layer, golden_layer.reference_forward, torch.float64),
        strict=True,
    ):
        assert_close_to_golden(got.cpu(), eager.cpu(), golden.cpu(), atol=2e-2, what=f"prefill {cache_dtype}")

    def decode(forward, module, dtype):
        cache = module.new_cache(2, 32, cache_dtype=cache_dtype)
        with torch.no_grad():
            steps = [forward(x[:, :12].to(dtype), cache=cache, selected=selected[:, :12])]
            steps += [
                forward(x[:, t : t + 1].to(dtype), cache=cache, selected=selected[:, t : t + 1])
                for t in range(12, 21)
            ]
        return torch.cat(steps, 1).cpu()

    assert_close_to_golden(
        decode(bf16, bf16, torch.bfloat16),
        decode(bf16.reference_forward, bf16, torch.bfloat16),
        decode(golden_layer.reference_forward, golden_layer, torch.float64),
        atol=2e-2,
        what=f"decode over a {cache_dtype} cache",
    )
