"""Autotuning: candidate configs from the IR and the kernel templates, static pruning by
ahead-of-time compilation, a static ranking model, and timing on a GPU.

    spec --IR--> attention uses (dims, heads, masks) --> launchers (forward, backward, decode)
      --> candidates: every BLOCK_* constexpr of the launcher's kernels (read from the
          generated source) x num_warps x num_stages, tiles powers of two bounded by the
          shape, by a register estimate from the head dims and by a shared-memory estimate
          from the tiles and stages (cheap rules: nothing compiled yet)
      --> the launcher called on meta tensors for the arch (mlagen.aot): exactly the kernels a
          launch builds, each distinct one compiled once (in parallel, cached on disk)
      --> drop spills, shared memory over the limit, failures
      --> rank statically (tune --static), or time with triton.testing.do_bench (tune)
      --> winners into the per-user cache (mlagen.runtime.tuning_cache)
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sympy
import torch

from mlagen import aot
from mlagen.aot import ARCHS, Arch, CompiledKernel, Launch
from mlagen.errors import MlagenError
from mlagen.ir import lower
from mlagen.ir.ops import B, Graph, OpKind, S, T
from mlagen.passes import run_pipeline
from mlagen.runtime import attention, tuning_cache
from mlagen.runtime.attention import GROUP_MASK_CODES, AttentionDims, padded
from mlagen.runtime.launch import (
    BlockConfig,
    LaunchTarget,
    decode_column_halves,
    default_backward_config,
    default_config,
    default_decode_config,
    launching_for,
)
from mlagen.runtime.paged_cache import PagedLatentCache
from mlagen.spec import GqaSpec, MlaSpec, Spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PAGE = inspect.signature(PagedLatentCache).parameters["page_size"].default


# --- the hardware model (mlagen.aot.ARCHS) -------------------------------------------------------


def parse_arch(text: str | int) -> int:
    """One arch (`sm_90` or `90`), for commands that tune for one."""
    archs = aot.parse_archs(text)
    if len(archs) != 1:
        raise MlagenError(f"--arch {text}: give one arch")
    return archs[0]


def occupancy(compiled: CompiledKernel, arch: Arch) -> int:
    """Resident warps per SM allowed by registers (allocated per warp in units of 256) and
    shared memory (plus 1 KB the driver reserves per CTA)."""
    if compiled.error or not compiled.num_warps:
        return 0
    regs_per_warp = math.ceil(max(compiled.registers, 1) * 32 / 256) * 256
    ctas = min(
        arch.regs_per_sm // regs_per_warp // compiled.num_warps,
        arch.smem_per_sm // (compiled.shared_bytes + 1024),
        arch.max_ctas,
        arch.max_warps // compiled.num_warps,
    )
    return max(ctas, 0) * compiled.num_warps


# --- what the IR says ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttentionUse:
    """One ATTENTION node of the spec's IR and the kernel variant that runs it."""

    node: str
    mode: str  # "prefill" or "decode"
    kernel: str  # variant name, e.g. attention_fwd_qk128_rope64_v128 or mla_decode_lat512_rope64
    d_a: int
    d_b: int
    d_v: int
    heads_q: int
    heads_k: int
    heads_kb: int  # heads of the second key part: 1 when shared (MLA's k_pe), 0 when absent
    seq_q: sympy.Expr  # query length over B, S (decode: S new tokens)
    seq_k: sympy.Expr  # key length (decode: T cached tokens)
    causal: bool
    window: int | None
    group_mask: tuple | None
    scale: float
    dtype: str

    @property
    def head_group(self) -> int:
        return self.heads_q // self.heads_k

    def lengths(self, shape: Shape) -> tuple[int, int]:
        values = {
            B: shape.batch,
            S: shape.new_tokens if self.mode == "decode" else shape.seq_len,
            T: shape.seq_len,
        }
        return int(self.seq_q.subs(values)), int(self.seq_k.subs(values))


@dataclass(frozen=True, slots=True)
class Shape:
    batch: int
    seq_len: int  # prefill: tokens; decode: cached tokens
    new_tokens: int = 1  # decode: query tokens per sequence

    def __str__(self) -> str:
        return f"batch {self.batch}, seq {self.seq_len}"


# The kernel families autotune tunes: their launchers look a config up in the tuning cache
# (their templates' *_launch and *_backward signatures). The sparse and compressed layers'
# launchers do not; `mlagen inspect` launches them through mlagen.family_calls.
LAUNCHABLE = ("attention_fwd_", "mla_decode_")


def _uses(graph: Graph, dtype: str) -> list[AttentionUse]:
    uses = []
    for node in graph.nodes:
        if node.op is not OpKind.ATTENTION or not node.attr("kernel").startswith(LAUNCHABLE):
            continue
        operands = [graph.node(name).shape for name in node.inputs]
        q, k = operands[0], operands[2 if len(operands) == 5 else 1]
        kb_heads = int(operands[3][2]) if len(operands) == 5 else 0
        uses.append(
            AttentionUse(
                node.name,
                graph.mode,
                node.attr("kernel"),
                node.attr("d_a"),
                node.attr("d_b"),
                node.attr("d_v"),
                int(q[2]),
                int(k[2]),
                kb_heads,
                q[1],
                k[1],
                bool(node.attr("causal")),
                node.attr("window"),
                node.attr("group_mask"),
                float(node.attr("scale")),
                dtype,
            )
        )
    return uses


