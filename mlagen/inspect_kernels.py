"""`mlagen inspect`: what each generated kernel costs on sm_80 / sm_90, without a GPU.

For every launcher of a spec (forward, backward, decode) it takes the config the runtime
would choose on that arch (a tuning-cache entry for the arch, else the static default),
compiles the launcher's kernels ahead of time in spawned workers, and reports registers,
spills, shared memory, tensor-core instructions and the occupancy they allow, next to
the FLOPs and bytes of one call at a given shape (ANCHORS.md conventions).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from mlagen import autotune
from mlagen.aot import CompiledKernel
from mlagen.autotune import ARCHS, DTYPE_BYTES, AttentionUse, Launcher, Shape
from mlagen.runtime import tuning_cache
from mlagen.runtime.launch import BlockConfig
from mlagen.spec import Spec


def visible_pairs(use: AttentionUse, seq_q: int, seq_k: int) -> int:
    """(query, key) pairs the masks leave, counted as the kernels' _visible does: causal and
    window align the last query with the last key; group masks compare chunk indices."""
    rows = torch.arange(seq_q, dtype=torch.int64)
    lo = torch.zeros_like(rows)
    hi = torch.full_like(rows, seq_k)
    offset = seq_k - seq_q
    if use.causal:
        hi = torch.minimum(hi, rows + offset + 1)
    if use.window is not None:
        lo = torch.maximum(lo, rows + offset - use.window + 1)
    if use.group_mask is not None:
        mode, q_group, k_group = use.group_mask
        if mode == "same":
            lo = torch.maximum(lo, rows // q_group * k_group)
            hi = torch.minimum(hi, (rows // q_group + 1) * k_group)
        else:  # "earlier"
            hi = torch.minimum(hi, rows // q_group * k_group)
    return int((hi - lo).clamp(min=0).sum())


def work(launcher: Launcher, kernel: str, shape: Shape, splits: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one launch of `kernel`. FLOPs count the matmuls over the visible
    (query, key) pairs: forward 2 * pairs * (Dqk + Dv) per head (ANCHORS' 4*B*H*Sq*Sk*D when
    dense, half when causal); the backward kernels as executed, scores recomputed (dK/dV and
    dQ together 3.5x forward, where ANCHORS reports 2.5x). Bytes: each tensor read or
    written once; decode bytes are ANCHORS' 2 * (sum(Sk) * 576 + B*Sq*Hq * (576 + 512))."""
    use = launcher.use
    e = DTYPE_BYTES[use.dtype]
    seq_q, seq_k = use.lengths(shape)
    batch, hq, hk, hkb = shape.batch, use.heads_q, use.heads_k, use.heads_kb
    d_qk, d_v = use.d_a + use.d_b, use.d_v
    per_pair = 2 * batch * hq * visible_pairs(use, seq_q, seq_k)
    q = batch * seq_q * hq * d_qk
    o = batch * seq_q * hq * d_v
    stats = 4 * batch * hq * seq_q
    if launcher.role == "decode":
        if kernel == use.kernel:
            return per_pair * (d_qk + d_v), e * (batch * seq_k * d_qk + q + o)
        if kernel.endswith("_append"):
            return 0.0, 2 * e * batch * seq_q * d_qk
        return 0.0, 4 * batch * splits * seq_q * hq * (d_v + 1) + e * o  # combine
    k = batch * seq_k * (hk * use.d_a + hkb * use.d_b)
    v = batch * seq_k * hk * d_v
    if kernel == use.kernel:
        return per_pair * (d_qk + d_v), e * (q + k + v + o) + stats
    if kernel.endswith("_bwd_dkdv"):
        writes = e * batch * seq_k * hk * (use.d_a + d_v) + 4 * batch * seq_k * hk * use.d_b
        return per_pair * 2 * (d_qk + d_v), e * (q + k + v + o) + 2 * stats + writes
    if kernel.endswith("_bwd_dq"):
        return per_pair * (2 * d_qk + d_v), e * (2 * q + k + v + o) + 2 * stats
    return 0.0, 2 * e * o + 2 * stats  # delta = rowsum(O * dO)


def chosen_config(
    launcher: Launcher, kernels: tuple, shape: Shape, arch: int, cached: dict[str, dict]
) -> tuple[BlockConfig, str]:
    """The config the runtime would take on `arch` and where it comes from: a timed cache
    entry from a GPU of that arch, a static one (`tune --static --write`), else the default."""
    source = tuning_cache.source_hash(kernels)
    key, dtype = (
        autotune.shape_key(launcher, shape),
        tuning_cache.dtype_name(autotune.DTYPES[launcher.use.dtype]),
    )
    matches = [
        e
        for e in cached.values()
        if e.get("source_hash") == source
        and e.get("shape") == key
        and e.get("dtype") == dtype
        and e.get("triton") == triton.__version__
        and e.get("arch") == arch
    ]
    matches.sort(key=lambda e: (e.get("method") != "timed", str(e.get("gpu"))))
    if matches:
        fields = matches[0]["config"]
        config = BlockConfig(
            fields["block_m"],
            fields["block_n"],
            fields["num_warps"],
            fields["num_stages"],
            fields.get("num_splits"),
        )
        return config, f"{matches[0].get('method', 'tuned')} on {matches[0].get('gpu')}"
    return autotune.default_for(launcher, shape, arch), "default"


