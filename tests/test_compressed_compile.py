"""The compressed (DeepSeek-V4) kernels compile, as their launchers launch them, for every GPU
generation from sm_80 to sm_120, in bf16 and fp16, without spilling registers, and their dots
run on tensor cores. No GPU: mlagen.aot captures each launcher call on meta tensors under a
stand-in driver (the exact specialisation a launch on that GPU gets) and reads the cubin.

The shapes are DeepSeek-V4-Flash's (head dim 512, rope 64, indexer 64 heads of 128), with 64
and 8 query heads (the head count is a run-time argument: 64 stands for every count Triton
specialises alike, V4-Pro's 128 included, 8 for a tensor-parallel rank's few): training and
prefill forward and backward, and decode of 1 and 4 new tokens over the cache's ring and pages.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mlagen.aot import ARCHS, Compiler
from mlagen.runtime.compressed_cache import CachedAttention, CachedEntries, CompressorWrite
from tests.helpers import ROOT

SPECS = ("deepseek_v4_flash_sliding", "deepseek_v4_flash_csa", "deepseek_v4_flash_hca")
HEADS = (64, 8)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
META = torch.device("meta")
SEQ, CACHED, PAGE = 512, 4096, 64


def _kernels(spec: str):
    from mlagen.aot import load_kernels_module

    return load_kernels_module(ROOT / "generated" / spec / "kernels.py")


def launch_all(spec: str, heads: int, dtype_name: str) -> None:
    """Every launcher of one compressed package at one head count. Picklable (a worker of
    mlagen.aot.Compiler runs it)."""
    kernels, dtype = _kernels(spec), DTYPES[dtype_name]
    ops = kernels.COMPRESSED_OPS

    def empty(*shape, type_=dtype):
        return torch.empty(*shape, dtype=type_, device=META)

    def ints(*shape):
        return empty(*shape, type_=torch.int32)

    rate = {"csa": 4, "hca": 128}.get(spec.rsplit("_", 1)[1], 0)
    windows = SEQ // rate if rate else 0
    entries = empty(1, windows, 1, 512) if rate else None
    selected = ints(1, SEQ, 512) if spec.endswith("csa") else None
    for name, (launch, backward) in ops.compressors.items():  # the entries' and the indexer keys' compressor
        dim = int(name.split("_d")[1].split("_")[0])
        width = dim * (2 if spec.endswith("csa") else 1)
        kv, gate, bias = empty(1, SEQ, width), empty(1, SEQ, width), empty(rate, width, type_=torch.float32)
        norm, cos, sin = empty(dim, type_=torch.float32), empty(1, windows, 32), empty(1, windows, 32)
        out = launch(kv, gate, bias, norm, cos, sin, rate=rate, overlap=spec.endswith("csa"), eps=1e-6)
        backward(out[:, :, 0], kv, gate, bias, norm, cos, sin, rate=rate, overlap=spec.endswith("csa"), eps=1e-6)
        slots = rate * (2 if spec.endswith("csa") else 1)  # the unfinished window (and the overlap window)
        into = CompressorWrite(empty(CACHED // rate, PAGE, dim), ints(2, CACHED // rate // PAGE), PAGE,
                               empty(2, slots, width), empty(2, slots, width), ints(2), ints(2), ints(2), 1)
        launch(empty(2, 4, width), empty(2, 4, width), bias, norm, empty(2, 1, 32), empty(2, 1, 32), rate=rate,
               overlap=spec.endswith("csa"), eps=1e-6, into=into)
    for indexer in ops.indexers.values():
        indexer(empty(1, SEQ, 64, 128), empty(1, windows, 1, 128), empty(1, SEQ, 64), scale=128**-0.5,
                weight_scale=64**-0.5, rate=rate)
        for new in (1, 4):
            cached = CachedEntries(empty(CACHED // rate, PAGE, 128), ints(2, CACHED // rate // PAGE), PAGE, ints(2),
                                   ints(2), CACHED // rate, (CACHED // rate, CACHED // rate))
            indexer(empty(2, new, 64, 128), cached.pages, empty(2, new, 64), scale=128**-0.5, weight_scale=64**-0.5,
                    rate=rate, cached=cached)
    for launch, backward in ops.attentions.values():
        query, key, cos, sin = empty(1, SEQ, heads, 512), empty(1, SEQ, 1, 512), empty(1, SEQ, 32), empty(1, SEQ, 32)
        sinks = empty(heads, type_=torch.float32)
        out, lse = launch(query, key, entries, selected, sinks, cos, sin, scale=512**-0.5, window=128, rate=max(rate, 1))
        backward(out, query, key, entries, selected, sinks, cos, sin, out, lse, scale=512**-0.5, window=128,
                 rate=max(rate, 1))
        for new in (1, 4):
            pages = empty(CACHED // max(rate, 1), PAGE, 512) if rate else None
            cached = CachedAttention(empty(2, 128, 512), ints(2), ints(2), ints(2, max(1, CACHED // max(rate, 1) // PAGE)),
                                     PAGE if rate else 0)
            launch(empty(2, new, heads, 512), empty(2, new, 1, 512), pages,
                   ints(2, new, 512) if selected is not None else None, sinks, empty(2, new, 32), empty(2, new, 32),
                   scale=512**-0.5, window=128, rate=max(rate, 1), cached=cached)


@pytest.mark.slow
def test_compressed_kernels_compile_as_launched_for_sm80_to_sm120_without_spills():
    # fp16 and bf16 compile alike but for the element type; the few-heads specialisation once, in bf16.
    cases = [(heads, "bf16") for heads in HEADS] + [(HEADS[0], "fp16")]
    calls = [
        (functools.partial(launch_all, spec, heads, dtype), arch)
        for spec in SPECS for heads, dtype in cases for arch in ARCHS
    ]
    with Compiler(workers=2) as compiler:
        captured = compiler.capture(calls)
        launches = [launch for found in captured for launch in found]
        readings = compiler.compile(launches)
    kernels = {launch.kernel for launch in launches}
    assert kernels == {
        "compress_d512_rope64", "compress_d512_rope64_bwd", "compress_d128_rope64", "compress_d128_rope64_bwd",
        "entry_indexer_logits_d128", "compressed_attention_d512_rope64", "compressed_attention_d512_rope64_bwd",
    }
    assert {launch.arch for launch in launches} == set(ARCHS)
    for launch in launches:
        compiled = readings[launch.cache_key]
        what = f"{launch.kernel} sm_{launch.arch} w{launch.num_warps} {launch.constant}: {compiled}"
        assert not compiled.error, what
        assert compiled.spill_bytes == 0, what
        assert 0 < compiled.registers <= 255, what
        assert compiled.shared_bytes <= ARCHS[launch.arch].smem_per_block, what
        if not launch.kernel.startswith("compress_"):  # the compressor pools with elementwise math, no matmul
            assert compiled.tensor_core_ops > 0, what
