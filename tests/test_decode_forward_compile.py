"""The dense forward as decode launches it compiles, as launched, without spilling and on the
arch's own tensor-core instruction, on every arch: the query heads of a key head packed into one
program's rows (mlagen.runtime.launch.packs_gqa: sm_80/90/100) and the keys split over programs
(the grid of one new token does not fill the GPU), plus the combine kernel that merges the splits.
No GPU: mlagen.aot captures the launcher's calls on meta tensors for each arch (the launcher
decides packing and splits per arch and SM count there, as on a GPU)."""

from __future__ import annotations

import functools

import pytest
import torch

from mlagen.aot import ARCHS, Compiler, load_kernels_module, mma_count
from mlagen.spec import load_spec
from tests.helpers import ROOT, SPECS

# Shipped specs whose query heads share key heads, and the dtypes a GPU runs them in.
GROUPED = sorted(
    p.stem
    for p in SPECS.glob("*.yaml")
    if not p.stem.startswith("tiny_")
    and load_spec(p).family in ("gqa", "mqa")
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
META = torch.device("meta")


def decode(spec: str, dtype_name: str, new_tokens: int, cached: int) -> None:
    """One decode step of `spec`'s forward over a cache (picklable: a Compiler worker runs it)."""
    kernels = load_kernels_module(ROOT / "generated" / spec / "kernels.py")
    (name,) = kernels.ATTENTION
    launch = getattr(kernels, f"{name}_launch")
    shape = load_spec(SPECS / f"{spec}.yaml")
    heads, kv_heads, dim = shape.heads, shape.kv_heads, shape.head_dim

    def empty(*size):
        return torch.empty(*size, dtype=DTYPES[dtype_name], device=META)

    launch(empty(1, new_tokens, heads, dim), None, empty(1, cached, kv_heads, dim), None,
           empty(1, cached, kv_heads, dim), scale=dim**-0.5, causal=True, window=shape.window)


@pytest.mark.slow
def test_decode_forward_compiles_without_spills_on_the_archs_tensor_cores(request, tmp_path_factory):
    assert GROUPED, "no shipped GQA/MQA spec"
    calls = [(functools.partial(decode, spec, dtype, 1, 4096), arch)
             for spec in GROUPED for dtype in DTYPES for arch in ARCHS]
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("mlagen-decode-forward") if cache is not None else tmp_path_factory.mktemp("packing")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLAGEN_CACHE_DIR", str(where))  # readings persist between runs
        with Compiler(workers=2) as compiler:
            launches = [launch for found in compiler.capture(calls) for launch in found]
            readings = compiler.compile(launches)
    packed_archs, split_archs, problems = set(), set(), []
    for launch in launches:
        compiled, arch = readings[launch.cache_key], ARCHS[launch.arch]
        where = f"{launch.kernel} sm_{launch.arch} {launch.constant}"
        if launch.constant.get("PACK_GQA"):
            packed_archs.add(launch.arch)
        if launch.constant.get("SPLIT_KV"):
            split_archs.add(launch.arch)
        if compiled.error:
            problems.append(f"{where}: {compiled.error}")
        elif compiled.spill_bytes or compiled.shared_bytes > arch.smem_per_block:
            problems.append(f"{where}: spills {compiled.spill_bytes} B, {compiled.shared_bytes} B shared")
        elif launch.kernel.endswith("_combine"):
            continue
        elif not mma_count(compiled, arch.tensor_core) or (arch.tensor_core != "HMMA" and mma_count(compiled, "HMMA")):
            problems.append(f"{where}: not all {arch.tensor_core}: {compiled.mma}")
    assert not problems, "\n".join(problems)
    assert packed_archs == {80, 90, 100}, packed_archs  # sm_89 and sm_120 keep unpacked tiles
    assert split_archs == set(ARCHS), split_archs  # 8 or 32 programs do not fill a GPU
    assert {launch.kernel for launch in launches if launch.kernel.endswith("_combine")}
