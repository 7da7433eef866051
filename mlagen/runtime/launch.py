"""Where kernels run, and with which block sizes.

Triton decides at `@triton.jit` time whether a kernel is interpreted
(TRITON_INTERPRET=1): then it runs on CPU tensors. Otherwise it needs CUDA
tensors, and CPU inputs fall back to the plain-torch reference path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Split-KV factor of the decode kernel; None lets runtime.attention.decode_splits() choose from the GPU and shape.
    num_splits: int | None = None
    # Keys per step of the backward's dQ kernel (it holds block_n queries); None: block_m, as
    # dK/dV streams. dQ keeps fewer fp32 accumulators than dK/dV (MLA: 192 columns against
    # 320), so it can stream a wider tile than dK/dV fits.
    dq_block_n: int | None = None

    @property
    def dq_keys(self) -> int:
        """Keys per step of the backward's dQ kernel."""
        return self.dq_block_n or self.block_m


# Small tiles under the interpreter keep tests fast and make short test
# sequences span several blocks, so block-boundary masking is exercised.
INTERPRETER_CONFIG = BlockConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def device_arch(device: torch.device) -> int:
    """Compute capability as one number (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@dataclass(frozen=True, slots=True)
class LaunchTarget:
    """The GPU a launch stands for while its tensors are on no GPU. mlagen.aot calls the
    generated launchers with meta (or CPU) tensors under a stand-in Triton driver to capture
    exactly what they would launch on that GPU; the launchers' own choices (default tiles,
    split-KV count) then follow this target as they follow a CUDA device."""

    arch: int  # 90 for sm_90
    sms: int  # streaming multiprocessors


_target: ContextVar[LaunchTarget | None] = ContextVar("mlagen_launch_target", default=None)


@contextmanager
def launching_for(target: LaunchTarget) -> Iterator[None]:
    token = _target.set(target)
    try:
        yield
    finally:
        _target.reset(token)


def launch_arch(device: torch.device) -> int | None:
    """The arch a launch on `device` compiles for: a CUDA device's, else the LaunchTarget's
    while one is set (an AOT capture), else None (the interpreter)."""
    if device.type == "cuda":
        return device_arch(device)
    target = _target.get()
    return target.arch if target is not None else None


def multiprocessor_count(device: torch.device) -> int | None:
    """SMs of the GPU a launch on `device` runs on (as launch_arch), None under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    target = _target.get()
    return target.sms if target is not None else None


# How a program of the sparse and compressed forwards keeps its 512-wide output (their COLUMNS
# constexpr): "split", two programs per row block, one column half each (each computes the
# score tile); "halves", one program with both halves' accumulators; "whole", one program with
# one accumulator whose N two warpgroups split.
COLUMN_LAYOUTS = ("split", "halves", "whole")


def programs_along_columns(columns: str) -> int:
    """Programs per row block along the output's columns; a layout the kernels do not know is
    an error here, not a kernel that stores one half of the output."""
    if columns not in COLUMN_LAYOUTS:
        raise ValueError(f"columns={columns!r}: choose one of {', '.join(COLUMN_LAYOUTS)}")
    return 2 if columns == "split" else 1


