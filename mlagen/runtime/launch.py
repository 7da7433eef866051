"""Where kernels run, and with which block sizes.

Triton decides at `@triton.jit` time whether a kernel is interpreted
(TRITON_INTERPRET=1): then it runs on CPU tensors. Otherwise it needs CUDA
tensors, and CPU inputs fall back to the plain-torch reference path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Split-KV factor of the decode kernel; None lets split_count() choose from the GPU and shape.
    num_splits: int | None = None


# Small tiles under the interpreter keep tests fast and make short test
# sequences span several blocks, so block-boundary masking is exercised.
INTERPRETER_CONFIG = BlockConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def device_arch(device: torch.device) -> int:
    """Compute capability as one number (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def default_config(
    head_dim_qk: int, head_dim_v: int, device: torch.device, arch: int | None = None
) -> BlockConfig:
    """A static config that compiles without spills for the shipped head dims on
    sm_80 and sm_90 (checked ahead of time by tests/test_gpu_compile.py);
    `mlagen tune` replaces it per GPU. `arch` defaults to the device's."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    arch = arch or device_arch(device)
    if arch >= 90 or head_dim_qk + head_dim_v > 256:
        # 8 warps split the 128-row tile: 212 registers for d=128 on sm_90, 255 for MLA's 192+128.
        return BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=3 if arch >= 90 else 2)
    # On sm_80 the 128-row tile spills at d=128, and 64 rows on 4 warps spill 8 bytes
    # with Triton 3.7; 64 rows on 8 warps fit (249-253 registers) on Triton 3.7 and 3.9.
    return BlockConfig(block_m=64, block_n=64, num_warps=8, num_stages=3)


def default_backward_config(
    head_dim_qk: int, head_dim_v: int, device: torch.device, arch: int | None = None
) -> BlockConfig:
    """The backward kernels hold K, V, dK, dV (or Q, dO, dQ) tiles at once, so tiles are
    smaller than the forward's; spill-free on sm_80 and sm_90 (tests/test_gpu_compile.py)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    arch = arch or device_arch(device)
    if head_dim_qk + head_dim_v > 256 and arch < 90:
        # MLA's dK/dV tile (192 + 128 wide, plus the fp32 rope-key partial) spills at 64 keys on sm_80.
        return BlockConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    return BlockConfig(block_m=32, block_n=64, num_warps=8, num_stages=1)


def default_decode_config(query_rows: int, device: torch.device) -> BlockConfig:
    """block_m is the number of (token, head) rows per program, which share each cache page read."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    # The [rows, 512] fp32 accumulator dominates registers: 16 rows fit 4 warps with
    # 16-key tiles, 32 rows need 8 warps (both spill-free on sm_80 and sm_90).
    if query_rows <= 16:
        return BlockConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
    return BlockConfig(block_m=32, block_n=32, num_warps=8, num_stages=2)


def is_interpreted(kernel: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def use_kernels(tensor: torch.Tensor, kernel: object) -> bool:
    """True when the generated kernels can run on `tensor`'s device."""
    if tensor.is_cuda:
        if is_interpreted(kernel):
            raise ValueError(
                "CUDA tensors given, but the kernels were imported with TRITON_INTERPRET=1; "
                "unset it before importing the generated module"
            )
        return True
    if tensor.device.type == "cpu" and is_interpreted(kernel):
        if tensor.dtype == torch.bfloat16:
            # The interpreter's tl.dot multiplies bf16 operands' raw bits (Triton issue 11584):
            # the kernels would return garbage, so bf16 on CPU takes the reference path.
            warn_once(
                "mlagen: the Triton interpreter cannot multiply bf16 (Triton issue 11584); "
                "running the plain-torch reference path for bf16 on CPU (use fp32 or fp16 to run the kernels)"
            )
            return False
        return True
    warn_once(
        f"mlagen: no Triton kernels for {tensor.device.type} tensors without TRITON_INTERPRET=1; "
        "running the plain-torch reference path"
    )
    return False
