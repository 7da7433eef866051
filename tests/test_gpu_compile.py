"""Every shipped spec's kernels compile ahead of time for sm_90 and sm_80 with
their default block config, without spilling registers, and their attention
kernels run on tensor cores (HGMMA / HMMA in the SASS; bf16 inputs). No GPU
needed: Triton compiles for a GPUTarget and cuobjdump reads the cubin."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton.language as tl

from mlagen.aot import CompileJob, compile_jobs
from mlagen.runtime.launch import default_backward_config, default_config, default_decode_config
from tests.helpers import ROOT, SPECS, generated

SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml") if not p.stem.startswith("tiny_"))
ARCHS = (90, 80)


def _jobs() -> list[CompileJob]:
    jobs: dict[tuple[str, int], CompileJob] = {}
    for spec in SHIPPED:
        kernels = generated(spec).kernels
        for name, (d_a, d_b, d_v) in kernels.HEAD_DIMS.items():
            for arch in ARCHS:
                for kernel, choose in ((name, default_config), (f"{name}_bwd_dkdv", default_backward_config),
                                       (f"{name}_bwd_dq", default_backward_config)):
                    config = choose(d_a + d_b, d_v, torch.device("cuda"), arch=arch)
                    # A kernel name fixes its template parameters, so compile each name once.
                    jobs.setdefault((kernel, arch), CompileJob(
                        str(ROOT / "generated" / spec / "kernels.py"), kernel, arch, "bf16", config.num_warps,
                        config.num_stages, dict(HEAD_GROUP=1, DOT_PRECISION="tf32", ACC_DTYPE=tl.float32, CAUSAL=True, WINDOWED=False,
                                                GROUP_MASK=0, BLOCK_M=config.block_m, BLOCK_N=config.block_n)))
        kernels_file = str(ROOT / "generated" / spec / "kernels.py")
        if hasattr(kernels, "DECODE"):  # mla: the cache append, split-KV decode and combine kernels
            decode = kernels.DECODE.attention.__name__.removesuffix("_launch")
            for arch, rows in ((90, 128), (80, 128), (90, 8)):  # many heads, and a TP rank's few
                config = default_decode_config(rows, torch.device("cuda"))
                flags = dict(CAUSAL=True, DOT_PRECISION="tf32", ACC_DTYPE=tl.float32, BLOCK_H=config.block_m,
                             BLOCK_N=config.block_n)
                for kernel, num_warps, constexprs in (
                    (f"{decode}_append", 4, dict(PAGE=64)),
                    (decode, config.num_warps, dict(PAGE=64, **flags)),
                    (f"{decode}_combine", 4, dict(PAD_SPLITS=16)),
                ):
                    jobs.setdefault((kernel, arch, rows), CompileJob(kernels_file, kernel, arch, "bf16", num_warps,
                                                                     config.num_stages, constexprs))
    ordered = sorted(jobs.values(), key=lambda job: (job.kernel, job.arch))
    # The mask and grouping flags change the compiled code too: window + GQA, and the latent chunk masks.
    base = next(job for job in ordered if job.arch == 90 and job.kernel == "attention_fwd_qk128_v128")
    for flags in (dict(HEAD_GROUP=4, WINDOWED=True), dict(CAUSAL=False, GROUP_MASK=1), dict(CAUSAL=False, GROUP_MASK=2)):
        ordered.append(dataclasses.replace(base, constexprs={**base.constexprs, **flags}))
    return ordered


@pytest.mark.slow
def test_default_forward_and_backward_configs_compile_for_sm90_and_sm80_without_spills_on_tensor_cores():
    jobs = _jobs()
    results = compile_jobs(jobs)
    assert {r.arch for r in results} == set(ARCHS)
    for job, compiled in zip(jobs, results, strict=True):
        what = f"{job.kernel} sm_{job.arch}: {compiled}"
        assert compiled.spill_bytes == 0, what
        assert 0 < compiled.registers <= 255, what
        assert compiled.shared_bytes <= (227 if job.arch == 90 else 163) * 1024, what
        if not job.kernel.endswith(("_append", "_combine")):  # the cache write and the merge have no matmul
            assert compiled.tensor_core_ops > 0, what