def attention_uses(spec: Spec, dtype: str | None = None) -> list[AttentionUse]:
    """The attention nodes of the prefill graph and, for mla, the decode graph; mha/gqa/mqa
    decode from their K/V cache with the forward kernel: S new tokens over T cached keys."""
    dtype = dtype or spec.dtype
    uses = _uses(run_pipeline(lower(spec), "prefill"), dtype)
    if isinstance(spec, MlaSpec):
        uses += _uses(run_pipeline(lower(spec, "decode"), "decode"), dtype)
    elif isinstance(spec, GqaSpec) and spec.causal:
        uses += [replace(use, mode="decode", seq_q=S, seq_k=T) for use in uses]
    return uses


@dataclass(frozen=True, slots=True)
class Launcher:
    """A generated launcher and the kernels that share its BlockConfig: the unit of tuning."""

    use: AttentionUse
    role: str  # "forward", "backward" or "decode"
    kernels: tuple[str, ...]  # in the order the launcher passes them to tuned_config()
    entry: str  # the launcher function in kernels.py
    helpers: tuple[str, ...] = ()  # kernels it also launches, with fixed settings

    @property
    def label(self) -> str:
        return f"{self.use.kernel} {self.role} ({self.use.node})"

    @property
    def reads_latent_cache(self) -> bool:
        """The MLA absorbed decode over the paged latent cache; a dense (mha/gqa/mqa) decode
        is the forward kernel at a decode shape, tiled, estimated and called as the forward."""
        return self.role == "decode" and self.use.kernel.startswith("mla_decode_")


def launchers(use: AttentionUse) -> list[Launcher]:
    if use.mode == "decode" and use.kernel.startswith("attention_fwd_"):
        # few query rows over a long cache: split-KV, merged by the combine kernel
        return [
            Launcher(use, "decode", (use.kernel,), f"{use.kernel}_launch", (f"attention_v{use.d_v}_combine",))
        ]
    if use.mode == "decode":
        return [
            Launcher(
                use,
                "decode",
                (use.kernel,),
                f"{use.kernel}_launch",
                (f"{use.kernel}_append", f"{use.kernel}_combine"),
            )
        ]
    return [
        Launcher(use, "forward", (use.kernel,), f"{use.kernel}_launch"),
        Launcher(
            use,
            "backward",
            (f"{use.kernel}_bwd_dkdv", f"{use.kernel}_bwd_dq"),
            f"{use.kernel}_backward",
            ("_attention_bwd_delta",),
        ),
    ]


def all_launchers(spec: Spec, dtype: str | None = None) -> list[Launcher]:
    return [launcher for use in attention_uses(spec, dtype) for launcher in launchers(use)]


def default_for(launcher: Launcher, shape: Shape, arch: int) -> BlockConfig:
    """The launcher's static default on `arch` (what runs when the cache has no entry)."""
    use, cuda, dtype = launcher.use, torch.device("cuda"), DTYPES[launcher.use.dtype]
    if launcher.reads_latent_cache:
        return default_decode_config(use.heads_q * use.lengths(shape)[0], cuda, arch=arch, dtype=dtype)
    if launcher.role == "backward":
        return default_backward_config(
            use.d_a + use.d_b,
            use.d_v,
            cuda,
            arch=arch,
            dtype=dtype,
            edge_masks=use.window is not None or use.group_mask is not None,
        )
    return default_config(use.d_a + use.d_b, use.d_v, cuda, arch=arch, dtype=dtype)


def shape_key(launcher: Launcher, shape: Shape) -> str:
    """The cache's shape bucket, computed as the launcher computes it from its tensors."""
    use = launcher.use
    seq_q, seq_k = use.lengths(shape)
    if launcher.reads_latent_cache:
        return tuning_cache.decode_key(shape.batch, seq_q, use.heads_q, seq_k, causal=use.causal)
    dims = AttentionDims(shape.batch, seq_q, seq_k, use.heads_q, use.heads_k, use.d_a, use.d_b, use.d_v)
    mask = GROUP_MASK_CODES[use.group_mask[0] if use.group_mask else None]
    return tuning_cache.attention_key(
        dims, causal=use.causal, windowed=use.window is not None, mask_code=mask
    )


# --- what the template says ---------------------------------------------------------------------


