"""`mlagen bench --plot`: PNGs from the JSON runs. matplotlib is optional (the test
extra installs it); without it --plot stops with one line saying how to get it.

Per run: throughput against sequence length, one line per contender (TF/s for
prefill and training, GB/s for decode, which is bound by reading the cache).
Per device: the roofline, with every timed contender of every run as a point.
"""

from __future__ import annotations

from pathlib import Path

from mlagen.bench.report import load_runs
from mlagen.errors import MlagenError

SMOKE_TITLE = "CPU smoke run (Triton interpreter): NOT performance numbers"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MlagenError(
            "plots need matplotlib, which is not installed: pip install matplotlib (or pip install -e '.[test]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _throughput(plt, run: dict, path: Path) -> None:
    decode = run["mode"] == "decode"
    key, unit = ("gbps", "GB/s") if decode else ("tflops", "TF/s")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in run["contenders"]:
        points = sorted(
            (r["seq_len"], r[key]) for r in run["results"] if r["contender"] == name and r["status"] == "ok"
        )
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache length per sequence" if decode else "sequence length")
    ax.set_ylabel(f"achieved {unit}")
    title = f"{run['spec']} {run['mode']} ({run['dtype']}) on {run['device']['name']}"
    ax.set_title(title + ("\n" + SMOKE_TITLE if run["smoke"] else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# One marker per mode (per GPU-suite section), in the suite's order.
MARKERS = {
    "prefill": "o",
    "train": "s",
    "decode": "^",
    "sparse-prefill": "D",
    "sparse-train": "P",
    "sparse-decode": "v",
    "compressed-prefill": "X",
    "compressed-train": "*",
    "compressed-decode": "<",
}


def _roofline(plt, runs: list[dict], path: Path) -> None:
    """Colour = contender, marker = mode, one legend entry each (not one per point)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = MARKERS
    names = sorted({r["contender"] for run in runs for r in run["results"] if r["status"] == "ok"})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    intensities = []
    for run in runs:
        for r in run["results"]:
            if r["status"] != "ok" or not r.get("bytes"):
                continue
            intensity = r["flops"] / r["bytes"]
            intensities.append(intensity)
            ax.scatter(
                intensity, r["tflops"], marker=markers[run["mode"]], s=22, color=colors[r["contender"]]
            )
    handles = [Line2D([], [], color=colors[n], marker="o", linestyle="", label=n) for n in names]
    modes = sorted({run["mode"] for run in runs})
    handles += [Line2D([], [], color="gray", marker=markers[m], linestyle="", label=m) for m in modes]
    roofline = runs[0]["device"].get("roofline")
    dtype = runs[0]["dtype"]
    if roofline and intensities and dtype in roofline["peak_tflops"]:
        peak, bandwidth = roofline["peak_tflops"][dtype], roofline["bandwidth_gbps"] / 1e3  # TB/s
        low, high = min(intensities + [1.0]) / 2, max(intensities + [peak / bandwidth]) * 2
        xs = [low * (high / low) ** (i / 200) for i in range(201)]
        (roof,) = ax.plot(
            xs,
            [min(peak, x * bandwidth) for x in xs],
            color="black",
            linewidth=1,
            label=f"{roofline['gpu']} roofline ({dtype})",
        )
        handles.append(roof)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TF/s")
    smoke = all(run["smoke"] for run in runs)
    ax.set_title(f"roofline: {runs[0]['device']['name']}" + ("\n" + SMOKE_TITLE if smoke else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(directory: str | Path) -> list[Path]:
    """One throughput PNG per JSON run (same stem), one roofline PNG per device, dtype and kind of run."""
    plt = _pyplot()
    runs = load_runs(directory)
    if not runs:
        raise MlagenError(f"no benchmark JSON files in {directory}; run `mlagen bench SPEC --mode ...` first")
    written = []
    for run in runs:
        path = Path(run["_file"]).with_suffix(".png")
        _throughput(plt, run, path)
        written.append(path)
    groups: dict[str, list[dict]] = {}
    for run in runs:  # peaks differ by dtype, and smoke points must not sit under a GPU's roof
        name = f"{run['device']['slug']}_{run['dtype']}" + ("_smoke" if run["smoke"] else "")
        groups.setdefault(name, []).append(run)
    for name, group in groups.items():
        path = Path(directory) / f"roofline_{name}.png"
        _roofline(plt, group, path)
        written.append(path)
    return written


def write_suite_roofline(data: dict, path: str | Path) -> Path:
    """The GPU suite's roofline: every correct timing (invalid ones left out) of every section."""
    plt = _pyplot()
    runs = []
    for section in MARKERS:
        results = [r for r in data["results"] if r["section"] == section and r["status"] == "ok"]
        if results:
            runs.append(dict(data, mode=section, results=results))
    if not runs:
        raise MlagenError("no contender was timed, so there is nothing to plot")
    _roofline(plt, runs, Path(path))
    return Path(path)
