"""The GPU-suite section of BENCHMARKS.md, written from the suite's JSON files
(gpu_suite_<device>.json): `mlagen bench --report` regenerates it, so no number is typed
by hand. Until a GPU has run the suite the section says so, and shows only what the CPU
smoke run proves: that the harness works end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlagen.bench.suite import SCHEMA, SECTION_TITLES, SECTIONS, is_decode
from mlagen.errors import MlagenError

TITLE = "## GPU suite: mlagen beside its peers on one GPU"
HOW_TO_RUN = """\
How to run it (one device call, at most 8 minutes, the GPU machine's own python, nothing to install):
`scripts/gpu_suite.sh` (bf16 tests, then the suite, then this report; outputs under `$OUT` when set),
or `PYTHONPATH=. python3 -m mlagen bench --suite gpu` followed by `mlagen bench --report`."""
WHAT = """\
What it measures: first every generated kernel (forward, backward, decode) in bf16 at a small shape that
leaves partial tiles, against the fp64 golden (error at most 2 x eager's in bf16 plus two bf16 steps at the
output's largest value, per output and gradient; a kernel that fails keeps its timings, marked **invalid**);
then prefill forward and forward + backward of D128 causal attention (Llama-3-8B's gqa, Llama-2-7B's mha)
and MLA 192/128 (DeepSeek-V2-Lite's 16 heads, DeepSeek-V3's 128) at 1k / 4k / 16k tokens (batch x length =
16k tokens), and absorbed MLA decode (16 and 128 heads; batch 1 / 16 / 64 / 128; cache 1k / 4k / 32k; 1 and
2 new tokens), beside torch SDPA (flash, cuDNN, efficient), FlexAttention (compiled once per shape family,
compile time excluded and shown apart), the Triton tutorial-style baseline, torch SDPA over the latent
cache, and FlashMLA / FlashInfer where installed. Each point is checked at its own shape before it is timed
(triton.testing.do_bench, median, L2 flushed before every run); the grid is trimmed, lowest tier first, to
fit the time budget, and a point left out says why.

The two newest DeepSeek attention kinds, with the same rules. DeepSeek Sparse Attention (DeepSeek-V3.2's
spec: 128 heads, a 64-head lightning indexer, top 2048 keys): prefill and forward + backward at 4k / 16k
tokens (indexer kernel, torch.topk, sparse MLA kernel in the absorbed form), and decode over the paged latent
cache in bf16 and in FlashMLA's FP8 layout (128 and 16 heads; batch 1 / 16 / 64; cache 4k / 32k; 1 and 2 new
tokens), beside mlagen's dense MLA of the same shape (what DSA saves: DeepSeek-V3's expanded prefill kernel,
the absorbed decode kernel over every cached row) and FlashMLA's sparse kernels where importable. Its checks
judge the indexer's scores (and which keys are visible, exactly) against the fp64 scores, and the sparse
attention over the fp64 selection against the fp64 attention: a selection that rounding reorders at the k-th
score is not an error. DeepSeek-V4 (its three layer types: CSA with a 512-entry indexer, HCA, sliding window
only): the whole generated layer, prefill and forward + backward at 4k / 16k tokens and decode over its
compressed cache (batch 1 / 16 / 64; cache 4k / 32k; 1 and 2 new tokens), beside the same layer's eager
reference_forward (refused, with the size, where its score matrix would not fit) and FlashMLA's MODEL1
kernels where importable. DSA's checks run at 2112 tokens, past its 2048-key selection; V4's at 1040 tokens
(260 entries): in bf16 a whole-layer check would fail, with no bug, wherever the bf16 projections reorder
CSA's 512th entry differently for the kernels and the eager layer; the fp32 smoke run and
tests/test_compressed.py check that selection biting.