def jit_constexprs(source: str) -> dict[str, tuple[str, ...]]:
    """The constexpr parameters of every @triton.jit function in a kernels.py source."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            found[node.name] = tuple(
                arg.arg
                for arg in node.args.args
                if arg.annotation is not None and "constexpr" in ast.unparse(arg.annotation)
            )
    return found


# Which BlockConfig field a tile constexpr takes: launchers pass BLOCK_M=config.block_m
# (BLOCK_H for the decode kernel's rows of (token, head)) and BLOCK_N=config.block_n.
TILE_FIELDS = {"BLOCK_M": "block_m", "BLOCK_H": "block_m", "BLOCK_N": "block_n"}
WARPS = (4, 8)
STAGES = (1, 2, 3, 4)
MIN_TILE = 16  # the tensor-core K / M step
MAX_TILE = 128
# Registers per thread by the estimate below past which a config is not worth compiling: calibrated
# on ANCHORS.md's probes (MLA decode 64 heads x 64 keys on 8 warps: 216, spills; 32 x 32: 104, fits).
REGISTER_ESTIMATE_LIMIT = 192


def tile_bounds(launcher: Launcher, constexprs: dict[str, tuple[str, ...]], shape: Shape) -> dict[str, int]:
    """The largest useful value of each tunable tile constexpr: no wider than the rows or
    keys a program can have at this shape (decode: the sequence's (token, head) rows)."""
    use = launcher.use
    seq_q, seq_k = use.lengths(shape)
    # (token, head) rows: the MLA decode's, or a dense decode's with its query heads packed
    rows = (
        seq_q * (use.heads_q if launcher.reads_latent_cache else use.head_group)
        if launcher.role == "decode"
        else seq_q
    )
    limits = {"BLOCK_M": rows, "BLOCK_H": rows, "BLOCK_N": seq_k}
    bounds: dict[str, int] = {}
    for kernel in launcher.kernels:
        for name in constexprs[kernel]:
            if not name.startswith("BLOCK_"):
                continue
            if name not in TILE_FIELDS:
                raise MlagenError(
                    f"{kernel} has a tile constexpr {name} that autotune does not know; "
                    f"add it to mlagen.autotune.TILE_FIELDS"
                )
            bounds[name] = max(MIN_TILE, min(MAX_TILE, tuning_cache.bucket(limits[name])))
    return bounds


def register_estimate(launcher: Launcher, config: BlockConfig, arch: int | None = None) -> float:
    """32-bit registers per thread for the tiles a program keeps live, from the head dims:
    fp32 accumulators and score tiles, and the operand tiles it holds across the loop
    (16-bit values two to a register). A cheap bound before compiling anything; without an
    arch, the least of the archs' (decode: a column half)."""
    use = launcher.use
    pad_qk = padded(use.d_a) + padded(use.d_b)
    pad_v = padded(use.d_v)
    packed = DTYPE_BYTES[use.dtype] / 4
    m, n = config.block_m, config.block_n
    if launcher.role == "backward":
        # Both kernels hold block_n rows (dK/dV: keys, dQ: queries) and stream block_m (dQ:
        # dq_keys); their MMAs read the held K, V (Q, dO) from shared memory, so the fp32
        # accumulators and the P, dP tiles are what stays in registers.
        dkdv = n * (pad_qk + pad_v) + 2 * m * n  # dK, dV; P^T and dP^T
        dq = n * pad_qk + 2 * config.dq_keys * n  # dQ; P and dP
        values = max(dkdv, dq)
    elif launcher.reads_latent_cache:
        # O accumulated, all of its columns or a column half (runtime.launch.decode_column_halves,
        # templates/_mla_decode.jinja), one score tile; Q stays in shared memory for wgmma /
        # tcgen05, and where mma.sync holds it in registers the compile's spill reading prunes
        # (64 x 64 on 8 warps, all columns: 144 here, 244 measured on sm_90).
        halves = arch is None or decode_column_halves(
            torch.device("meta"), arch=arch, dtype=DTYPES[use.dtype]
        )
        values = m * (pad_v // 2 if halves else pad_v) + m * n
    else:  # forward: Q held, O accumulated, one score tile
        values = m * pad_qk * packed + m * pad_v + m * n
    return values / (32 * config.num_warps)


def shared_estimate(launcher: Launcher, config: BlockConfig) -> int:
    """Bytes of shared memory a config needs at least: one buffer of the tiles its loop
    streams (forward: K and V of BLOCK_N keys; backward: Q and dO, or K and V, of block_m rows;
    decode: BLOCK_N cache rows, keys and values at once), half of one without pipelining.
    Only a lower bound prunes safely, and Triton does not always give the loop num_stages
    buffers (1.1 to 3.4 buffers measured for 2 to 4 stages, 0.5 to 3 for one; short and
    nested loops pipeline less), so this counts what every compiled config had; the
    arch-matrix test checks it against compiled kernels."""
    use = launcher.use
    pad_qk = padded(use.d_a) + padded(use.d_b)
    pad_v = padded(use.d_v)
    element = DTYPE_BYTES[use.dtype]
    m, n = config.block_m, config.block_n
    if launcher.reads_latent_cache:
        streamed = n * pad_qk
    elif launcher.role == "backward":
        # dK/dV streams block_m queries (Q, dO), dQ dq_keys keys (K, V); min() as the arch
        # matrix reads a launch's tile back as (BLOCK_M, BLOCK_N), which dQ swaps.
        streamed = min(m, n, config.dq_keys) * (pad_qk + pad_v)
    else:
        streamed = n * (pad_qk + pad_v)
    return streamed * element // (1 if config.num_stages > 1 else 2)


def candidates(
    launcher: Launcher, constexprs: dict[str, tuple[str, ...]], shape: Shape, arch: int | None = None
) -> list[BlockConfig]:
    """Every config of the launcher's tunable constexprs, warps and stages that the shape,
    the register estimate and (for an arch) the shared-memory estimate allow (powers of two
    from 16 up to the bound)."""
    bounds = tile_bounds(launcher, constexprs, shape)
    fields: dict[str, list[int]] = {"block_m": [MIN_TILE], "block_n": [MIN_TILE]}
    for name, bound in bounds.items():
        fields[TILE_FIELDS[name]] = [1 << p for p in range(MIN_TILE.bit_length() - 1, bound.bit_length())]
    found = []
    for m in fields["block_m"]:
        # The backward's dQ kernel may stream more keys a step than dK/dV streams queries
        # (BlockConfig.dq_block_n); its binaries do not depend on block_m, so the wider steps
        # add launches to rank but few compiles.
        dq_steps = [None] + [k for k in fields["block_m"] if k > m] if launcher.role == "backward" else [None]
        for n in fields["block_n"]:
            for warps in WARPS:
                for stages in STAGES:
                    for dq in dq_steps:
                        config = BlockConfig(m, n, warps, stages, dq_block_n=dq)
                        if register_estimate(launcher, config, arch) > REGISTER_ESTIMATE_LIMIT:
                            continue
                        if (
                            arch is not None
                            and shared_estimate(launcher, config) > ARCHS[arch].smem_per_block
                        ):
                            continue
                        found.append(config)
    return found


def split_candidates(longest: int, block_n: int) -> list[int]:
    """Split-KV factors for the decode kernel: powers of two while every split keeps a tile of keys."""
    most = min(64, max(1, math.ceil(longest / block_n)))
    return [1 << p for p in range(most.bit_length()) if 1 << p <= most]


# --- compiling: the launchers themselves, on meta tensors (mlagen.aot) ---------------------------


def decode_splits(launcher: Launcher, config: BlockConfig, shape: Shape, arch: Arch) -> int:
    """The split count the decode launcher uses at `shape` on `arch`: runtime.attention's
    decode_splits for that arch's SM count, as the launcher calls it."""
    use = launcher.use
    seq_q, seq_k = use.lengths(shape)
    meta = torch.device("meta")
    if not launcher.reads_latent_cache:  # the dense forward: its launcher's own plan
        dims = AttentionDims(shape.batch, seq_q, seq_k, use.heads_q, use.heads_k, use.d_a, use.d_b, use.d_v)
        with launching_for(LaunchTarget(arch.sm, arch.sms)):
            return attention.forward_plan(dims, config, meta, dtype=DTYPES[use.dtype]).num_splits
    rows = seq_q * use.heads_q
    halves = decode_column_halves(meta, arch=arch.sm, dtype=DTYPES[use.dtype])
    programs = (
        (2 if halves else 1) * -(-rows // config.block_m) * shape.batch
    )  # (halves x) row blocks x batch
    with launching_for(LaunchTarget(arch.sm, arch.sms)):
        splits, _ = attention.decode_splits(
            programs,
            min(rows, config.block_m),
            seq_k,
            meta,
            block_n=config.block_n,
            latent=use.d_a,
            rope=use.d_b,
            dtype=DTYPES[use.dtype],
            num_splits=config.num_splits,
        )
    return splits


def launch_call(
    kernels_file: str | Path, launcher: Launcher, shape: Shape, config: BlockConfig, device: str = "meta"
) -> Callable[[], None]:
    """A picklable call of the launcher at `shape` with `config`: what mlagen.aot captures.
    On meta tensors of the launch's shapes, dtypes and strides nothing is allocated; `device`
    "cpu" gives real tensors (the test that meta tensors specialise as real ones do)."""
    return functools.partial(_launch, str(kernels_file), launcher, shape, config, device)


def _launch(kernels_file: str, launcher: Launcher, shape: Shape, config: BlockConfig, device: str) -> None:
    kernels = aot.load_kernels_module(kernels_file)
    call_maker(kernels, launcher, shape, torch.device(device))(config)()
    if launcher.reads_latent_cache:  # the cache append runs before every decode step
        use, dtype = launcher.use, DTYPES[launcher.use.dtype]
        seq_q, seq_k = use.lengths(shape)
        cache = PagedLatentCache(
            shape.batch, seq_k, latent_dim=use.d_a, rope_dim=use.d_b, dtype=dtype, device=device
        )
        start = cache.reserve([seq_q] * shape.batch)
        rope = torch.empty(shape.batch, seq_q, use.d_b, dtype=dtype, device=device)
        getattr(kernels, f"{use.kernel}_append_launch")(
            torch.empty(shape.batch, seq_q, use.d_a + use.d_b, dtype=dtype, device=device),
            torch.empty(use.d_a, dtype=dtype, device=device),
            1e-6,
            rope,
            rope,
            cache,
            start,
            [seq_q] * shape.batch,
        )


def kernel_role(launcher: Launcher, kernel: str) -> str:
    """forward, backward_dkdv, backward_dq, backward_delta, decode, decode_append, decode_combine."""
    if launcher.kernels == (kernel,):
        return launcher.role
    return f"{launcher.role}_{kernel.rsplit('_', 1)[-1]}"


def own_launches(launcher: Launcher, launches: Iterable[Launch], helpers: bool = True) -> tuple[Launch, ...]:
    """The launches of the launcher's kernels (and helpers) among what a call launched (a
    backward call also runs the forward for its inputs)."""
    wanted = launcher.kernels + (launcher.helpers if helpers else ())
    return tuple(launch for launch in launches if launch.kernel in wanted)


# Seconds one kernel takes to compile and read on one core, for the estimate printed before a
# long compile (measured with Triton 3.9 on 2 shared cores: 1-3 s for forward and decode
# kernels, 3-8 s for the backward ones).
SECONDS_PER_COMPILE = {"backward": 5.0, "other": 2.0}


def announce(what: str, calls: int, todo: list[Launch], cached: int, workers: int) -> None:
    """One line before compiling: how much there is and about how long it takes."""
    seconds = sum(SECONDS_PER_COMPILE["backward" if "_bwd" in launch.kernel else "other"] for launch in todo)
    minutes = seconds / max(1, workers) / 60
    estimate = f", about {minutes:.0f} min" if minutes >= 1 else f", about {seconds / max(1, workers):.0f} s"
    print(
        f"{what}: {calls} launcher calls, {len(todo) + cached} distinct kernels "
        f"({cached} in the compile cache, {len(todo)} to compile on {workers} worker{'s' * (workers != 1)}"
        f"{estimate if todo else ''})",
        file=sys.stderr,
        flush=True,
    )


def compile_calls(
    calls: list[tuple[Callable[[], None], int]],
    workers: int | None = None,
    desc: str = "compiling",
    keep: Callable[[int, tuple[Launch, ...]], tuple[Launch, ...]] | None = None,
) -> list[tuple[tuple[Launch, CompiledKernel], ...]]:
    """For each (call, arch): the kernels it launches with their readings. `keep(index,
    launches)` may narrow what is compiled for each call (what the caller will look at)."""
    workers = workers or os.cpu_count() or 2
    started = time.monotonic()
    with aot.Compiler(workers) as compiler:
        captured = compiler.capture(calls)
        if keep is not None:
            captured = [keep(index, launches) for index, launches in enumerate(captured)]
        every = [launch for launches in captured for launch in launches]
        todo = compiler.missing(every)
        announce(desc, len(calls), todo, len(aot.unique(every)) - len(todo), workers)
        readings = compiler.compile(every, lambda items, total: progress(items, total, desc))
    if todo:
        print(f"{desc}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return [tuple((launch, readings[launch.cache_key]) for launch in launches) for launches in captured]


# --- static pruning and ranking -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ranked:
    config: BlockConfig
    compiled: tuple[CompiledKernel, ...]
    score: float
    reason: str = ""  # why it was dropped; empty for survivors

    @property
    def registers(self) -> int:
        return max(c.registers for c in self.compiled)

    @property
    def spill_bytes(self) -> int:
        return max(c.spill_bytes for c in self.compiled)

    @property
    def shared_bytes(self) -> int:
        return max(c.shared_bytes for c in self.compiled)

    @property
    def tensor_core_ops(self) -> int:
        return min(c.tensor_core_ops for c in self.compiled)


def prune_reason(compiled: tuple[CompiledKernel, ...], arch: Arch) -> str:
    """Why a config cannot run well on `arch`, or "" when every kernel of it fits."""
    for kernel in compiled:
        if kernel.error:
            return f"{kernel.name}: compile failed ({kernel.error})"
        if kernel.spill_bytes:
            return f"{kernel.name}: spills {kernel.spill_bytes} B"
        if kernel.shared_bytes > arch.smem_per_block:
            return f"{kernel.name}: {kernel.shared_bytes / 1024:.0f} KB shared > {arch.smem_per_block // 1024} KB"
    return ""


# Resident warps per SM past which more buy little: attention loops are pipelined (num_stages),
# so one 8-warp CTA or two 4-warp CTAs per SM keep the tensor cores fed.
OCCUPANCY_TARGET = 8


def static_score(config: BlockConfig, compiled: tuple[CompiledKernel, ...], arch: Arch) -> float:
    """The static model: tile reuse (bytes loaded per FLOP fall as 2mn/(m+n) grows) times
    how well occupancy hides latency, and a heavy penalty without tensor cores."""
    m, n = config.block_m, config.block_n
    reuse = 2 * m * n / (m + n)
    if config.dq_block_n:  # the backward's two kernels, each with its own streamed step
        reuse = (reuse + 2 * config.dq_block_n * n / (config.dq_block_n + n)) / 2
    warps = min(occupancy(c, arch) for c in compiled)
    tensor_cores = 1.0 if all(c.tensor_core_ops for c in compiled) else 0.25
    return reuse * min(1.0, warps / OCCUPANCY_TARGET) * tensor_cores


def rank(
    configs: list[BlockConfig],
    compiled: dict[BlockConfig, tuple[CompiledKernel, ...]],
    arch: Arch,
    prefer: BlockConfig | None = None,
) -> tuple[list[Ranked], list[Ranked]]:
    """(survivors best first, dropped with their reasons). The model cannot tell configs of
    equal score apart, so ties go to `prefer` (the default, kept spill-free by tests), then to
    deeper pipelines, fewer registers and fewer warps."""
    survivors, dropped = [], []
    for config in configs:
        kernels = compiled[config]
        reason = prune_reason(kernels, arch)
        if reason:
            dropped.append(Ranked(config, kernels, 0.0, reason))
        else:
            survivors.append(Ranked(config, kernels, static_score(config, kernels, arch)))
    survivors.sort(
        key=lambda r: (
            -r.score,
            r.config != prefer,
            -r.config.num_stages,
            r.registers,
            r.config.num_warps,
            -r.config.block_m,
            -r.config.block_n,
        )
    )
    return survivors, dropped


# --- progress ------------------------------------------------------------------------------------


def progress(items: Iterable, total: int, desc: str) -> Iterator:
    """A progress bar on stderr: tqdm or rich when installed, else a line per tenth."""
    try:
        from tqdm import tqdm
    except ImportError:
        pass
    else:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    try:
        from rich.progress import track
    except ImportError:
        pass
    else:
        yield from track(items, total=total, description=desc, transient=True, console=None)
        return
    step = max(1, total // 10)
    for done, item in enumerate(items, 1):
        yield item
        if done % step == 0 or done == total:
            print(f"{desc}: {done}/{total}", file=sys.stderr, flush=True)


# --- tuning --------------------------------------------------------------------------------------


Timer = Callable[[Callable[[], Any]], float]


def do_bench_timer(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@dataclass(frozen=True, slots=True)
class Timed:
    config: BlockConfig
    ms: float
    error: str = ""


def time_candidates(
    configs: Iterable[BlockConfig], make_call: Callable[[BlockConfig], Callable[[], Any]], timer: Timer
) -> list[Timed]:
    """Time each config; one that fails to build, launch or time scores infinity."""
    timed = []
    for config in configs:
        try:
            ms = float(timer(make_call(config)))
            error = "" if math.isfinite(ms) and ms > 0 else f"timer gave {ms}"
        except Exception as exc:  # a config that cannot run loses; the run goes on
            ms, error = math.inf, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        timed.append(Timed(config, ms if not error else math.inf, error))
    return timed


@dataclass(frozen=True, slots=True)
class TuneResult:
    launcher: Launcher
    shape: Shape
    key: str
    winner: Timed | None
    timed: tuple[Timed, ...]
    default: BlockConfig | None = None  # the static default, when it was among the timed

    @property
    def default_ms(self) -> float:
        return min((t.ms for t in self.timed if t.config == self.default), default=math.inf)


def _inputs(launcher: Launcher, shape: Shape, device: torch.device) -> dict[str, Any]:
    use = launcher.use
    dtype = DTYPES[use.dtype]
    seq_q, seq_k = use.lengths(shape)

    def rand(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, dtype=dtype, device=device)

    if launcher.reads_latent_cache:
        cache = PagedLatentCache(
            shape.batch, seq_k, latent_dim=use.d_a, rope_dim=use.d_b, dtype=dtype, device=device
        )
        cache.reserve([seq_k] * shape.batch)
        cache.commit([seq_k] * shape.batch)
        cache.buffer.normal_()
        return {
            "q_latent": rand(shape.batch, seq_q, use.heads_q, use.d_a),
            "q_rope": rand(shape.batch, seq_q, use.heads_q, use.d_b),
            "cache": cache,
            "start": torch.full((shape.batch,), seq_k - seq_q, dtype=torch.int32, device=device),
        }
    return {
        "q_a": rand(shape.batch, seq_q, use.heads_q, use.d_a),
        "q_b": rand(shape.batch, seq_q, use.heads_q, use.d_b) if use.d_b else None,
        "k_a": rand(shape.batch, seq_k, use.heads_k, use.d_a),
        "k_b": rand(shape.batch, seq_k, use.heads_kb, use.d_b) if use.d_b else None,
        "v": rand(shape.batch, seq_k, use.heads_k, use.d_v),
    }


def call_maker(kernels: Any, launcher: Launcher, shape: Shape, device: torch.device) -> Callable:
    """make_call(config) -> a no-argument call of the launcher at `shape` with that config."""
    from mlagen.runtime.mla_decode import CachedTokens

    use = launcher.use
    entry = getattr(kernels, launcher.entry)
    tensors = _inputs(launcher, shape, device)
    if launcher.reads_latent_cache:
        cached = CachedTokens(tensors["cache"], tensors["start"], (shape.new_tokens,) * shape.batch)
        return lambda config: (
            lambda: entry(
                tensors["q_latent"],
                tensors["q_rope"],
                cached,
                scale=use.scale,
                causal=use.causal,
                num_splits=config.num_splits,
                config=config,
            )
        )
    operands = (tensors["q_a"], tensors["q_b"], tensors["k_a"], tensors["k_b"], tensors["v"])
    flags = dict(scale=use.scale, causal=use.causal, window=use.window, group_mask=use.group_mask)
    if launcher.role in ("forward", "decode"):  # the launcher takes config.num_splits (decode's split sweep)
        return lambda config: lambda: entry(*operands, **flags, config=config)
    forward = getattr(kernels, f"{use.kernel}_launch")
    state: dict[str, Any] = {}

    def make(config: BlockConfig) -> Callable[[], Any]:
        if not state:
            out, lse = forward(*operands, **flags)
            state.update(out=out, lse=lse, grad=torch.randn_like(out))
        return lambda: entry(state["grad"], *operands, state["out"], state["lse"], **flags, config=config)

    return make


def tune_launcher(
    kernels: Any,
    launcher: Launcher,
    shape: Shape,
    configs: list[BlockConfig],
    *,
    device: torch.device,
    timer: Timer,
    bar: Callable[[Iterable, int], Iterable] | None = None,
    default: BlockConfig | None = None,
) -> TuneResult:
    """Time the configs; for decode also sweep the split-KV factor around the winner."""
    make_call = call_maker(kernels, launcher, shape, device)
    order = bar(configs, len(configs)) if bar else configs
    timed = time_candidates(order, make_call, timer)
    best = min(timed, key=lambda t: t.ms, default=None)
    if launcher.role == "decode" and best is not None and math.isfinite(best.ms):
        seq_k = launcher.use.lengths(shape)[1]
        splits = [replace(best.config, num_splits=s) for s in split_candidates(seq_k, best.config.block_n)]
        timed += time_candidates(splits, make_call, timer)
    best = min(timed, key=lambda t: t.ms, default=None)
    winner = best if best is not None and math.isfinite(best.ms) else None
    return TuneResult(launcher, shape, shape_key(launcher, shape), winner, tuple(timed), default)


def kernel_objects(kernels: Any, launcher: Launcher) -> tuple:
    return tuple(getattr(kernels, name) for name in launcher.kernels)


def load_kernels_file(path: str | Path) -> Any:
    return aot.load_kernels_module(path)


def survivors_for(
    kernels_file: str,
    plans: list[tuple[Launcher, Shape, list[BlockConfig]]],
    arch: int,
    workers: int | None = None,
) -> list[tuple[list[Ranked], list[Ranked]]]:
    """Compile every candidate of every plan as its launch would (each distinct kernel once)
    and rank them; a plan's first config is its default (see _with_default)."""
    calls, owners = [], []
    for plan in plans:
        for config in plan[2]:
            calls.append((launch_call(kernels_file, plan[0], plan[1], config), arch))
            owners.append(plan[0])
    # Helpers run with fixed settings (or only follow the tile), so the ranking reads the tuned kernels.
    compiled = compile_calls(
        calls,
        workers,
        f"compiling candidates for sm_{arch}",
        keep=lambda index, launches: own_launches(owners[index], launches, helpers=False),
    )
    ranked, position = [], 0
    for plan in plans:
        by_config = {}
        for config in plan[2]:
            by_config[config] = tuple(reading for _, reading in compiled[position])
            position += 1
        ranked.append(rank(plan[2], by_config, ARCHS[arch], prefer=plan[2][0]))
    return ranked


def log_choice(kernels: tuple, key: str, dtype: str, where: str, text: str) -> None:
    """The MLAGEN_AUTOTUNE_LOG line of a choice, worded as the run-time lookup words its own."""
    if tuning_cache.log_enabled():
        name = tuning_cache.dtype_name(DTYPES[dtype])
        print(f"mlagen autotune: {kernels[0].__name__} [{key}, {name}] on {where}: {text}", file=sys.stderr)


# --- the commands --------------------------------------------------------------------------------


def render_kernels(spec: Spec, directory: Path) -> Path:
    """Write the spec's kernels.py (exactly what `mlagen generate` writes) under `directory`."""
    from mlagen.codegen import compile_spec

    _, files = compile_spec(spec)
    path = directory / spec.name / "kernels.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(files["kernels.py"], encoding="utf-8")
    return path


def _with_default(configs: list[BlockConfig], default: BlockConfig) -> list[BlockConfig]:
    """The default first, so a ranking or timing always says where it stands."""
    return [default] + [c for c in configs if c != default]


@dataclass(frozen=True, slots=True)
class StaticRanking:
    launcher: Launcher
    shape: Shape
    key: str
    default: BlockConfig
    survivors: list[Ranked]
    dropped: list[Ranked]


def static_tune(
    spec: Spec,
    shapes: list[Shape],
    arch: int,
    *,
    dtype: str | None = None,
    workers: int | None = None,
    write: bool = False,
) -> list[StaticRanking]:
    """Rank every launcher's candidates by the static model for `arch`, without a GPU;
    with write=True store the winners in the cache for "sm_<arch>"."""
    import tempfile

    if write:
        tuning_cache.check_writable()  # before minutes of compiling, not after
    with tempfile.TemporaryDirectory(prefix="mlagen-tune-") as tmp:
        kernels_file = render_kernels(spec, Path(tmp))
        constexprs = jit_constexprs(kernels_file.read_text(encoding="utf-8"))
        plans = []
        for launcher in all_launchers(spec, dtype):
            for shape in shapes:
                default = default_for(launcher, shape, arch)
                plans.append(
                    (launcher, shape, _with_default(candidates(launcher, constexprs, shape, arch), default))
                )
        ranked = survivors_for(str(kernels_file), plans, arch, workers)
        rankings = [
            StaticRanking(launcher, shape, shape_key(launcher, shape), configs[0], survivors, dropped)
            for (launcher, shape, configs), (survivors, dropped) in zip(plans, ranked)
        ]
        if write:
            module = load_kernels_file(kernels_file)
            entries = {}
            for r in rankings:
                if r.survivors:
                    objects = kernel_objects(module, r.launcher)
                    key, entry = tuning_cache.new_entry(
                        objects,
                        r.key,
                        DTYPES[r.launcher.use.dtype],
                        f"sm_{arch}",
                        arch,
                        r.survivors[0].config,
                        ms=None,
                        method="static",
                    )
                    entries[key] = entry
                    log_choice(
                        objects,
                        r.key,
                        r.launcher.use.dtype,
                        f"sm_{arch}",
                        f"static winner {tuning_cache.describe(r.survivors[0].config)}",
                    )
            tuning_cache.store(entries)
    return rankings


Select = Callable[[Launcher, Shape, list[BlockConfig]], list[BlockConfig]]


def tune_spec(
    spec_path: str | Path,
    shapes: list[Shape],
    *,
    out_root: str | Path = "generated",
    device: torch.device | None = None,
    timer: Timer = do_bench_timer,
    select: Select | None = None,
    workers: int | None = None,
) -> list[TuneResult]:
    """Time every launcher's candidates that survive static pruning for this GPU and store
    each winner in the cache (after each launcher, so an interrupted run keeps what it found).
    `timer` and `select` (in place of the AOT pruning) are for tests."""
    import mlagen
    from mlagen.spec import load_spec

    spec = load_spec(spec_path)
    device = device or torch.device("cuda")
    identity = tuning_cache.gpu_identity(device)
    if identity is None:
        raise MlagenError(f"tuning times kernels on a CUDA device, not {device}")
    tuning_cache.check_writable()  # before timing anything, not after
    gpu, arch = identity
    kernels = mlagen.load(spec_path, out_root).kernels
    constexprs = jit_constexprs(Path(kernels.__file__).read_text(encoding="utf-8"))
    plans = []
    for launcher in all_launchers(spec):
        for shape in shapes:
            default = default_for(launcher, shape, arch)
            plans.append(
                (
                    launcher,
                    shape,
                    _with_default(
                        candidates(launcher, constexprs, shape, arch if arch in ARCHS else None), default
                    ),
                )
            )
    if select is not None:
        plans = [(launcher, shape, select(launcher, shape, configs)) for launcher, shape, configs in plans]
    elif arch in ARCHS:
        ranked = survivors_for(kernels.__file__, plans, arch, workers)
        plans = [
            (launcher, shape, [r.config for r in survivors])
            for (launcher, shape, _), (survivors, _) in zip(plans, ranked)
        ]
    else:
        print(
            f"mlagen: no hardware limits known for sm_{arch}; timing every candidate without static pruning",
            file=sys.stderr,
        )
    results = []
    for launcher, shape, configs in plans:
        desc = f"{launcher.use.kernel} {launcher.role}, {shape}"
        result = tune_launcher(
            kernels,
            launcher,
            shape,
            configs,
            device=device,
            timer=timer,
            bar=lambda items, total, desc=desc: progress(items, total, desc),
            default=default_for(launcher, shape, arch),
        )
        results.append(result)
        objects = kernel_objects(kernels, launcher)
        if result.winner is None:
            log_choice(
                objects, result.key, launcher.use.dtype, gpu, "every candidate failed; keeping the default"
            )
            continue
        log_choice(
            objects,
            result.key,
            launcher.use.dtype,
            gpu,
            f"{tuning_cache.describe(result.winner.config)} {result.winner.ms:.4f} ms "
            f"(best of {len(result.timed)})",
        )
        key, entry = tuning_cache.new_entry(
            objects,
            result.key,
            DTYPES[launcher.use.dtype],
            gpu,
            arch,
            result.winner.config,
            ms=result.winner.ms,
            method="timed",
        )
        tuning_cache.store({key: entry})
    return results


# --- reports -------------------------------------------------------------------------------------


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths)] + [_row([str(c) for c in r], widths) for r in rows]


def mma_text(compiled: tuple[CompiledKernel, ...] | CompiledKernel) -> str:
    kernels = compiled if isinstance(compiled, tuple) else (compiled,)
    counts: dict[str, int] = {}
    for kernel in kernels:
        for opcode, count in kernel.mma:
            counts[opcode] = counts.get(opcode, 0) + count
    return " + ".join(f"{count} {opcode}" for opcode, count in sorted(counts.items())) or "0"


def format_static(rankings: list[StaticRanking], arch: int, top: int = 5) -> list[str]:
    limits = ARCHS[arch]
    lines = [
        f"static ranking for sm_{arch} ({limits.gpu} limits: {limits.smem_per_block // 1024} KB shared per "
        f"block, {limits.regs_per_sm // 1024}K registers per SM); score = tile reuse x occupancy, "
        "tensor cores required"
    ]
    for r in rankings:
        reasons: dict[str, int] = {}
        for d in r.dropped:
            kind = "spill" if "spills" in d.reason else "shared memory" if "shared" in d.reason else "failed"
            reasons[kind] = reasons.get(kind, 0) + 1
        dropped = ", ".join(f"{n} {kind}" for kind, n in reasons.items()) or "none"
        lines += [
            "",
            f"{r.launcher.label}, {r.shape} [{r.key}]: {len(r.survivors) + len(r.dropped)} candidates, "
            f"{len(r.survivors)} fit (dropped: {dropped})",
        ]
        rows = []
        for place, s in enumerate(r.survivors[:top], 1):
            occ = min(occupancy(c, limits) for c in s.compiled)
            rows.append(
                [
                    str(place),
                    tuning_cache.describe(s.config),
                    str(s.registers),
                    str(s.spill_bytes),
                    f"{s.shared_bytes / 1024:.1f}",
                    mma_text(s.compiled),
                    str(occ),
                    f"{s.score:.1f}",
                    "default" if s.config == r.default else "",
                ]
            )
        if r.default not in [s.config for s in r.survivors[:top]]:
            place = next((i for i, s in enumerate(r.survivors, 1) if s.config == r.default), None)
            why = next((d.reason for d in r.dropped if d.config == r.default), "")
            rows.append(
                [
                    "-",
                    tuning_cache.describe(r.default),
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    f"default: rank {place}" if place else f"default: dropped ({why})",
                ]
            )
        lines += [
            "  " + line
            for line in table(
                ["rank", "config", "regs", "spill", "smem KB", "tensor-core ops", "warps/SM", "score", ""],
                rows,
            )
        ]
    return lines


def format_tuned(results: list[TuneResult]) -> list[str]:
    rows = []
    for r in results:
        failed = sum(1 for t in r.timed if not math.isfinite(t.ms))
        rows.append(
            [
                r.launcher.label,
                str(r.shape),
                tuning_cache.describe(r.winner.config) if r.winner else "none",
                f"{r.winner.ms:.4f}" if r.winner else "inf",
                f"{r.default_ms:.4f}" if math.isfinite(r.default_ms) else "-",
                f"{len(r.timed)} ({failed} failed)",
            ]
        )
    return table(["launcher", "shape", "winner", "ms", "default ms", "timed"], rows)