def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton this process compiles with: where two versions lay out a
    kernel's shared memory very differently, a default tile depends on it. (Imported here:
    the launch helpers are imported without compiling anything.)"""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def smem_class(arch: int) -> str:
    """What a CTA may hold in shared memory on `arch`: "large" (227 KB: sm_90, sm_100 and
    the other datacenter parts from Hopper on), "ampere" (163 KB: sm_80, sm_87) or "small"
    (99 KB: sm_86, sm_89 and the sm_12x consumer Blackwells)."""
    if arch >= 90 and arch // 10 != 12:
        return "large"
    return "ampere" if arch in (80, 87) else "small"


def _wide_elements(dtype: torch.dtype | None) -> bool:
    # fp32 (tf32 dots) and fp64 tiles take twice the shared memory and registers of 16-bit ones.
    return dtype is not None and dtype.itemsize >= 4


# The defaults below compile without spills and within the arch's shared memory for the
# shipped head dims (128/128 and MLA's 192/128), in bf16, fp16 and fp32, on sm_80, sm_89,
# sm_90, sm_100 and sm_120, as launched (tests/test_gpu_compile.py, the arch matrix);
# `mlagen tune` replaces them per GPU. Measured with Triton 3.9: `mlagen inspect --arch all`.


def default_config(
    head_dim_qk: int,
    head_dim_v: int,
    device: torch.device,
    arch: int | None = None,
    dtype: torch.dtype | None = None,
) -> BlockConfig:
    """The forward's static config on `arch` (default: the device's) for `dtype`."""
    arch = arch or launch_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    room, mla = smem_class(arch), head_dim_qk + head_dim_v > 256
    if _wide_elements(dtype):
        if room == "small":
            # 96 KB for MLA; at d=128 ptxas holds 64x32 tiles to 168 registers on sm_120 and
            # spills 56 bytes, 32x64 fits there (142 registers, 89 KB) but spills 8 on sm_89.
            if mla or arch // 10 != 12:
                return BlockConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
            return BlockConfig(block_m=32, block_n=64, num_warps=4, num_stages=2)
        if room == "ampere":
            # 144 KB for MLA; 8 warps: on 4 the decode launch (split keys, packed query heads)
            # spills 8-128 bytes (255 registers), on 8 it holds 181-188
            return BlockConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
        # 128x64 on 8 warps: 192 KB at d=128 on sm_90, 257 KB on sm_100 (tcgen05 stages more),
        # where 64x64 on 4 warps takes 224 KB; MLA's 192-wide K takes 256 KB there, so 64x32.
        if mla:
            return BlockConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
        if arch >= 100:
            return BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
        return BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    if room == "large" and arch < 100:
        # The tutorial's 128x128 tile on 8 warps (one 64-row wgmma per warpgroup), keys and values
        # through TMA: 255 registers, 225 KB with 3 stages at d=128 on sm_90; MLA's 192-wide
        # keys take 209 KB with 2 stages (3 would need 289 KB).
        return BlockConfig(block_m=128, block_n=128, num_warps=8, num_stages=2 if mla else 3)
    if room == "large":
        # On sm_100 the 128x128 tile spills 24-112 bytes (8 warps) or more (4 warps); 128x64
        # fits in 190 (d=128) and 200 (MLA) registers, 129 and 145 KB with 3 stages.
        return BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    if room != "ampere" or mla:
        # 8 warps split the 128-row tile: 255 registers for MLA's 192+128; 2 stages (MLA: 88 KB).
        # On sm_120 64 rows on 8 warps spill 8-16 bytes at d=128 (ptxas keeps them to 128 registers).
        return BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    # On sm_80 the 128-row tile spills at d=128, and 64 rows on 4 warps spill 8 bytes
    # with Triton 3.7; 64 rows on 8 warps fit (249-253 registers) on Triton 3.7 and 3.9.
    return BlockConfig(block_m=64, block_n=64, num_warps=8, num_stages=3)


def separate_full_tiles(
    head_dim_qk: int, device: torch.device, arch: int | None = None, dtype: torch.dtype | None = None
) -> bool:
    """Whether the forward runs the key tiles every query of its block sees in a loop of their
    own, without masks (the masked loop then takes only the edges). Not where that second loop
    spills (measured with Triton 3.9): with mma.sync it keeps more of the query tile in
    registers, so 16-bit MLA-wide query tiles (over 128 columns) on sm_89 and sm_120 (200 ->
    255 registers on sm_120) and fp32 on sm_120 (where ptxas holds 64x32 tiles to 168
    registers and spills 32-56 bytes) keep the one masked loop."""
    arch = arch or launch_arch(device)
    if arch is None or smem_class(arch) != "small":
        return True
    return _wide_elements(dtype) or head_dim_qk <= 128


def packs_gqa(
    seqlen_q: int, head_group: int, block_m: int, device: torch.device, arch: int | None = None
) -> bool:
    """Whether the forward packs the head_group query heads of a key head into one program's
    rows ((token, head) pairs). Only where that leaves fewer padded rows: decode and short
    queries (one new token and 8 query heads per key head: one 128-row program with 8 rows in
    use instead of 8 programs with 1 each, every key tile read once, not 8 times). Prefill whose
    length is a multiple of block_m gains no rows and keeps the unpacked tiles. Not on sm_89 and
    sm_120 (measured with Triton 3.9, llama3_8b decode, bf16): there the packed rows' token and
    head indices take ptxas to 255 registers and 48-64 spilled bytes at 128x64 (206 unpacked),
    and 16-56 at 64x64; sm_80, sm_90 and sm_100 pack with 0 spills and 1-3 more registers."""
    if head_group <= 1:
        return False
    arch = arch or launch_arch(device)
    if arch is not None and smem_class(arch) == "small":
        return False
    unpacked_rows = head_group * -(-seqlen_q // block_m) * block_m
    packed_rows = -(-(seqlen_q * head_group) // block_m) * block_m
    return packed_rows < unpacked_rows


def masked_steps_stages(
    config: BlockConfig, head_dim_qk: int, head_dim_v: int, device: torch.device
) -> int | None:
    """Pipeline stages of the dK/dV kernel's masked loops (a causal diagonal's few steps, a
    window's edges); None: the launch's num_stages, as its unmasked loop. On sm_90, MLA's 320
    fp32 dK/dV columns beside a pipelined masked loop's prologue spilled 64 B at 32 streamed rows
    (31 local loads and stores a program, outside the unmasked loop); with those loops
    unpipelined 32 rows fit: 254 registers, 0 spilled, 187.5 issue-clocks per 1K scores against
    266 at 16 rows. Elsewhere unpipelined masked loops cost issue slots (D128 on sm_90: 165.5
    against 148) or spill (MLA on sm_80 at 16 rows: 72 B), so they stay pipelined."""
    mla = head_dim_qk + head_dim_v > 256
    if mla and config.block_m >= 32 and launch_arch(device) == 90:
        return 1
    return None


def default_backward_config(
    head_dim_qk: int,
    head_dim_v: int,
    device: torch.device,
    arch: int | None = None,
    dtype: torch.dtype | None = None,
    edge_masks: bool = False,
) -> BlockConfig:
    """The backward kernels' tile as Triton's tutorial 06 shapes it: block_n rows held by a
    program (dK/dV: keys, dQ: queries; the M of every dot, so 64 or more where wgmma /
    tcgen05 should run it) and block_m rows of the other side streamed per step by dK/dV,
    dq_block_n (None: block_m) by dQ. The held fp32 dK and dV (dQ) accumulators bound the
    tile: on sm_90 32 x 128 keeps MLA's 192 + 128 wide dK/dV within 255 registers only at one
    stage, so MLA streams 16 rows there; tcgen05 (sm_100) keeps them in tensor memory, and
    dQ's 192 columns leave room for 64 keys a step on both. `edge_masks`: the launch has a
    sliding window or a group mask, whose masked loops hold more than a causal diagonal's (dQ
    then streams as dK/dV does on sm_90 and sm_120)."""
    arch = arch or launch_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    room, mla = smem_class(arch), head_dim_qk + head_dim_v > 256
    if _wide_elements(dtype):
        if mla:  # MLA's fp32 dK/dV of 64 keys spills on every arch: mma.sync tiles (issue 15)
            return BlockConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
        if room == "small":
            # ptxas keeps sm_120 kernels to 168 registers on 4 warps and 128 on 8: 16 rows, 1 stage
            return BlockConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
        if room == "ampere":
            return BlockConfig(block_m=32, block_n=64, num_warps=4, num_stages=2)  # 112 KB
        return BlockConfig(block_m=16, block_n=128, num_warps=8, num_stages=2)  # 160-176 KB
    if arch // 10 == 12:
        # 128 held keys spill on sm_120 (ptxas keeps fewer registers there); mma.sync anyway.
        # dQ streams twice dK/dV's rows (MLA: 741 issue-clocks per 1K scores for both kernels
        # against 928 at one step; D128: 440 against 464), except under edge masks (8 B spill).
        return BlockConfig(
            block_m=16 if mla else 32,
            block_n=32,
            num_warps=4,
            num_stages=2,
            dq_block_n=None if edge_masks else 32 if mla else 64,
        )
    if room != "large":  # sm_80, sm_86, sm_89
        # mma.sync holds more per thread: the masked loops of window and chunk masks spill 32 rows
        # of dK/dV, and MLA's dQ 32 (D128's dQ fits 32 keys a step: 137.5 issue-clocks per 1K
        # scores against 152 at 16). 72-90 KB: sm_86/89's 99 KB hold it (MLA on sm_89: 418 for
        # both kernels against 858 at 16 x 32; D128: 359 against 449 at 32 x 32).
        return BlockConfig(block_m=16, block_n=128, num_warps=8, num_stages=2, dq_block_n=None if mla else 32)
    # dQ keeps fewer accumulators than dK/dV and streams 64 keys a step on both archs (MLA, sm_90:
    # 99.5 issue-clocks per 1K scores against 233 at dK/dV's 16 rows; D128: 84 against 120),
    # except under edge masks on sm_90, where the window's masked loop spills 56 B at 64 keys.
    dq_keys = None if edge_masks and arch == 90 else 64
    if mla and arch == 90:
        # wgmma keeps MLA's 320 columns of dK/dV in registers (160 a thread): 32 streamed rows
        # fit 2 stages with the masked steps unpipelined (masked_steps_stages): 187.5
        # issue-clocks per 1K scores against 266 at 16 rows.
        return BlockConfig(block_m=32, block_n=128, num_warps=8, num_stages=2, dq_block_n=dq_keys)
    # wgmma keeps dK, dV in registers: on sm_90 a third stage spills the sliding-window dK/dV
    # and saves no issue slots. tcgen05 keeps them (MLA's too) in tensor memory; there 2 stages
    # cap D128's dQ at 128 registers (sliding window spills) and 3 fit. MLA's dQ takes 241 KB
    # at 3 stages with Triton 3.6 (201 KB with 3.9), more than the 227 KB a block may have: 2
    # (the same issue slots with 3.9: 196 + 100.75 clocks per 1K scores against 201 + 100).
    stages = 2 if arch == 90 or mla else 3
    return BlockConfig(block_m=32, block_n=128, num_warps=8, num_stages=stages, dq_block_n=dq_keys)


def decode_column_halves(
    device: torch.device, arch: int | None = None, dtype: torch.dtype | None = None
) -> bool:
    """Whether a decode program keeps half of the latent output columns, two programs per row
    block (each computing the whole score tile and reading the whole cache tile), rather than
    all of them (templates/_mla_decode.jinja). All columns where wgmma (sm_90) and tcgen05
    (sm_100) read the operand tiles from shared memory; halves on the mma.sync archs and in
    fp32, whose operand tiles sit in registers: a [64, 512] fp32 accumulator spills there.
    Under the interpreter as on sm_90: 16-bit in one program, fp32 in halves."""
    arch = arch or launch_arch(device)
    return _wide_elements(dtype) or (arch is not None and smem_class(arch) != "large")


def default_decode_config(
    query_rows: int, device: torch.device, arch: int | None = None, dtype: torch.dtype | None = None
) -> BlockConfig:
    """block_m is the number of (token, head) rows per program, which share each cache tile
    read; a program keeps all of the 512-wide latent output, or half of it where
    decode_column_halves says so (templates/_mla_decode.jinja)."""
    arch = arch or launch_arch(device)
    if arch is None:
        return INTERPRETER_CONFIG
    room = smem_class(arch)
    if _wide_elements(dtype):
        # fp32 (tf32 dots): a 64-row tile spills on every arch; 32 rows fit 227 KB (148 KB),
        # 32 x 16 keys fit sm_80 (124 KB) and 16 x 16 the 99 KB parts (88 KB).
        if room == "large":
            return BlockConfig(block_m=32, block_n=32, num_warps=8, num_stages=2)
        if room == "ampere":
            return BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
        return BlockConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
    if room == "large":
        # 64 rows make every dot M=64 and all 512 columns stay in one program: wgmma on sm_90 (8
        # warps, two warpgroups each holding half of the [64, 512] fp32 accumulator: 244
        # registers, 224 KB with Q and two 64-key stages), tcgen05 on sm_100 (the accumulator in
        # tensor memory; 64 keys take 281 KB there, the latent tile triple-buffered: 32 keys,
        # 177 KB). Fewer rows are padding inside the program.
        return BlockConfig(block_m=64, block_n=64 if arch // 10 == 9 else 32, num_warps=8, num_stages=2)
    # mma.sync parts: tiles no taller than the rows (16-row steps), so few heads waste little.
    if query_rows <= 16:
        return BlockConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
    if room == "small":
        # 99 KB: 64 rows leave room for 16-key tiles only; 32 x 32 on 4 warps spills on sm_120
        return BlockConfig(block_m=32, block_n=32, num_warps=8, num_stages=2)
    if query_rows <= 32:
        return BlockConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    return BlockConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)  # sm_80: 216 registers, 152 KB


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