How their FLOPs and bytes are counted. Sparse attention: 2 x H x (Dqk + Dv) per attended key with Dqk =
latent + rope (576) and Dv = latent (512), each query attending min(its visible keys, top_k) keys (not the
causal half of the sequence); the indexer adds 2 x H_I x (d_I + 1) per scored key (every visible key, causal
half in prefill, the whole cache per new token in decode); bytes, a lower bound: queries, outputs and keys
once (prefill: a query's gathered rows are not counted again; decode: each sequence's selected rows once),
the indexer's operands and its fp32 scores written and read back by top-k, FP8 rows at 656 B and indexer keys
at 132 B. Compressed layers: 2 x H x 2 x head_dim per
attended key, a query attending min(window, its position + 1) raw keys plus its visible entries (HCA: all of
them, position + 1 over the rate; CSA: at most top_k of them), summed over the exact positions; the CSA
indexer as above per scored entry; the gated pooling; and 2 FLOPs per projection weight per token (training:
attention x 3.5, projections x 3); bytes: weights once plus input and output, and for decode what each
sequence reads of its cache (the ring, the pending windows, the attended entries, CSA's indexer keys)."""


def load_suites(directory: str | Path) -> list[dict]:
    """Every GPU-suite JSON file in `directory`, newest first."""
    suites = []
    for path in sorted(Path(directory).glob("gpu_suite_*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MlagenError(f"{path}: cannot read it as JSON ({exc})") from None
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            data["_file"] = path
            suites.append(data)
    return sorted(suites, key=lambda d: d["date"], reverse=True)


def _relative(path: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(path, report_dir)).as_posix()


def _versions(data: dict) -> str:
    v = data["versions"]
    text = f"mlagen {v['mlagen']}, torch {v['torch']}, triton {v['triton']}, Python {v['python']}"
    return text + (f", CUDA {v['cuda']}" if v.get("cuda") else "")


def _device(data: dict) -> str:
    d = data["device"]
    text = d["name"] + (f" (sm_{d['capability'].replace('.', '')})" if d.get("capability") else "")
    roofline = d.get("roofline")
    if roofline:
        peaks = ", ".join(f"{dtype} {peak:.0f} TF" for dtype, peak in roofline["peak_tflops"].items())
        text += f"; roofline as {roofline['gpu']}: {roofline['bandwidth_gbps']:.0f} GB/s, {peaks}"
    return text


def _state(data: dict) -> str:
    if data["state"] == "running":
        return "**cut off**: the process ended before the suite finished (the file holds every point it completed)"
    trimmed = data.get("trimmed_points") or 0
    return data["state"] + (f", {trimmed} points trimmed before the run to fit the budget" if trimmed else "")


def _checks_table(data: dict) -> list[str]:
    lines = [
        "| kernel check | spec | status | worst output | max error | tolerance | eager error | relative error |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c in data["checks"]:
        status = c["status"] if c["status"] == "pass" else f"**{c['status'].upper()}**"
        numbers = [_g(c.get(k)) for k in ("max_error", "tolerance", "eager_error", "relative_error")]
        lines.append(
            f"| {c['name']} | {c.get('spec', '–')} | {status} | {c.get('worst_output') or '–'} | "
            + " | ".join(numbers)
            + " |"
        )
    failing = [c for c in data["checks"] if c["status"] != "pass" and c.get("reason")]
    if failing:
        lines += ["", *[f"- {c['name']}: {c['reason'].replace('|', '/')}" for c in failing]]
    return lines


def _g(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _cell(record: dict, decode: bool, with_time: bool = False) -> str:
    status = record["status"]
    if status in ("ok", "invalid"):
        roof = record["roofline_fraction"]
        share = f" ({100 * roof:.0f}%)" if roof is not None else ""
        if decode:
            text = f"{1e3 * record['time_ms']:.1f} µs, {record['gbps']:.0f} GB/s, {record['tflops']:.0f} TF{share}"
        elif with_time:  # the families' contenders compute different things: compare them by time
            text = f"{record['time_ms']:.2f} ms, {record['tflops']:.1f} TF{share}"
        else:
            text = f"{record['tflops']:.1f} TF{share}"
        return text + (" **invalid**" if status == "invalid" else "")
    return {"wrong": "**WRONG**", "skipped": "skipped"}.get(status, "–")


def _pivot(data: dict, section: str) -> list[str]:
    """Rows: the points of a section; columns: the contenders; cells: TF/s (decode: time, GB/s, TF/s)."""
    records = [r for r in data["results"] if r["section"] == section]
    if not records:
        return []
    decode = is_decode(section)
    family = section not in ("prefill", "train", "decode")
    names = list(dict.fromkeys(r["contender"] for r in records))
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (
            (r["target"], r["seq_q"], r["batch"], r["seq_len"])
            if decode
            else (r["target"], r["seq_len"], r["batch"])
        )
        rows.setdefault(key, {})[r["contender"]] = r
    head = "| target | new tokens | batch | cache len |" if decode else "| target | seq len | batch |"
    align = "|---|---:|---:|---:|" if decode else "|---|---:|---:|"
    lines = [head + "".join(f" {n} |" for n in names), align + "---|" * len(names)]
    # Targets in the grid's order (smaller models first), then by the numbers.
    grid = data["grid"]
    order = [
        *grid.get("decode_targets" if decode else "prefill_targets", {}),
        *grid.get("sparse_targets", {}),
        *grid.get("compressed_targets", {}),
    ]
    for key in sorted(rows, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1:])):
        cells = " | ".join(_cell(rows[key][n], decode, family) if n in rows[key] else "–" for n in names)
        lines.append("| " + " | ".join(map(str, key)) + f" | {cells} |")
    return lines


def _first_calls(data: dict) -> list[str]:
    """Setup and first call (compiles, autotuning, plans) per contender and section: excluded from every time."""
    totals: dict[tuple[str, str], list[float]] = {}
    for r in data["results"]:
        if r.get("first_call_s") is not None:
            totals.setdefault((r["contender"], r["section"]), []).append(r["first_call_s"])
    if not totals:
        return []
    lines = [
        "First calls (setup, compiles, autotuning; never in the times above), seconds:",
        "",
        "| contender | section | points | largest | total |",
        "|---|---|---:|---:|---:|",
    ]
    for (name, section), values in sorted(totals.items()):
        lines.append(f"| {name} | {section} | {len(values)} | {max(values):.2f} | {sum(values):.1f} |")
    return lines


def _reasons(data: dict) -> list[str]:
    """One line per (contender, reason) with how many points it covers."""
    seen: dict[tuple[str, str], int] = {}
    for r in data["results"]:
        if r["status"] not in ("ok",) and r.get("reason"):
            key = (r["contender"], r["reason"])
            seen[key] = seen.get(key, 0) + 1
    return [
        f"- `{name}` ({count} point{'s' * (count > 1)}): {reason.replace('|', '/')}"
        for (name, reason), count in seen.items()
    ]


def _gpu_run(data: dict, report_dir: Path) -> list[str]:
    timing = data["timing"]
    counts: dict[str, int] = {}
    for r in data["results"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"### {data['device']['name']} · {data['dtype']} · {data['date']}",
        "",
        f"- device: {_device(data)}",
        f"- versions: {_versions(data)}",
        f"- command: `{data['command']}`; state: {_state(data)}",
        f"- budget {data['budget_s']:.0f} s, estimated {data['estimated_s']:.0f} s, ran {data['elapsed_s'] or 0:.0f} s; "
        f"records: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        f"- timing: {timing['method']}, {timing['statistic']}, warmup {timing['warmup']:g} / rep {timing['rep']:g} "
        f"{timing['unit']}; correctness: {data['correctness']['rule']} (ratio {data['correctness']['ratio']:g}, "
        f"atol_scale {data['correctness']['atol_scale']:g})",
        f"- file: `{_relative(data['_file'], report_dir)}`",
        "",
        "Correctness, before any timing:",
        "",
        *_checks_table(data),
        "",
    ]
    for section in SECTIONS:
        table = _pivot(data, section)
        if table:
            if is_decode(section):
                unit = "time, GB/s, TF/s (roofline)"
            elif section in ("prefill", "train"):
                unit = "TF/s (roofline)"
            else:
                unit = "time, TF/s (roofline)"
            title = SECTION_TITLES[section]
            lines += [f"{title[0].upper()}{title[1:]}, {unit}:", "", *table, ""]
    first = _first_calls(data)
    if first:
        lines += [*first, ""]
    reasons = _reasons(data)
    if reasons:
        lines += ["Not measured, or not valid:", "", *reasons, ""]
    plot = data.get("plot") or {}
    if plot.get("file"):
        image = Path(data["_file"]).parent / plot["file"]
        lines += [f"![GPU suite roofline, {data['device']['name']}]({_relative(image, report_dir)})", ""]
    elif plot.get("note"):
        lines += [f"No roofline plot: {plot['note']}", ""]
    return lines


def _smoke_summary(data: dict, report_dir: Path) -> list[str]:
    """What the CPU smoke run proves, without its (meaningless) times."""
    passed = sum(1 for c in data["checks"] if c["status"] == "pass")
    ran = sorted({r["contender"] for r in data["results"] if r["status"] == "ok"})
    not_run = sorted({r["contender"] for r in data["results"]} - set(ran))
    return [
        f"The CPU smoke run (`{data['command']}`, {data['date']}, {_versions(data)}; "
        f"`{_relative(data['_file'], report_dir)}`) ran the same code path on test-sized stand-ins under the "
        f"Triton interpreter in {data['dtype']}: {passed} of {len(data['checks'])} kernel checks passed, "
        f"{len(data['results'])} records; checked and timed: {', '.join(ran) or 'none'}; recorded why not: "
        f"{', '.join(not_run) or 'none'}. Its times are not performance numbers and are not shown.",
        "",
    ]


def render_suite_section(suites: list[dict], report_dir: Path) -> str:
    gpu = [d for d in suites if not d["smoke"] and d["device"]["type"] == "cuda"]
    smoke = [d for d in suites if d not in gpu]
    lines = [TITLE, ""]
    if not gpu:
        lines += [
            "> **GPU numbers are pending: no GPU session has run the suite yet.** Nothing below is a",
            "> measurement; the section fills in from `gpu_suite_<device>.json` once one has.",
            "",
        ]
    lines += [WHAT, "", HOW_TO_RUN, ""]
    for data in gpu:
        lines += _gpu_run(data, report_dir)
    if smoke and not gpu:
        lines += _smoke_summary(smoke[0], report_dir)
    return "\n".join(lines).rstrip() + "\n"
