"""Ahead-of-time compilation of generated kernels for a GPU architecture, on a
machine without a GPU: proves a kernel compiles for sm_80 / sm_90 and reads
its shared memory, registers and spills from the cubin, and counts its
tensor-core instructions (HGMMA, HMMA, ...) in the SASS.

Compilation runs in fresh worker processes with TRITON_INTERPRET=0: under
the interpreter `triton.jit` gives functions that cannot be compiled, and a
process that has run interpreted kernels has Triton's language ops patched.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Pointer args whose element type does not follow the kernel's dtype (statistics, partials, indices).
FIXED_POINTERS = {
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "DK_B": "*fp32",
    "O_PART": "*fp32",
    "LSE_PART": "*fp32",
    "PAGE_TABLE": "*i32",
    "SEQ_LENS": "*i32",
    "START": "*i32",
    "NEW_TOKENS": "*i32",
}
FLOAT_ARGS = ("qk_scale", "sm_scale", "eps")


@dataclass(frozen=True, slots=True)
class CompileJob:
    kernels_file: str
    kernel: str
    arch: int
    dtype: str
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    name: str
    arch: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    num_warps: int = 0
    # Tensor-core instructions in the SASS by opcode, e.g. (("HGMMA", 16),).
    mma: tuple[tuple[str, int], ...] = ()
    # Why compilation failed (compile_jobs(keep_going=True)); the numbers above are then 0.
    error: str = ""

    @property
    def tensor_core_ops(self) -> int:
        return sum(count for _, count in self.mma)


@cache
def _load_module(kernels_file: str | Path) -> ModuleType:
    path = Path(kernels_file)
    spec = importlib.util.spec_from_file_location(f"_mlagen_aot_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signature(
    kernel: Any, dtype: str, constexprs: dict[str, Any]
) -> tuple[dict[str, str], dict[tuple[int, ...], Any]]:
    signature: dict[str, str] = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in FIXED_POINTERS:
            signature[param.name] = FIXED_POINTERS[param.name]
        elif param.name.isupper():
            signature[param.name] = POINTER_DTYPES[dtype]
        elif param.name in FLOAT_ARGS:
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    names = [p.name for p in kernel.params]
    return signature, {(names.index(k),): v for k, v in constexprs.items()}


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: Path) -> tuple[int, int]:
    text = subprocess.run(
        [str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    registers = re.search(r"REG:(\d+)", text)
    # Spilled registers live in the thread's stack frame / local memory.
    spills = re.findall(r"\b(?:STACK|LOCAL):(\d+)", text)
    return (int(registers.group(1)) if registers else 0), sum(int(s) for s in spills)


def _tensor_core_ops(cubin: Path) -> tuple[tuple[str, int], ...]:
    """Matrix instructions in the SASS: HGMMA (sm_90 warpgroup MMA), HMMA (sm_80-style
    16-bit MMA, also on sm_90 for small tiles), IMMA, DMMA... fp32 dots in "ieee"
    precision compile to FFMA and count nothing here."""
    sass = subprocess.run(
        [str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    # The opcode follows the address comment and an optional predicate; HFMA2.MMA is an FMA, not one.
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z]+MMA)\b", sass)
    return tuple(sorted(Counter(opcodes).items()))


def compile_kernel(
    kernel: Any,
    *,
    arch: int,
    dtype: str,
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int,
    workdir: Path,
) -> CompiledKernel:
    """Compile for `sm_<arch>` without a GPU. Pointer args are the kernel's UPPERCASE
    non-constexpr params (in `dtype`, except FIXED_POINTERS), others i32 (fp32: FLOAT_ARGS)."""
    signature, constants = _signature(kernel, dtype, constexprs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    registers, spills = _resource_usage(cubin)
    return CompiledKernel(
        kernel.__name__, arch, compiled.metadata.shared, registers, spills, num_warps, _tensor_core_ops(cubin)
    )


def _run_job(job: CompileJob, keep_going: bool = False) -> CompiledKernel:
    # Triton 3.9 warns that its fp-fusion default will change; the AOT result follows
    # whatever a launch on the GPU would use, so the warning says nothing here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    try:
        module = _load_module(job.kernels_file)
        with tempfile.TemporaryDirectory(prefix="mlagen-aot-") as workdir:
            return compile_kernel(
                getattr(module, job.kernel),
                arch=job.arch,
                dtype=job.dtype,
                constexprs=job.constexprs,
                num_warps=job.num_warps,
                num_stages=job.num_stages,
                workdir=Path(workdir),
            )
    except Exception as exc:
        if not keep_going:
            raise
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        error = f"{type(exc).__name__}: {last_line}"[:300]
        return CompiledKernel(job.kernel, job.arch, 0, 0, 0, job.num_warps, error=error)


def _run_job_keep_going(job: CompileJob) -> CompiledKernel:
    return _run_job(job, keep_going=True)


def compile_jobs(
    jobs: list[CompileJob],
    workers: int = 2,
    *,
    keep_going: bool = False,
    progress: Callable[[Iterable[CompiledKernel], int], Iterable[CompiledKernel]] | None = None,
) -> list[CompiledKernel]:
    """Compile each job in a fresh process (see the module docstring); results in job order.
    keep_going: a job that fails gives a CompiledKernel with `error` set instead of raising.
    progress(results, total) may wrap the results as they arrive (a progress bar)."""
    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")
    saved = os.environ.get("TRITON_INTERPRET")
    # Workers copy the environment when they start, before they import triton.
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context) as pool:
            results = pool.map(_run_job_keep_going if keep_going else _run_job, jobs)
            return list(progress(results, len(jobs)) if progress else results)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
