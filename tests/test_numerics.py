"""Numerics the kernel tests do not cover: the reference path of an fp16 module on large
activations, and a NaN cached token in the MLA decode kernel (forward kernels:
tests/test_attention_kernel.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from mlagen.runtime.mla_decode import CachedTokens
from mlagen.runtime.paged_cache import PagedLatentCache
from tests.helpers import generated, max_error


def randomized(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights drawn in fp64 and rounded once to `dtype` (norm weights near 1)."""
    module = module.double()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5 + (1.0 if param.dim() == 1 else 0.0))
    return module.to(dtype)


@pytest.mark.parametrize("name", ["tiny_gqa", "tiny_hybrid"])
def test_fp16_reference_path_stays_finite_on_activations_times_100(name):
    """q.k of these inputs passes fp16's 65504: the reference must keep it in fp32, as the
    kernels do, instead of rounding it to inf (which gave NaN outputs)."""
    module16 = randomized(generated(name).Attention(dtype=torch.float64), torch.float16)
    golden_module = copy.deepcopy(module16).double()  # the same fp16-rounded weights, in fp64
    hidden = (torch.randn(2, 23, generated(name).D_MODEL, dtype=torch.float64) * 100).half()
    with torch.no_grad():
        out = module16.reference_forward(hidden)
        golden = golden_module.reference_forward(hidden.double())
        on_kernels = module16(hidden)
    assert out.isfinite().all() and on_kernels.isfinite().all()
    # fp16 rounds to 2**-11 relative; a few roundings along the way stay within 2e-3 of the output's scale
    assert max_error(out, golden) <= 2e-3 * golden.abs().max().item()


def _decode_launch(kernels):
    (name,) = [n for n in dir(kernels) if n.startswith("mla_decode_") and n.endswith("_launch") and "append" not in n]
    return getattr(kernels, name)


def _filled_cache(lengths: list[int], dtype: torch.dtype) -> PagedLatentCache:
    """A cache whose tokens hold random rows and whose every row past them holds NaN (as
    memory the cache never wrote may): the kernel must not read them into any output."""
    module = generated("tiny_mla").module
    cache = PagedLatentCache(len(lengths), 40, latent_dim=module.LATENT_DIM, rope_dim=module.ROPE_DIM, page_size=8,
                             dtype=dtype)
    cache.reserve(lengths)
    cache.commit(lengths)
    cache.buffer.fill_(float("nan"))
    for seq, length in enumerate(lengths):
        for position in range(length):
            _row(cache, seq, position).copy_(torch.randn(cache.width, dtype=dtype))
    return cache


def _row(cache: PagedLatentCache, seq: int, position: int) -> torch.Tensor:
    page = int(cache.page_table[seq, position // cache.page_size])
    return cache.buffer[page, position % cache.page_size]


# The interpreter's max reduction (numpy) warns on the newest token's NaN row.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_ignores_a_nan_cached_token_that_earlier_new_tokens_may_not_see(dtype):
    """Three new tokens per sequence (speculative decoding), the newest one's cached row NaN:
    the two before it may not see it, so their outputs are bit for bit those with a finite row
    there; the newest one's output is NaN. The kernel's split of 16 keys holding that row holds
    none the earlier tokens see (README "Numerics and NaN"): their partial there is exact
    zeros, weighed 0 by the combine. Rows past each sequence's length are NaN throughout."""
    package = generated("tiny_mla")
    lengths = [33, 17]  # the newest rows, 32 and 16, each open a split of 16 keys
    cache = _filled_cache(lengths, dtype)
    cached = CachedTokens(cache, cache.lengths - 3, (3, 3))
    q_latent = torch.randn(2, 3, 2, package.module.LATENT_DIM, dtype=dtype)
    q_rope = torch.randn(2, 3, 2, package.module.ROPE_DIM, dtype=dtype)
    launch = _decode_launch(package.kernels)
    paths = {
        "kernel": lambda: launch(q_latent, q_rope, cached, scale=0.2, causal=True, num_splits=3),
        "reference": lambda: package.module.REFERENCE_DECODE.attend(q_latent, q_rope, cached, scale=0.2,
                                                                     causal=True),
    }
    clean = {path: attend() for path, attend in paths.items()}
    assert all(out.isfinite().all() for out in clean.values()), "a row past a sequence's length was read"
    for seq, length in enumerate(lengths):
        _row(cache, seq, length - 1).fill_(float("nan"))
    for path, attend in paths.items():
        out = attend()
        assert torch.equal(out[:, :2], clean[path][:, :2]), path
        assert out[:, 2].isnan().all(), path
