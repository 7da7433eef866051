"""The compressed (DeepSeek-V4) kernels compile, as their launchers launch them, for every GPU
generation from sm_80 to sm_120, in bf16 and fp16, within their limits. No GPU: mlagen.aot
captures each launcher call on meta tensors under a stand-in driver (the exact specialisation
a launch on that GPU gets) and reads the cubin.

The shapes are DeepSeek-V4-Flash's (head dim 512, rope 64, indexer 64 heads of 128), with 64
and 8 query heads (the head count is a run-time argument: 64 stands for every count Triton
specialises alike, V4-Pro's 128 included, 8 for a tensor-parallel rank's few): training and
prefill forward and backward, and decode of 1 and 4 new tokens over the cache's ring and pages.

Every kernel spills nothing and fits its arch's shared memory, and the matmul kernels run on
that arch's own tensor cores (mlagen.aot.problems: HMMA on sm_80/89/120, HGMMA on sm_90,
tcgen05 on sm_100); what today's kernels miss is listed in GAPS with the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mlagen.aot import ARCHS, Compiler, problems
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


MATMUL = ("entry_indexer_logits_d128", "compressed_attention_d512_rope64", "compressed_attention_d512_rope64_bwd")
# (kernel, archs) -> why its dots are not all on the arch's own tensor-core instruction
# (mlagen.aot.problems): the test fails on a new miss and on a listed one that no longer
# happens (then delete it).
GAPS = {
    (
        "compressed_attention_d512_rope64_bwd",
        "sm_90 sm_100",
    ): "mma.sync: 16-row tiles; at 64 rows the [64, 256] fp32 dQ half and the loop-invariant wgmma "
    "descriptors of Q's and dO's four [64, 256] halves pass 255 registers (700-1300 B of spills on sm_90)",
}


@pytest.mark.slow
def test_compressed_kernels_compile_as_launched_for_sm80_to_sm120_within_their_limits(request, tmp_path_factory):
    # fp16 and bf16 compile alike but for the element type; the few-heads specialisation once, in bf16.
    cases = [(heads, "bf16") for heads in HEADS] + [(HEADS[0], "fp16")]
    calls = [
        (functools.partial(launch_all, spec, heads, dtype), arch)
        for spec in SPECS for heads, dtype in cases for arch in ARCHS
    ]
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("mlagen-compressed-matrix") if cache is not None else tmp_path_factory.mktemp("matrix")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLAGEN_CACHE_DIR", str(where))  # readings persist between runs
        with Compiler(workers=2) as compiler:
            captured = compiler.capture(calls)
            launches = [launch for found in captured for launch in found]
            readings = compiler.compile(launches)
    kernels = {launch.kernel for launch in launches}
    assert kernels == {
        "compress_d512_rope64", "compress_d512_rope64_bwd", "compress_d128_rope64", "compress_d128_rope64_bwd",
        *MATMUL,
    }  # the compressor pools with elementwise math, no matmul
    assert {launch.arch for launch in launches} == set(ARCHS)
    gaps = {
        (kernel, f"sm_{arch}") for (kernel, archs) in GAPS for arch in archs.removeprefix("sm_").split(" sm_")
    }
    found, unexpected = set(), []
    for launch in launches:
        where = (launch.kernel, f"sm_{launch.arch}")
        for problem in problems(readings[launch.cache_key], matmul=launch.kernel in MATMUL):
            if problem.startswith("not all") and where in gaps:
                found.add(where)
            else:
                unexpected.append(f"{where} w{launch.num_warps} {launch.constant}: {problem}")
    assert not unexpected, "\n".join(unexpected)
    fixed = sorted(where for where in gaps if where not in found)
    assert not fixed, f"no longer missing, delete from GAPS: {fixed}"