@dataclass(frozen=True, slots=True)
class KernelRow:
    launcher: Launcher
    kernel: str
    settings: str  # the launch config as the table shows it
    source: str  # where the config came from
    compiled: CompiledKernel
    flops: float
    bytes: float


def inspect_spec(
    spec: Spec, arch: int, shape: Shape, *, dtype: str | None = None, workers: int | None = None
) -> list[KernelRow]:
    """Compile every kernel of the spec for `arch` at the config the runtime would choose."""
    cached, problem = tuning_cache.read_file(tuning_cache.cache_path())
    if problem:
        print(f"mlagen: ignoring the tuning cache {tuning_cache.cache_path()}: {problem}", file=sys.stderr)
    plans = []
    with tempfile.TemporaryDirectory(prefix="mlagen-inspect-") as tmp:
        kernels_file = autotune.render_kernels(spec, Path(tmp))
        constexprs = autotune.jit_constexprs(kernels_file.read_text(encoding="utf-8"))
        module = autotune.load_kernels_file(kernels_file)
        for launcher in autotune.all_launchers(spec, dtype):
            objects = autotune.kernel_objects(module, launcher)
            config, source = chosen_config(launcher, objects, shape, arch, cached)
            jobs = autotune.launcher_jobs(str(kernels_file), launcher, constexprs, config, shape, arch)
            jobs += autotune.helper_jobs(str(kernels_file), launcher, constexprs, config, shape, arch)
            plans.append((launcher, config, source, jobs))
        compiled = autotune.compile_all(
            [job for plan in plans for job in plan[3]], workers, f"compiling {spec.name} for sm_{arch}"
        )
    rows = []
    for launcher, config, source, jobs in plans:
        seq_k = launcher.use.lengths(shape)[1]
        splits = autotune.decode_splits(config, shape.batch, seq_k, ARCHS[arch])
        for job in jobs:
            helper = job.kernel in launcher.helpers
            knobs = {
                k: v for k, v in job.constexprs.items() if k.startswith(("BLOCK_", "PAD_SPLITS", "PAGE"))
            }
            settings = (
                " ".join(f"{k}={v}" for k, v in knobs.items()) + f" w{job.num_warps} s{job.num_stages}"
                if helper
                else tuning_cache.describe(config)
            )
            flops, moved = work(launcher, job.kernel, shape, splits)
            rows.append(
                KernelRow(
                    launcher,
                    job.kernel,
                    settings,
                    "launch defaults" if helper else source,
                    compiled[autotune.job_key(job)],
                    flops,
                    moved,
                )
            )
    return rows


def _amount(value: float, unit: float) -> str:
    if not value:
        return "-"
    return f"{value / unit:,.0f}" if value / unit >= 100 else f"{value / unit:.3g}"


def format_inspect(
    spec: Spec, arch: int, shape: Shape, rows: list[KernelRow], dtype: str | None = None
) -> list[str]:
    limits = ARCHS[arch]
    lines = [
        f"{spec.name} on sm_{arch} ({limits.gpu} limits: {limits.smem_per_block // 1024} KB shared per block, "
        f"{limits.regs_per_sm // 1024}K registers and {limits.max_warps} warps per SM), {dtype or spec.dtype}, "
        f"batch {shape.batch}: prefill {shape.seq_len} tokens, decode {shape.new_tokens} new token over "
        f"{shape.seq_len} cached",
        "",
    ]
    body = []
    for row in rows:
        c = row.compiled
        if c.error:
            body.append([row.kernel, row.launcher.use.node, row.settings, "compile failed: " + c.error])
            continue
        body.append(
            [
                row.kernel,
                row.launcher.use.node,
                row.settings + (" *" if row.source not in ("default", "launch defaults") else ""),
                str(c.registers),
                str(c.spill_bytes),
                f"{c.shared_bytes / 1024:.1f}",
                autotune.mma_text(c),
                f"{autotune.occupancy(c, limits)}/{limits.max_warps}",
                _amount(row.flops, 1e9),
                _amount(row.bytes, 1e6),
            ]
        )
    lines += autotune.table(
        [
            "kernel",
            "node",
            "config",
            "regs",
            "spill B",
            "smem KB",
            "tensor-core ops",
            "warps/SM",
            "GFLOP",
            "MB",
        ],
        body,
    )
    tuned = sorted(
        {
            f"{row.launcher.use.kernel} {row.launcher.role}: {row.source}"
            for row in rows
            if row.source not in ("default", "launch defaults")
        }
    )
    lines += [
        "",
        "config: the static default of mlagen/runtime/launch.py"
        + (", * = from the tuning cache (" + "; ".join(tuned) + ")" if tuned else "")
        + "; helpers run with Triton's launch defaults",
        "warps/SM: resident warps the registers and shared memory allow (occupancy); "
        "GFLOP, MB: one call's matmul work and tensors moved (ANCHORS.md)",
    ]
    return lines
