"""Ahead-of-time compilation of generated kernels for a GPU architecture, on a
machine without a GPU: proves a kernel compiles for sm_80 / sm_90 and reads
its shared memory, registers and spills from the cubin.

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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
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


def _resource_usage(cubin: bytes, workdir: Path) -> tuple[int, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run(
        [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    registers = re.search(r"REG:(\d+)", text)
    # Spilled registers live in the thread's stack frame / local memory.
    spills = re.findall(r"\b(?:STACK|LOCAL):(\d+)", text)
    return (int(registers.group(1)) if registers else 0), sum(int(s) for s in spills)


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
    registers, spills = _resource_usage(compiled.asm["cubin"], workdir)
    return CompiledKernel(kernel.__name__, arch, compiled.metadata.shared, registers, spills)


def _run_job(job: CompileJob) -> CompiledKernel:
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


def compile_jobs(jobs: list[CompileJob], workers: int = 2) -> list[CompiledKernel]:
    """Compile each job in a fresh process (see the module docstring); results in job order."""
    context = multiprocessing.get_context("spawn")
    saved = os.environ.get("TRITON_INTERPRET")
    # Workers copy the environment when they start, before they import triton.
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context) as pool:
            return list(pool.map(_run_job, jobs))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
