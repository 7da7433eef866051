"""Timing a step, and a progress display for long runs.

On a GPU: triton.testing.do_bench, median of the timed runs, which flushes L2
before every run (so decode reads its cache from HBM, as in serving). On CPU
(smoke runs under the Triton interpreter) wall-clock time of a couple of runs:
it checks the harness, it is not a performance number.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TimingMethod:
    name: str  # "triton.testing.do_bench" or "time.perf_counter"
    warmup: float  # ms of warmup for do_bench; runs for perf_counter
    rep: float  # ms of timed runs for do_bench; runs for perf_counter

    def to_json(self) -> dict:
        unit = "ms" if self.name.startswith("triton") else "runs"
        return {
            "method": self.name,
            "warmup": self.warmup,
            "rep": self.rep,
            "unit": unit,
            "statistic": "median",
        }


GPU_TIMING = TimingMethod("triton.testing.do_bench", warmup=25, rep=100)
CPU_TIMING = TimingMethod("time.perf_counter", warmup=0, rep=2)  # the correctness run already warmed up
# The GPU suite measures a few hundred points in minutes: briefly each. do_bench still takes
# the median of every run that fits in `rep` (at least one) after `warmup`, L2 flushed before each.
SUITE_TIMING = TimingMethod("triton.testing.do_bench", warmup=10, rep=40)
SUITE_SMOKE_TIMING = TimingMethod("time.perf_counter", warmup=0, rep=1)


def timing_for(device: torch.device) -> TimingMethod:
    return GPU_TIMING if device.type == "cuda" else CPU_TIMING


def measure_ms(step: Callable[[], object], method: TimingMethod) -> float:
    """Median milliseconds of one call of `step`."""
    if method.name == "triton.testing.do_bench":
        import triton.testing

        return float(
            triton.testing.do_bench(step, warmup=method.warmup, rep=method.rep, return_mode="median")
        )
    for _ in range(int(method.warmup)):
        step()
    runs = []
    for _ in range(int(method.rep)):
        start = time.perf_counter()
        step()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


class Progress:
    """tqdm on stderr when it is installed, else a one-line counter; silent when disabled."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
            return
        print(f"\r[{self.done}/{self.total}] {label}".ljust(80), end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)
