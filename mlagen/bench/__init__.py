"""Benchmarks of the generated kernels against their peers, with a roofline.

    run_bench(BenchRequest(spec, mode, command))  # check + time every contender, write one JSON file
    write_plots(directory)                         # PNGs from the JSON files (needs matplotlib)
    write_report(directory, "BENCHMARKS.md")       # the Markdown tables, from the JSON files

FLOP and byte conventions: mlagen.bench.flops; GPU peaks: mlagen.bench.hardware.
"""

from mlagen.bench.plot import write_plots
from mlagen.bench.report import load_runs, write_report
from mlagen.bench.runner import BenchRequest, BenchRun, run_bench

__all__ = ["BenchRequest", "BenchRun", "load_runs", "run_bench", "write_plots", "write_report"]
