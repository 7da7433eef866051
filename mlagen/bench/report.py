"""`mlagen bench --report`: BENCHMARKS.md written from the JSON runs, so no table is
ever typed by hand; also the result table `mlagen bench` prints after a run.

The report owns two blocks of the file, each between begin / end markers: the GPU suite
(suite_report, from gpu_suite_*.json) and the per-spec runs (from the `mlagen bench SPEC`
files). Everything outside the markers is left as it is, so hand-written sections live beside
them; a block whose markers are missing is added at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlagen.bench.runner import SCHEMA
from mlagen.errors import MlagenError

CONVENTIONS = """\
- FLOPs, by the conventions the peers' published numbers use (ANCHORS.md): attention forward
  2 * B * H * Sq * Sk_avg * (Dqk + Dv) (4 * B * H * Sq * Sk * D when Dqk = Dv), Sk_avg halved by a
  causal mask and cut by a sliding window; training = forward + backward = 3.5 x forward. The whole
  module adds 2 FLOPs per projection weight per token (x 3 in training).
- Absorbed MLA decode (FlashMLA's benchmark): flops = 2 * Sq * Hq * sum(Sk) * (Dqk + Dv) with
  Dqk = latent + rope, Dv = latent; bytes = elem * (sum(Sk) * Dqk + B * Sq * Hq * Dqk + B * Sq * Hq * Dv).
  sum(Sk) sums over the batch, so no further factor B (ANCHORS.md writes one, which double-counts the batch).
  The non-absorbed path is counted with its own per-head cache bytes, so compare decode contenders by time.
- Bytes of prefill: every operand read once and the output written once (x 3 in training);
  of the module: weights once plus input and output (a lower bound).
- DeepSeek Sparse Attention (GPU suite): each query attends min(visible keys, top_k) keys, so
  attention is 2 * H * (Dqk + Dv) per attended key with the absorbed widths (576, 512), not the causal
  half of the sequence; the lightning indexer adds 2 * H_I * (d_I + 1) per scored key (every visible key;
  the whole cache per new token in decode). Bytes, a lower bound: every key row once (decode: each
  sequence's selected rows once), the indexer's operands, and its fp32 scores written and read back
  by top-k; FP8 cache rows count 656 B, FP8 indexer keys 132 B.
- DeepSeek-V4 compressed layers (GPU suite, the whole layer): a query attends min(window, position + 1)
  raw keys plus its visible entries (HCA: (position + 1) // rate of them; CSA: at most top_k), 2 * H *
  2 * head_dim per key (K = V), summed over the exact positions; CSA's indexer as above per scored
  entry; the gated pooling; 2 FLOPs per projection weight per token. Decode bytes add what each
  sequence reads of its cache: the ring, the pending windows, the attended entries, the indexer keys.
- Roofline fraction = max(bytes / HBM bandwidth, flops / dense bf16 peak) / time, for known GPUs only
  (H100 SXM 3.35 TB/s and 989 TF, H200 4.8 TB/s and 989 TF, ...); none for unknown GPUs or fp32.
- Timing: triton.testing.do_bench, median, L2 flushed before every timed run (fresh L2 for decode);
  CPU smoke runs: time.perf_counter, median of a couple of runs.
- Every contender is checked before it is timed: max |out - fp64 golden| <= 2 x the eager
  reference's error + atol (outputs, and in training every input gradient). A wrong contender is
  reported as wrong and not timed; one that cannot run here as unavailable, with the reason."""


def load_runs(directory: str | Path) -> list[dict]:
    """Every benchmark JSON file in `directory` (other JSON files are ignored)."""
    runs = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MlagenError(f"{path}: cannot read it as JSON ({exc})") from None
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            data["_file"] = path
            runs.append(data)
    return runs


def _number(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _error(record: dict) -> str:
    if record.get("max_error") is None:
        return "–"
    return f"{record['max_error']:.2g} (≤ {record['tolerance']:.2g})"


def results_table(run: dict) -> list[str]:
    length = "cache len" if run["mode"] == "decode" else "seq len"
    lines = [
        f"| contender | batch | {length} | status | time (ms) | TF/s | GB/s | roofline | max error (tolerance) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in run["results"]:
        status = "**WRONG**" if r["status"] == "wrong" else r["status"]
        lines.append(
            f"| {r['contender']} | {r['batch']} | {r['seq_len']} | {status} | {_number(r['time_ms'], '.3f')} "
            f"| {_number(r['tflops'], '.3g')} | {_number(r['gbps'], '.3g')} | {_percent(r['roofline_fraction'])} "
            f"| {_error(r)} |"
        )
    return lines


def _reasons(run: dict) -> list[str]:
    """One line per (contender, reason): the table stays narrow, the reason is said once."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in run["results"]:
        if r["status"] != "ok" and r.get("reason"):
            seen.setdefault((r["contender"], r["reason"]), []).append(f"{r['batch']}x{r['seq_len']}")
    total = len({(r["batch"], r["seq_len"]) for r in run["results"]})
    lines = []
    for (name, reason), shapes in seen.items():
        where = "every shape" if len(shapes) == total else ", ".join(shapes)
        lines.append(f"- `{name}` ({where}): {reason.replace('|', '/')}")
    return lines


def _versions(run: dict) -> str:
    v = run["versions"]
    text = f"mlagen {v['mlagen']}, torch {v['torch']}, triton {v['triton']}, Python {v['python']}"
    return text + (f", CUDA {v['cuda']}" if v.get("cuda") else "")


def _device(run: dict) -> str:
    d = run["device"]
    text = d["name"]
    if d.get("capability"):
        text += f" (sm_{d['capability'].replace('.', '')})"
    roofline = d.get("roofline")
    if roofline:
        text += f"; roofline as {roofline['gpu']}: {roofline['bandwidth_gbps']:.0f} GB/s"
    return text


def _run_section(run: dict, report_dir: Path) -> list[str]:
    title = f"### {run['spec']} · {run['mode']} · {run['dtype']}"
    if run["benched_spec"] != run["spec"]:
        title += f" (shapes of {run['benched_spec']})"
    timing = run["timing"]
    lines = [title, ""]
    if run.get("note"):
        lines += [f"> **{run['note']}**", ""]
    lines += [
        f"- date: {run['date']}",
        f"- device: {_device(run)}",
        f"- versions: {_versions(run)}",
        f"- timing: {timing['method']}, {timing['statistic']}, warmup {timing['warmup']:g} / rep "
        f"{timing['rep']:g} {timing['unit']}",
        f"- command: `{run['command']}`",
        f"- file: `{Path(os.path.relpath(run['_file'], report_dir)).as_posix()}`",
        "",
        *results_table(run),
        "",
    ]
    reasons = _reasons(run)
    if reasons:
        lines += ["Not timed:", "", *reasons, ""]
    plot = Path(run["_file"]).with_suffix(".png")
    if plot.is_file():
        lines += [f"![{run['spec']} {run['mode']}]({Path(os.path.relpath(plot, report_dir)).as_posix()})", ""]
    return lines


def render_report(runs: list[dict], report_dir: Path) -> str:
    gpu = [r for r in runs if r["device"]["type"] == "cuda" and not r["smoke"]]
    smoke = [r for r in runs if r not in gpu]
    contenders: dict[str, dict[str, str]] = {}  # the same name means different things per mode
    for run in runs:
        key = "decode" if run["mode"] == "decode" else "prefill and train"
        contenders.setdefault(key, {}).update(run["contenders"])
    lines = []
    if not gpu:
        lines += [
            "> **GPU numbers are pending a GPU session.** Every run below is a CPU smoke run: test-sized",
            "> shapes under the Triton interpreter, which checks the benchmark harness end to end (every",
            "> contender checked against the fp64 golden, FLOPs, bytes, JSON, report). Their times are **not**",
            "> performance numbers. On a GPU: `make bench BENCH_FLAGS=` (or `mlagen bench SPEC --mode MODE`).",
            "",
        ]
    lines += ["## How the numbers are made", "", CONVENTIONS, ""]
    for key in sorted(contenders, reverse=True):
        lines += [f"Contenders, {key}:", ""]
        lines += [f"- `{name}`: {text}" for name, text in contenders[key].items()]
        lines.append("")
    lines += ["## GPU runs", ""]
    if gpu:
        for run in gpu:
            lines += _run_section(run, report_dir)
    else:
        lines += ["None yet.", ""]
    if smoke:
        lines += ["## CPU smoke runs: NOT performance numbers", ""]
        for run in smoke:
            lines += _run_section(run, report_dir)
    lines += _model_decode_section(report_dir, runs)
    rooflines = sorted({p for run in runs for p in Path(run["_file"]).parent.glob("roofline_*.png")})
    if rooflines:
        lines += ["## Roofline plots", ""]
        lines += [f"![{p.stem}]({Path(os.path.relpath(p, report_dir)).as_posix()})" for p in rooflines]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _model_decode_section(report_dir: Path, runs: list[dict]) -> list[str]:
    """Whole-model decode (python -m mlagen.bench.hf_decode): GPU runs only; the harness's
    CPU smoke run is a test, not a number."""
    from mlagen.bench.hf_decode import SCHEMA as HF_SCHEMA

    directories = sorted({Path(run["_file"]).parent for run in runs})
    documents = []
    for directory in directories:
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("schema") == HF_SCHEMA and not data["meta"].get("smoke"):
                documents.append(data)
    lines = ["## Whole-model decode: transformers, patched by mlagen or not", ""]
    if not documents:
        return lines + [
            "None yet (needs a GPU): `python -m mlagen.bench.hf_decode --layers 4 --batch 1 16 64 "
            "--context 4096 --out benchmarks/hf_decode_<gpu>.json`, then `mlagen bench --report`. "
            "DeepSeek-V3's attention sizes in a few layers with a small MLP, random weights; tokens/s of "
            "one-token steps over a filled cache, transformers eager and sdpa versus the patched model.",
            "",
        ]
    for data in documents:
        meta = data["meta"]
        lines += [
            f"{meta['date']}, {meta['device']}, {meta['dtype']}, {meta.get('config', '')}, torch {meta['torch']}, "
            f"{meta['steps']} timed steps after {meta['warmup']} warm-up:",
            "",
            "| contender | layers | batch | context | tokens/s | cache B/token |",
            "|---|---|---|---|---|---|",
        ]
        for row in data["results"]:
            speed = row.get("note") or _number(row["tokens_per_s"], ",.0f")
            lines.append(
                f"| {row['contender']} | {row['layers']} | {row['batch']} | {row['context']} | {speed} | "
                f"{_number(row.get('cache_bytes_per_token'), ',d')} |"
            )
        lines.append("")
    return lines


SUITE_BLOCK, RUNS_BLOCK = "gpu-suite", "runs"
FILE_TITLE = "# Benchmarks\n"


def _markers(block: str) -> tuple[str, str]:
    return (
        f"<!-- begin {block}: written by `mlagen bench --report` from the JSON files; edit the runs, not this -->",
        f"<!-- end {block} -->",
    )


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """`text` with each named block's content replaced (or appended, markers and all)."""
    for block, body in blocks.items():
        begin, end = _markers(block)
        start, stop = text.find(begin), text.find(end)
        if start >= 0 and stop > start:
            text = text[: start + len(begin)] + "\n\n" + body.strip() + "\n\n" + text[stop:]
        else:
            text = text.rstrip() + f"\n\n{begin}\n\n{body.strip()}\n\n{end}\n"
    return text


def write_report(directory: str | Path, path: str | Path = "BENCHMARKS.md") -> Path:
    """Rewrite the report's blocks of `path` from the JSON files in `directory`: the GPU-suite
    block always (it says "pending" without a GPU run), the per-spec block when such runs are there."""
    from mlagen.bench.suite_report import load_suites, render_suite_section

    runs, suites = load_runs(directory), load_suites(directory)
    if not runs and not suites:
        raise MlagenError(
            f"no benchmark JSON files in {directory}; run `mlagen bench SPEC --mode ...` or "
            "`mlagen bench --suite gpu` first"
        )
    path = Path(path)
    report_dir = path.resolve().parent
    blocks = {SUITE_BLOCK: render_suite_section(suites, report_dir)}
    if runs:
        blocks[RUNS_BLOCK] = render_report(runs, report_dir)
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else FILE_TITLE
        path.write_text(replace_blocks(text, blocks), encoding="utf-8")
    except OSError as exc:
        raise MlagenError(f"cannot write {path}: {exc.strerror}") from None
    return path
