"""`mlagen inspect`: what each generated kernel costs on sm_80 ... sm_120, without a GPU.

For every launcher of a spec (forward, backward, decode) it takes the config the runtime
would choose on that arch (a tuning-cache entry for the arch, else the static default),
calls the launcher on meta tensors so that Triton specialises every kernel it launches
exactly as on a GPU (mlagen.aot), compiles those, and reports registers, spills, shared
memory, tensor-core and TMA instructions, the hot loop's issue-clocks per 1K scores and the
occupancy they allow, next to the FLOPs and bytes of one call at a given shape (ANCHORS.md
conventions). The sparse (DeepSeek-V3.2, GLM-5) and compressed (DeepSeek-V4) layers' kernels
are launched the same way, pass by pass with their launchers' own configs (mlagen.family_calls). `--baseline` adds the Triton-tutorial-style kernels (mlagen.bench.baseline)
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

from mlagen import autotune, family_calls
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
    if role == "decode" and use.kernel.startswith("mla_decode_"):  # K = V: the latent rows once
        return per_pair * (d_qk + d_v), e * (batch * seq_k * d_qk + q + o)
    if role == "decode_append":
        return 0.0, 2 * e * batch * seq_q * d_qk
    if role == "decode_combine":
        return 0.0, 4 * batch * splits * seq_q * hq * (d_v + 1) + e * o
    k = batch * seq_k * (hk * use.d_a + hkb * use.d_b)
    v = batch * seq_k * hk * d_v
    if role in ("forward", "decode"):  # a dense decode is the forward over the K/V cache
        return per_pair * (d_qk + d_v), e * (q + k + v + o) + stats
    if role == "backward_dkdv":
        writes = e * batch * seq_k * hk * (use.d_a + d_v) + 4 * batch * seq_k * hk * use.d_b
        return per_pair * 2 * (d_qk + d_v), e * (q + k + v + o) + 2 * stats + writes
    if role == "backward_dq":
        return per_pair * (2 * d_qk + d_v), e * (2 * q + k + v + o) + 2 * stats
    assert role == "backward_delta", role
    return 0.0, 2 * e * o + 2 * stats  # delta = rowsum(O * dO)


def layer_work(
    use: family_calls.FamilyUse, kernel: str, role: str, problem: family_calls.Problem, dtype: str
) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of one launch of a sparse or compressed layer's kernel, by the conventions
    of work(): matmul FLOPs over the (query, key) pairs it computes, each tensor read or written
    once (the rows a query selects once per query, its heads share them). Sparse MLA scores over
    the latent and rope (L + R) and sums latent values (L); each query attends to min(top_k,
    visible) keys. Compressed attention scores and sums D-wide K = V rows: the window's keys,
    then the closed entries it selects (all of them without an indexer). (None, None) where
    the launch depends on a choice of the launcher (the combine's split count)."""
    e = DTYPE_BYTES[dtype]
    batch, seq, heads = problem.batch, problem.seq_len, use.heads
    rows, new = problem.sequences, problem.new_tokens
    total = problem.context + new  # cached tokens after the decode step's
    visible = torch.arange(1, seq + 1, dtype=torch.float64)  # keys each prefill query sees (causal)
    index_heads, index_dim = use.index_heads, use.index_dim
    if isinstance(use, family_calls.SparseUse):
        latent, rope, top_k = use.latent, use.rope, use.top_k
        selected = batch * float(visible.clamp(max=top_k).sum())  # (query, key) pairs attended
        chosen = rows * new * min(top_k, total)  # decode
        stats = 4 * batch * heads * seq  # fp32 lse (and delta)
        index = 4 * batch * seq * min(top_k, seq)
        fp8 = (problem.cache_dtype or use.cache_dtype) == "fp8"
        row = latent + 4 * (latent // 128) + 2 * rope if fp8 else e * (latent + rope)  # FlashMLA's FP8 rows
        index_row = index_dim + 4 if fp8 else e * index_dim
        if role == "indexer":
            flops = 2 * batch * seq * (seq + 1) / 2 * index_heads * index_dim
            moved = e * batch * seq * (index_heads + 1) * index_dim + 4 * batch * seq * (index_heads + seq)
        elif role == "forward":
            flops = 2 * heads * selected * (2 * latent + rope)
            moved = (
                e * batch * seq * heads * (2 * latent + rope) + e * selected * (latent + rope) + index + stats
            )
        elif role == "backward":  # scores, dP, dV, dQ, dK in one kernel; row gradients added in fp32
            flops = 2 * heads * selected * (5 * latent + 3 * rope)
            queries = e * batch * seq * heads * (3 * latent + 2 * rope)  # Q, dQ, dO
            moved = queries + (e + 4) * selected * (latent + rope) + index + 2 * stats
        elif role == "backward_delta":
            flops, moved = 0.0, 2 * e * batch * seq * heads * latent + 2 * stats
        elif role == "decode":
            flops = 2 * heads * chosen * (2 * latent + rope)
            moved = row * chosen + e * rows * new * heads * (2 * latent + rope) + 4 * chosen
        elif role == "decode_indexer":
            flops = 2 * rows * new * total * index_heads * index_dim
            queries = e * rows * new * index_heads * index_dim
            moved = index_row * rows * total + queries + 4 * rows * new * (index_heads + total)
        elif role == "decode_append":
            flops, moved = 0.0, 2 * e * rows * new * (latent + rope)
        else:
            return None, None
        return flops, moved
    dim, rate, top_k, window = use.dim, use.rate, use.top_k, use.window
    closed = visible // rate if rate else torch.zeros_like(visible)  # entries each prefill query sees
    attended = closed.clamp(max=top_k) if top_k else closed
    pairs = batch * heads * float(visible.clamp(max=window).sum() + attended.sum())
    entries = batch * (seq // rate if rate else 0)
    index = 4 * batch * seq * min(top_k, seq // rate) if top_k else 0
    stats = 4 * batch * seq * heads
    seen = total // rate if rate else 0  # decode: entries in the cache
    compressor = next((c for c in use.compressors if c.kernel == kernel.removesuffix("_bwd")), None)
    if role == "forward":
        flops = 2 * pairs * 2 * dim
        moved = e * (2 * batch * seq * heads + batch * seq + entries) * dim + index + stats
    elif role == "backward":  # scores, dP, dV, dQ, dK in one kernel; key and entry gradients in fp32
        flops = 2 * pairs * 5 * dim
        moved = (e * (3 * batch * seq * heads) + (e + 4) * (batch * seq + entries)) * dim + index + 2 * stats
    elif role == "indexer":
        flops = 2 * batch * float(closed.sum()) * index_heads * index_dim
        moved = e * (batch * seq * index_heads + entries) * index_dim + 4 * batch * seq * (
            index_heads + seq // rate
        )
    elif role == "decode_indexer":
        flops = 2 * rows * new * seen * index_heads * index_dim
        moved = e * rows * (new * index_heads + seen) * index_dim + 4 * rows * new * (index_heads + seen)
    elif role == "decode":
        chosen = min(top_k, seen) if top_k else seen
        flops = 2 * rows * new * heads * (min(window, total) + chosen) * 2 * dim
        read = rows * (min(window, total) + (new * chosen if top_k else seen)) * dim  # ring and entries
        moved = e * read + 2 * e * rows * new * heads * dim + 4 * rows * new * chosen * bool(top_k)
    elif compressor is not None and role == "decode_compressor":  # new and pending tokens into closed windows
        slots = compressor.rate * (2 if compressor.overlap else 1)
        closes = max(1, -(-new // compressor.rate))
        flops, moved = 0.0, e * (2 * rows * (new + slots) * compressor.width + rows * closes * compressor.dim)
    elif compressor is not None:  # kv and gate in (and their gradients out), the entries out (or in)
        tokens = (4 if role == "compressor_backward" else 2) * batch * seq * compressor.width
        flops, moved = 0.0, e * (tokens + batch * (seq // compressor.rate) * compressor.dim)
    else:
        return None, None
    return flops, moved


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
            fields.get("dq_block_n"),
        )
        return config, f"{matches[0].get('method', 'tuned')} on {matches[0].get('gpu')}"
    return autotune.default_for(launcher, shape, arch), "default"


@dataclass(frozen=True, slots=True)
class KernelRow:
    kind: str  # "mlagen", or "baseline" (mlagen.bench.baseline)
    spec: str
    node: str  # the IR node it runs
    dtype: str
    kernel: str
    role: str  # autotune.kernel_role, or family_calls.role
    arch: int
    launch: Launch  # as Triton specialised it
    source: str  # where the config came from
    compiled: CompiledKernel
    flops: float | None  # None where not modelled (the sparse decode's combine)
    bytes: float | None
    use: AttentionUse | None = None  # the dense attention it computes; None for the other families

    @property
    def settings(self) -> str:
        """The launch's tile constexprs and options, e.g. "128x64 w8 s3" (BLOCK_M x BLOCK_N)."""
        constants = self.launch.constant
        tile = [constants[name] for name in ("BLOCK_M", "BLOCK_H", "BLOCK_N", "BLOCK_J") if name in constants]
        # how a program keeps a 512-wide output (sparse and compressed: COLUMNS; MLA decode: HALVES)
        others = [
            f"{name}={value}"
            for name, value in constants.items()
            if name in ("PAD_SPLITS", "PAGE", "COLUMNS") or (name == "MASKED_STAGES" and value is not None)
        ]
        others += ["HALVES"] * bool(constants.get("HALVES"))
        # the dense forward's decode choices: query heads packed into rows, keys split over programs
        others += [flag for flag in ("PACK_GQA", "SPLIT_KV") if constants.get(flag)]
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
            "node": self.node,
            "kernel": self.kernel,
            "role": self.role,
            "arch": f"sm_{self.arch}",
            "dtype": self.dtype,
            "config": {
                **{
                    k: v
                    for k, v in self.launch.constants
                    if k.startswith(
                        (
                            "BLOCK_",
                            "PAD_SPLITS",
                            "PAGE",
                            "PACK_GQA",
                            "SPLIT_KV",
                            "COLUMNS",
                            "HALVES",
                            "MASKED_STAGES",
                        )
                    )
                },
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
                "local_accesses": c.loop_local,
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
                kind,
                spec,
                use.node,
                use.dtype,
                launch.kernel,
                role,
                arch,
                launch,
                source(launch),
                reading,
                flops,
                moved,
                use,
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
    # (spec name, launcher, family use and pass, or None for the baseline; arch, config, source, dtype)
    plans: list[tuple] = []
    calls = []
    problem = family_calls.Problem.of(shape.batch, shape.seq_len, shape.new_tokens)
    with tempfile.TemporaryDirectory(prefix="mlagen-inspect-") as tmp:
        for spec in specs:
            kernels_file = autotune.render_kernels(spec, Path(tmp))
            module = autotune.load_kernels_file(kernels_file)
            uses = family_calls.family_uses(spec)
            for dtype in dtypes:
                for arch in archs:
                    for launcher in autotune.all_launchers(spec, dtype):
                        objects = autotune.kernel_objects(module, launcher)
                        config, source = chosen_config(launcher, objects, shape, arch, cached)
                        plans.append((spec.name, launcher, arch, config, source, dtype))
                        calls.append((autotune.launch_call(kernels_file, launcher, shape, config), arch))
                    # the sparse and compressed launchers choose their own config (no tuning cache)
                    for use in uses:
                        for part, call in family_calls.calls(kernels_file, use, problem, dtype):
                            plans.append((spec.name, (use, part), arch, None, "launch defaults", dtype))
                            calls.append((call, arch))
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
            return autotune.own_launches(launcher, launches) if isinstance(launcher, Launcher) else launches

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
        if not isinstance(launcher, Launcher):
            use, part = launcher
            for launch, reading in pairs:
                role = family_calls.role(part, launch.kernel)
                flops, moved = layer_work(use, launch.kernel, role, problem, dtype)
                node = family_calls.node_of(use, launch.kernel)
                rows.append(
                    KernelRow(
                        "mlagen",
                        name,
                        node,
                        dtype,
                        launch.kernel,
                        role,
                        arch,
                        launch,
                        source,
                        reading,
                        flops,
                        moved,
                    )
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
                body.append(
                    [label, row.node, row.role, row.settings] + [""] * 8 + ["compile failed: " + c.error]
                )
                continue
            clocks = c.loop_clocks_per_1k_scores
            body.append(
                [
                    label,
                    row.node,
                    row.role,
                    row.settings
                    + (" *" if row.source not in ("default", "launch defaults", "tutorial settings") else ""),
                    str(c.registers),
                    f"{c.spill_bytes} ({c.loop_local})" if c.spill_bytes else "0",
                    f"{c.shared_bytes / 1024:.1f}",
                    autotune.mma_text(c),
                    str(c.tma_loads),
                    f"{clocks:.0f}" if clocks is not None else "-",
                    f"{autotune.occupancy(c, limits)}/{limits.max_warps}",
                    _amount(row.flops, 1e9) if row.flops is not None else "-",
                    _amount(row.bytes, 1e6) if row.bytes is not None else "-",
                ]
            )
        lines += autotune.table(
            [
                "kernel",
                "node",
                "role",
                "config",
                "regs",
                "spill B (loop ld/st)",
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
            f"{row.kernel} {row.role}: {row.source}"
            for row in rows
            if row.source not in ("default", "launch defaults", "tutorial settings")
        }
    )
    lines += [
        "",
        "role: forward, backward (_dkdv, _dq, _delta), decode (_append, _combine); sparse and compressed "
        "layers also indexer, compressor (forward, _backward) and their decode_ steps",
        "config: tile (BLOCK_M x BLOCK_N; decode and sparse attention: BLOCK_H x BLOCK_N, rows of (token, head) "
        "or heads; compressor: BLOCK_J slots), warps, stages, as launched; the static default of "
        "mlagen/runtime/launch.py"
        + (", * = from the tuning cache (" + "; ".join(tuned) + ")" if tuned else "")
        + "; helpers, and the sparse and compressed kernels (mlagen/runtime/sparse.py, compressed_kernels.py), "
        "run with their launchers' defaults",
        "TMA: UTMALDG loads; loop clk/1K: issue-clocks per 1K scores of one program's hot loop (ANCHORS.md: "
        "instructions x warps / (tile / 1024) / 4); decode: per 1K (token-head row, key) pairs of the program "
        "(the MLA decode keeps all latent columns on sm_90/sm_100 and half of them elsewhere and in fp32: two "
        "programs then cover each pair, double the reading); indexers: (query, key) or (head, key) pairs",
        "spill B: registers spilled to local memory, and (in brackets) the local loads and stores in the "
        "hot loop: 0 there means the spill costs once per program, not per tile",
        "warps/SM: resident warps the registers and shared memory allow (occupancy); "
        "GFLOP, MB: one call's matmul work and tensors moved (ANCHORS.md; sparse and compressed layers: "
        "inspect_kernels.layer_work, over the keys each query selects)",
    ]
    return lines
