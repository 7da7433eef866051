"""`mlagen inspect`: what each generated kernel costs on sm_80 ... sm_120, without a GPU.

For every launcher of a spec (forward, backward, decode) it takes the config the runtime
would choose on that arch (a tuning-cache entry for the arch, else the static default),
calls the launcher on meta tensors so that Triton specialises every kernel it launches
exactly as on a GPU (mlagen.aot), compiles those, and reports registers, spills, shared
memory, tensor-core and TMA instructions, the hot loop's issue-clocks per 1K scores and the
occupancy they allow, next to the FLOPs and bytes of one call at a given shape (ANCHORS.md
conventions). `--baseline` adds the Triton-tutorial-style kernels (mlagen.bench.baseline)
compiled the same way; `--json` prints one record per kernel and arch.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from mlagen import autotune
from mlagen.aot import ARCHS, CompiledKernel, Launch, mma_count
from mlagen.autotune import DTYPE_BYTES, AttentionUse, Launcher, Shape
from mlagen.ir.ops import S
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


def work(use: AttentionUse, role: str, shape: Shape, splits: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one launch of the kernel with `role` (autotune.kernel_role). FLOPs
    count the matmuls over the visible (query, key) pairs: forward 2 * pairs * (Dqk + Dv) per
    head (ANCHORS' 4*B*H*Sq*Sk*D when dense, half when causal); the backward kernels as
    executed, scores recomputed (dK/dV and dQ together 3.5x forward, where ANCHORS reports
    2.5x). Bytes: each tensor read or written once; decode bytes are ANCHORS'
    2 * (sum(Sk) * 576 + B*Sq*Hq * (576 + 512))."""
    e = DTYPE_BYTES[use.dtype]
    seq_q, seq_k = use.lengths(shape)
    batch, hq, hk, hkb = shape.batch, use.heads_q, use.heads_k, use.heads_kb
    d_qk, d_v = use.d_a + use.d_b, use.d_v
    per_pair = 2 * batch * hq * visible_pairs(use, seq_q, seq_k)
    q = batch * seq_q * hq * d_qk
    o = batch * seq_q * hq * d_v
    stats = 4 * batch * hq * seq_q
    if role == "decode":
        return per_pair * (d_qk + d_v), e * (batch * seq_k * d_qk + q + o)
    if role == "decode_append":
        return 0.0, 2 * e * batch * seq_q * d_qk
    if role == "decode_combine":
        return 0.0, 4 * batch * splits * seq_q * hq * (d_v + 1) + e * o
    k = batch * seq_k * (hk * use.d_a + hkb * use.d_b)
    v = batch * seq_k * hk * d_v
    if role == "forward":
        return per_pair * (d_qk + d_v), e * (q + k + v + o) + stats
    if role == "backward_dkdv":
        writes = e * batch * seq_k * hk * (use.d_a + d_v) + 4 * batch * seq_k * hk * use.d_b
        return per_pair * 2 * (d_qk + d_v), e * (q + k + v + o) + 2 * stats + writes
    if role == "backward_dq":
        return per_pair * (2 * d_qk + d_v), e * (2 * q + k + v + o) + 2 * stats
    assert role == "backward_delta", role
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
    kind: str  # "mlagen", or "baseline" (mlagen.bench.baseline)
    spec: str
    use: AttentionUse  # the attention it computes (for the FLOPs and bytes)
    kernel: str
    role: str  # autotune.kernel_role
    arch: int
    launch: Launch  # as Triton specialised it
    source: str  # where the config came from
    compiled: CompiledKernel
    flops: float
    bytes: float

    @property
    def settings(self) -> str:
        """The launch's tile constexprs and options, e.g. "128x64 w8 s3" (BLOCK_M x BLOCK_N)."""
        constants = self.launch.constant
        tile = [constants[name] for name in ("BLOCK_M", "BLOCK_H", "BLOCK_N") if name in constants]
        others = [f"{name}={value}" for name, value in constants.items() if name in ("PAD_SPLITS", "PAGE")]
        text = "x".join(str(t) for t in tile)
        return " ".join(
            [text] * bool(text) + others + [f"w{self.launch.num_warps} s{self.launch.num_stages}"]
        )

    def record(self) -> dict[str, Any]:
        """The JSON record of `mlagen inspect --json`."""
        c = self.compiled
        clocks = c.loop_clocks_per_1k_scores
        return {
            "kind": self.kind,
            "spec": self.spec,
            "node": self.use.node,
            "kernel": self.kernel,
            "role": self.role,
            "arch": f"sm_{self.arch}",
            "dtype": self.use.dtype,
            "config": {
                **{k: v for k, v in self.launch.constants if k.startswith(("BLOCK_", "PAD_SPLITS", "PAGE"))},
                "num_warps": self.launch.num_warps,
                "num_stages": self.launch.num_stages,
            },
            "config_source": self.source,
            "error": c.error or None,
            "registers": c.registers,
            "spill_bytes": c.spill_bytes,
            "shared_bytes": c.shared_bytes,
            "mma": {kind: mma_count(c, kind) for kind in ("HGMMA", "HMMA", "tcgen05")},
            "mma_opcodes": dict(c.mma),
            "tma_loads": c.tma_loads,
            "hot_loop": None
            if clocks is None
            else {
                "instructions": c.loop_instructions,
                "mma": c.loop_mma,
                "tile": list(c.tile),
                "warps": c.num_warps,
                "issue_clocks_per_1k_scores": round(clocks, 1),
            },
            "occupancy_warps": autotune.occupancy(c, ARCHS[self.arch]),
            "flops": self.flops,
            "bytes": self.bytes,
        }


