"""The compressed (DeepSeek-V4) kernels compile, as their launchers launch them, for every GPU
generation from sm_80 to sm_120, in bf16 and fp16, within their limits. No GPU: mlagen.aot
captures each launcher call on meta tensors under a stand-in driver (the exact specialisation
a launch on that GPU gets) and reads the cubin.

The shapes are DeepSeek-V4-Flash's (head dim 512, rope 64, indexer 64 heads of 128), with 64
and 8 query heads (the head count is a run-time argument: 64 stands for every count Triton
specialises alike, V4-Pro's 128 included, 8 for a tensor-parallel rank's few): training and
prefill forward and backward, and decode of 1 and 4 new tokens over the cache's ring and pages;
the launches are `mlagen inspect`'s (mlagen.family_calls), its shape among them.

Every kernel spills nothing and fits its arch's shared memory, and the matmul kernels run on
that arch's own tensor cores (mlagen.aot.problems: HMMA on sm_80/89/120, HGMMA on sm_90,
tcgen05 on sm_100); what today's kernels miss is listed in GAPS with the reason.
"""

from __future__ import annotations

import pytest

from mlagen import family_calls
from mlagen.aot import ARCHS, Compiler, problems
from mlagen.family_calls import Problem
from mlagen.spec import load_spec
from tests.helpers import ROOT
from tests.helpers import SPECS as SPEC_DIR

SPECS = ("deepseek_v4_flash_sliding", "deepseek_v4_flash_csa", "deepseek_v4_flash_hca")
HEADS = (64, 8)
SEQ, CACHED = 512, 4096


def calls() -> list[tuple]:
    """Every launcher of each compressed package, as `mlagen inspect` launches them
    (mlagen.family_calls): compressors, indexer and attention forward and backward over SEQ
    tokens, and decode steps of 1 and 4 new tokens of two sequences over the cache's ring and
    pages; and the shape the arch matrix inspects (tests/test_gpu_compile.py), whose kernels
    then compile once, here or there. fp16 and bf16 compile alike but for the element type:
    the few-heads specialisation once, in bf16."""
    found = []
    for spec in SPECS:
        (use,) = family_calls.family_uses(load_spec(SPEC_DIR / f"{spec}.yaml"))
        kernels_file = ROOT / "generated" / spec / "kernels.py"
        for dtype in ("bf16", "fp16"):
            shapes = [Problem.of(1, 4096)] + [
                Problem(1, SEQ, CACHED, new, decode_batch=2, heads=heads)
                for heads in HEADS[: 1 if dtype == "fp16" else None]
                for new in (1, 4)
            ]
            for problem in shapes:
                for part, call in family_calls.calls(kernels_file, use, problem, dtype):
                    if part == "decode" or problem.new_tokens == 1:  # the prefill passes once per head count
                        found += [(call, arch) for arch in ARCHS]
    return found


MATMUL = ("entry_indexer_logits_d128", "compressed_attention_d512_rope64", "compressed_attention_d512_rope64_bwd")
# (kernel, archs) -> why its dots are not all on the arch's own tensor-core instruction
# (mlagen.aot.problems): the test fails on a new miss and on a listed one that no longer
# happens (then delete it).
GAPS: dict[tuple[str, str], str] = {}


@pytest.mark.slow
def test_compressed_kernels_compile_as_launched_for_sm80_to_sm120_within_their_limits(compile_cache):
    with Compiler(workers=2) as compiler:
        captured = compiler.capture(calls())
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
