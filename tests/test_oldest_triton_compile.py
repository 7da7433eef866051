"""Under the oldest Triton pyproject allows (3.6, torch 2.11's and the lent GPU machine's), the
kernels whose default tiles depend on the Triton version (runtime.launch.triton_version) compile,
as launched, for sm_90 and sm_100 within the arch's shared memory, on its own tensor cores, and
with no local-memory load or store inside their hot loop: 3.6 lays some programs out so that
they spill where 3.9 does not, and those tiles were chosen to keep such spills out of the loop
(BENCHMARKS.md, "With Triton 3.6"). Spilled bytes kept over a loop are allowed here, unlike the
arch matrix of tests/test_gpu_compile.py (which 3.9 passes and 3.6 would not: one reload a step
in the MLA decode, listed below). Runs in `make test-oldest`; skipped under a newer Triton."""

from __future__ import annotations

import pytest

from mlagen.aot import problems
from mlagen.autotune import Shape
from mlagen.inspect_kernels import inspect_specs
from mlagen.runtime.launch import triton_version
from mlagen.spec import load_spec
from tests.helpers import SPECS as SPEC_DIR

pytestmark = pytest.mark.skipif(triton_version() >= (3, 9), reason="the oldest-Triton stage's test (3.6)")

SPECS = ("deepseek_v3", "mistral_7b", "deepseek_v32", "deepseek_v4_flash_csa", "deepseek_v4_flash_hca")
ARCHS = (90, 100)
# (kernel, arch) -> local loads and stores its hot loop may keep, and why.
LOOP_SPILLS = {
    ("mla_decode_lat512_rope64", 90): (1, "one loop-invariant address reloaded a step; 0 at one stage, unpipelined"),
}


@pytest.mark.slow
def test_version_dependent_tiles_keep_spills_out_of_the_hot_loop(compile_cache):
    """`mlagen inspect`'s launches (prefill 4096 tokens, decode of one over 4096 cached), bf16."""
    specs = [load_spec(SPEC_DIR / f"{name}.yaml") for name in SPECS]
    rows = [row for row in inspect_specs(specs, list(ARCHS), Shape(1, 4096), dtypes=["bf16"], workers=2)
            if row.kind == "mlagen"]
    assert {row.arch for row in rows} == set(ARCHS) and {row.spec for row in rows} == set(SPECS)
    found, listed = [], set()
    for row in rows:
        reading = row.compiled
        where = f"{row.spec} {row.kernel} sm_{row.arch} {row.settings}"
        matmul = reading.tensor_core_ops > 0
        found += [f"{where}: {p}" for p in problems(reading, matmul=matmul) if not p.startswith("spills")]
        allowed, _ = LOOP_SPILLS.get((row.kernel, row.arch), (0, ""))
        if reading.loop_local > allowed:
            found.append(f"{where}: {reading.loop_local} local loads/stores in the hot loop")
        elif reading.loop_local:
            listed.add((row.kernel, row.arch))
    assert not found, "\n".join(found)
    assert listed == set(LOOP_SPILLS), f"no longer spilling inside the loop, delete: {set(LOOP_SPILLS) - listed}"