def _rows(kind, spec, use, role_of, arch, launches, source, splits, shape, compiled) -> list[KernelRow]:
    rows = []
    for launch, reading in zip(launches, compiled):
        role = role_of(launch.kernel)
        flops, moved = work(use, role, shape, splits)
        rows.append(
            KernelRow(
                kind, spec, use, launch.kernel, role, arch, launch, source(launch), reading, flops, moved
            )
        )
    return rows


def inspect_spec(
    spec: Spec | None,
    archs: list[int],
    shape: Shape,
    *,
    dtype: str | None = None,
    workers: int | None = None,
    baseline: bool = False,
) -> list[KernelRow]:
    """Every kernel of the spec (and of the baseline) compiled for each arch as the runtime
    would launch it there: the config it would choose, the launch's specialisation."""
    dtype = dtype or (spec.dtype if spec is not None else "bf16")
    return inspect_specs(
        [spec] if spec is not None else [], archs, shape, dtypes=[dtype], workers=workers, baseline=baseline
    )


def inspect_specs(
    specs: list[Spec],
    archs: list[int],
    shape: Shape,
    *,
    dtypes: list[str],
    workers: int | None = None,
    baseline: bool = False,
) -> list[KernelRow]:
    """inspect_spec for several specs and dtypes in one compile session: a kernel that several
    of them launch alike (same source and specialisation) is compiled once."""
    cached, problem = tuning_cache.read_file(tuning_cache.cache_path())
    if problem:
        print(f"mlagen: ignoring the tuning cache {tuning_cache.cache_path()}: {problem}", file=sys.stderr)
    plans: list[tuple] = []  # (spec name, launcher or None, arch, config, source, dtype)
    calls = []
    with tempfile.TemporaryDirectory(prefix="mlagen-inspect-") as tmp:
        for spec in specs:
            kernels_file = autotune.render_kernels(spec, Path(tmp))
            module = autotune.load_kernels_file(kernels_file)
            for dtype in dtypes:
                for arch in archs:
                    for launcher in autotune.all_launchers(spec, dtype):
                        objects = autotune.kernel_objects(module, launcher)
                        config, source = chosen_config(launcher, objects, shape, arch, cached)
                        plans.append((spec.name, launcher, arch, config, source, dtype))
                        calls.append((autotune.launch_call(kernels_file, launcher, shape, config), arch))
        if baseline:
            from mlagen.bench import baseline as tutorial

            for dtype in (d for d in dtypes if d != "fp32"):  # the tutorial's kernels are 16-bit
                for arch in archs:
                    plans.append(("baseline", None, arch, None, "tutorial settings", dtype))
                    calls.append(
                        (tutorial.launch_call(shape.batch, BASELINE_HEADS, shape.seq_len, dtype), arch)
                    )
        names = ", ".join([spec.name for spec in specs] + ["baseline"] * baseline)
        desc = f"compiling {names} for {', '.join(f'sm_{a}' for a in archs)}"

        def keep(index: int, launches: tuple[Launch, ...]) -> tuple[Launch, ...]:
            launcher = plans[index][1]
            return autotune.own_launches(launcher, launches) if launcher is not None else launches

        compiled = autotune.compile_calls(calls, workers, desc, keep=keep)
    rows: list[KernelRow] = []
    for (name, launcher, arch, config, source, dtype), pairs in zip(plans, compiled):
        launches = [launch for launch, _ in pairs]
        readings = [reading for _, reading in pairs]
        if launcher is None:
            from mlagen.bench import baseline as tutorial

            rows += _rows(
                "baseline",
                name,
                baseline_use(dtype),
                tutorial.role,
                arch,
                launches,
                lambda _: "tutorial settings",
                1,
                _baseline_shape(shape),
                readings,
            )
            continue
        splits = autotune.decode_splits(launcher, config, shape, ARCHS[arch])
        rows += _rows(
            "mlagen",
            name,
            launcher.use,
            lambda kernel, launcher=launcher: autotune.kernel_role(launcher, kernel),
            arch,
            launches,
            lambda launch, launcher=launcher, source=source: (
                source if launch.kernel in launcher.kernels else "launch defaults"
            ),
            splits,
            shape,
            readings,
        )
    return rows


