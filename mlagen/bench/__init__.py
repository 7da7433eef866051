"""Benchmarks of the generated kernels against their peers, with a roofline.

    run_bench(BenchRequest(spec, mode, command))  # check + time every contender, write one JSON file
    run_suite(SuiteRequest())                      # the GPU suite: every kernel checked, then everything timed
    write_plots(directory)                         # PNGs from the JSON files (needs matplotlib)
    write_report(directory, "BENCHMARKS.md")       # the Markdown tables, from the JSON files

FLOP and byte conventions: mlagen.bench.flops; GPU peaks: mlagen.bench.hardware.
"""

from mlagen.bench.plot import write_plots
from mlagen.bench.report import load_runs, write_report
from mlagen.bench.runner import BenchRequest, BenchRun, run_bench
from mlagen.bench.suite import SuiteRequest, SuiteRun, run_suite

__all__ = [
    "BenchRequest",
    "BenchRun",
    "SuiteRequest",
    "SuiteRun",
    "load_runs",
    "run_bench",
    "run_suite",
    "write_plots",
    "write_report",
]