# The baseline's problem: D128 causal MHA (the tutorial's benchmark shape class) at the
# inspected batch and sequence length, with this many heads.
BASELINE_HEADS = 32


def baseline_use(dtype: str) -> AttentionUse:
    return AttentionUse(
        "baseline",
        "prefill",
        "baseline",
        128,
        0,
        128,
        BASELINE_HEADS,
        BASELINE_HEADS,
        0,
        S,
        S,
        True,
        None,
        None,
        128**-0.5,
        dtype,
    )


def _baseline_shape(shape: Shape) -> Shape:
    from mlagen.bench import baseline as tutorial

    return Shape(shape.batch, -(-shape.seq_len // tutorial.BLOCK) * tutorial.BLOCK)


def _amount(value: float, unit: float) -> str:
    if not value:
        return "-"
    return f"{value / unit:,.0f}" if value / unit >= 100 else f"{value / unit:.3g}"


def format_inspect(
    spec: Spec | None, archs: list[int], shape: Shape, rows: list[KernelRow], dtype: str | None = None
) -> list[str]:
    lines: list[str] = []
    for arch in archs:
        limits = ARCHS[arch]
        name = spec.name if spec is not None else "baseline"
        if lines:
            lines.append("")
        lines += [
            f"{name} on sm_{arch} ({limits.gpu} limits: {limits.smem_per_block // 1024} KB shared per block, "
            f"{limits.regs_per_sm // 1024}K registers and {limits.max_warps} warps per SM), "
            f"{dtype or (spec.dtype if spec else 'bf16')}, batch {shape.batch}: prefill {shape.seq_len} tokens, "
            f"decode {shape.new_tokens} new token over {shape.seq_len} cached",
            "",
        ]
        body = []
        for row in (r for r in rows if r.arch == arch):
            c = row.compiled
            label = row.kernel if row.kind == "mlagen" else f"{row.kernel} (baseline)"
            if c.error:  # the message in the last column, where the table does not pad it
                body.append([label, row.use.node, row.settings] + [""] * 8 + ["compile failed: " + c.error])
                continue
            clocks = c.loop_clocks_per_1k_scores
            body.append(
                [
                    label,
                    row.use.node,
                    row.settings
                    + (" *" if row.source not in ("default", "launch defaults", "tutorial settings") else ""),
                    str(c.registers),
                    str(c.spill_bytes),
                    f"{c.shared_bytes / 1024:.1f}",
                    autotune.mma_text(c),
                    str(c.tma_loads),
                    f"{clocks:.0f}" if clocks is not None else "-",
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
                "TMA",
                "loop clk/1K",
                "warps/SM",
                "GFLOP",
                "MB",
            ],
            body,
        )
    tuned = sorted(
        {
            f"{row.use.kernel} {row.role}: {row.source}"
            for row in rows
            if row.source not in ("default", "launch defaults", "tutorial settings")
        }
    )
    lines += [
        "",
        "config: tile (BLOCK_M x BLOCK_N, decode: BLOCK_H x BLOCK_N), warps, stages, as launched; the static "
        "default of mlagen/runtime/launch.py"
        + (", * = from the tuning cache (" + "; ".join(tuned) + ")" if tuned else "")
        + "; helpers run with their launch defaults",
        "TMA: UTMALDG loads; loop clk/1K: issue-clocks per 1K scores of one program's hot loop (ANCHORS.md: "
        "instructions x warps / (tile / 1024) / 4); decode: per 1K (token-head row, key) pairs of the program, "
        "which keeps all latent columns on sm_90/sm_100 and half of them elsewhere and in fp32 (two programs "
        "then cover each pair: double the reading)",
        "warps/SM: resident warps the registers and shared memory allow (occupancy); "
        "GFLOP, MB: one call's matmul work and tensors moved (ANCHORS.md)",
    ]
    return lines
