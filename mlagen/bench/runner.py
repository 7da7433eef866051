"""`mlagen bench SPEC --mode ...`: check, then time, every contender at every shape, and
write one JSON file per run.

A contender is timed only after each of its outputs (and, in training, gradients) matched
the fp64 golden within ERROR_RATIO x the eager reference's error + ATOL[dtype]; a wrong one
is reported as "wrong" with its error, one that cannot run here as "unavailable" with the reason.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mlagen.bench.contenders import Contender, Env, Unavailable, contenders_for
from mlagen.bench.hardware import DeviceInfo, describe
from mlagen.bench.problems import (
    AbsorbedDecodeProblem,
    AttentionDims,
    AttentionProblem,
    DecodeInputs,
    ExpandedDecodeProblem,
    ModuleProblem,
    Outputs,
)
from mlagen.bench.timing import Progress, TimingMethod, measure_ms, timing_for
from mlagen.errors import MlagenError

SCHEMA = "mlagen-bench/1"
MODES = ("prefill", "train", "decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ERROR_RATIO = 2.0
ATOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2}  # bf16 as tests/test_gpu.py

# Sequence lengths (prefill, train) or cache lengths per sequence (decode).
DEFAULT_LENGTHS = {
    "prefill": (1024, 2048, 4096, 8192, 16384),
    "train": (1024, 2048, 4096, 8192, 16384),
    "decode": (1024, 4096, 16384),
}
SMOKE_LENGTHS = {"prefill": (16, 48), "train": (16, 48), "decode": (24, 80)}
TOKENS_PER_BATCH = 16384  # prefill / train batch = 16k tokens / seq_len, as FlashAttention's benchmarks
DEFAULT_DECODE_BATCH = 64
SMOKE_BATCH = 2
# Rows checked against the fp64 golden (all of them in smoke runs).
CHECK_ROWS = {"cuda": 128, "cpu": 64}
CHECK_PREFIX = {"cuda": 256, "cpu": 64}


@dataclass(frozen=True, slots=True)
class BenchRequest:
    spec: str | Path
    mode: str
    lengths: tuple[int, ...] | None = None
    batch: int | None = None
    smoke: bool = False
    out: str | Path = "benchmarks"
    dtype: str | None = None
    device: str | None = None
    generated: str | Path = "generated"
    progress: bool = True

    @property
    def command(self) -> str:
        """The command line that makes this run (options left at their defaults are left out)."""
        words = ["mlagen", "bench", str(self.spec), "--mode", self.mode]
        if self.lengths:
            words += ["--seq-lens", *map(str, self.lengths)]
        if self.batch is not None:
            words += ["--batch", str(self.batch)]
        for flag, value in (("--dtype", self.dtype), ("--device", self.device)):
            if value is not None:
                words += [flag, value]
        if self.smoke:
            words.append("--smoke")
        if Path(self.out) != Path("benchmarks"):
            words += ["--out", str(self.out)]
        if Path(self.generated) != Path("generated"):
            words += ["--generated", str(self.generated)]
        return shlex.join(words)


@dataclass(frozen=True, slots=True)
class BenchRun:
    path: Path
    data: dict


def smoke_substitute(spec) -> str | None:
    """The tiny_* spec of the same family whose shapes a smoke run uses; None for a tiny spec.
    (Real head dims are too slow under the interpreter even with few heads.)"""
    if spec.name.startswith("tiny_"):
        return None
    if spec.family == "mla":
        return "tiny_mla"
    if spec.family == "gqa":
        return "tiny_swa" if spec.window else "tiny_gqa"
    return {"mqa": "tiny_mqa", "mha": "tiny_mha_bidirectional"}[spec.family]


def _find_spec(name: str, beside: Path) -> Path:
    for folder in (beside.parent, Path(__file__).resolve().parents[2] / "specs"):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise MlagenError(
        f"--smoke needs specs/{name}.yaml (the test-sized spec of the family); it was not found"
    )


def _choose_device(requested: str | None, smoke: bool) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MlagenError("--device cuda given but torch sees no CUDA GPU; use --smoke for a CPU run")
    device = torch.device(requested)
    if device.type == "cpu" and not smoke:
        raise MlagenError(
            "no CUDA GPU: performance runs need one; `--smoke` checks the harness on CPU under the Triton "
            "interpreter with test-sized shapes"
        )
    if device.type not in ("cpu", "cuda"):
        raise MlagenError(f"--device {requested}: benchmarks run on cpu (smoke) or cuda")
    return device


def _choose_dtype(requested: str | None, spec, device: torch.device) -> str:
    dtype = requested or ("fp32" if device.type == "cpu" else spec.dtype)
    if device.type == "cpu" and dtype == "bf16":
        raise MlagenError(
            "bf16 kernels cannot run under the Triton interpreter (it multiplies raw bf16 bits); "
            "use --dtype fp32 or fp16 on CPU"
        )
    return dtype


def _lengths_and_batches(request: BenchRequest, max_position: int) -> list[tuple[int, int]]:
    table = SMOKE_LENGTHS if request.smoke else DEFAULT_LENGTHS
    lengths = request.lengths or table[request.mode]
    if any(n < 1 or n > max_position for n in lengths):
        raise MlagenError(
            f"--seq-lens {list(lengths)}: each must be in 1..{max_position} (the spec's max_position)"
        )
    if request.batch is not None and request.batch < 1:
        raise MlagenError(f"--batch {request.batch}: must be >= 1")

    def batch_for(length: int) -> int:
        if request.batch is not None:
            return request.batch
        if request.smoke:
            return SMOKE_BATCH
        if request.mode == "decode":
            return DEFAULT_DECODE_BATCH
        return max(1, TOKENS_PER_BATCH // length)

    return [(batch_for(n), n) for n in lengths]


def _versions() -> dict:
    import triton

    import mlagen

    return {
        "mlagen": mlagen.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def max_error(actual: Outputs, expected: Outputs) -> float:
    """Largest |actual - expected| over every output; inf for a shape mismatch or a NaN."""
    worst = 0.0
    if len(actual) != len(expected):
        return math.inf
    for a, e in zip(actual, expected):
        if a is None and e is None:
            continue
        if a is None or e is None or tuple(a.shape) != tuple(e.shape):
            return math.inf
        if a.numel():
            error = (a.detach().double() - e.double()).abs().max().item()
            worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


def relative_error(actual: torch.Tensor, golden: torch.Tensor) -> float:
    """||actual - golden|| / ||golden|| (METHOD.md: bf16 operands land between 1e-3 and 1e-2)."""
    difference = (actual.detach().double() - golden.double()).norm().item()
    scale = golden.double().norm().item()
    return difference / scale if scale else difference


def compare(
    outputs: Outputs,
    golden: Outputs,
    eager: Outputs,
    names: tuple[str, ...],
    *,
    atol: float = 0.0,
    atol_scale: float = 0.0,
) -> dict:
    """Each output against the golden by the error-ratio rule, with its own tolerance:
    ERROR_RATIO x eager's error + atol + atol_scale x max |golden| (so a gradient of large values
    does not loosen the check of an output of small ones). Returns passed, and the numbers of the
    output closest to failing (max_error None: NaN/inf or a wrong shape)."""
    worst = dict(worst_output=None, max_error=None, eager_error=None, tolerance=None, relative_error=None)
    if len(outputs) != len(golden):
        return dict(worst, passed=False)
    worst_score = -1.0
    for name, actual, gold, low in zip(names, outputs, golden, eager):
        if gold is None and actual is None:
            continue
        error = max_error((actual,), (gold,))
        eager_error = max_error((low,), (gold,))
        scale = gold.detach().abs().max().item() if gold is not None and gold.numel() else 0.0
        tolerance = ERROR_RATIO * eager_error + atol + atol_scale * scale
        score = (
            error / tolerance if math.isfinite(error) and tolerance > 0 else (0.0 if error == 0 else math.inf)
        )
        if score > worst_score:
            worst_score = score
            finite = math.isfinite(error)
            worst = dict(
                worst_output=name,
                max_error=error if finite else None,
                eager_error=eager_error,
                tolerance=tolerance,
                relative_error=relative_error(actual, gold) if finite else None,
            )
    return dict(worst, passed=worst_score <= 1.0)


def _reason(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, Unavailable):
        reason = str(exc)
    elif isinstance(exc, torch.OutOfMemoryError):
        reason = "out of memory: " + first
    else:
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    said = []
    for warning in caught:  # torch explains why an SDPA backend refused in warnings
        text = " ".join(str(warning.message).split())
        if text and text not in said:
            said.append(text)
    return "; ".join([reason, *said[:3]])


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error, already recorded by the call that hit it
            pass


class Case:
    """The problems of one (batch, length): built on first use, shared by the contenders."""

    def __init__(
        self,
        request: BenchRequest,
        spec,
        package,
        batch: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.request, self.spec, self.package = request, spec, package
        self.batch, self.length, self.dtype, self.device = batch, length, dtype, device
        self._built: dict[str, object] = {}

    def problem(self, kind: str):
        if kind not in self._built:
            self._built[kind] = self._build(kind)
        return self._built[kind]

    def _build(self, kind: str):
        train = self.request.mode == "train"
        where = self.device.type
        if kind == "attention":
            return AttentionProblem(
                AttentionDims.from_spec(self.spec),
                self.batch,
                self.length,
                self.dtype,
                self.device,
                train=train,
                check_rows=CHECK_ROWS[where],
            )
        if kind == "module":
            return ModuleProblem(
                self.package,
                self.spec,
                self.batch,
                self.length,
                self.dtype,
                self.device,
                train=train,
                check_len=CHECK_PREFIX[where],
            )
        inputs = self._built.get("inputs")
        if inputs is None:
            inputs = self._built["inputs"] = DecodeInputs(
                self.spec, self.batch, self.length, self.dtype, self.device
            )
        return AbsorbedDecodeProblem(inputs) if kind == "absorbed" else ExpandedDecodeProblem(inputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_record(contender: str, batch: int, length: int) -> dict:
    """A contender's JSON record before anything ran: "unavailable" until a reason or a time is known."""
    return {
        "contender": contender,
        "batch": batch,
        "seq_len": length,
        "status": "unavailable",
        "reason": None,
        "shape": None,
        "flops": None,
        "bytes": None,
        "time_ms": None,
        "tflops": None,
        "gbps": None,
        "roofline_fraction": None,
        "max_error": None,
        "eager_error": None,
        "tolerance": None,
        "worst_output": None,
        "relative_error": None,
        "first_call_s": None,
    }


def run_contender(
    contender: Contender,
    case: Case,
    env: Env,
    dtype_name: str,
    device: DeviceInfo,
    atol: float,
    timing: TimingMethod | None = None,
    atol_scale: float = 0.0,
) -> dict:
    """Check one contender at one shape against the golden (compare: every output, with
    atol + atol_scale x its largest golden value), then time it: its JSON record.

    `case` is anything with batch, length, dtype, device and problem(kind) (the suite has its own).
    first_call_s is the setup and first call (compiles, autotuning, cuDNN plans), kept out of
    the timed runs, which follow it."""
    record = empty_record(contender.name, case.batch, case.length)
    # A contender that cannot run is a result, not a crash of the run: every failure becomes a reason.
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problem = case.problem(contender.problem)
            record.update(shape=problem.shape(), flops=problem.flops, bytes=problem.bytes)
            _synchronize(case.device)
            started = time.perf_counter()
            prepared = contender.prepare(problem, env)
            outputs = prepared.check()
            _synchronize(case.device)
            record["first_call_s"] = time.perf_counter() - started
    except Exception as exc:
        record["reason"] = _reason(exc, caught)
        _free_memory(case.device)
        return record
    try:
        golden, eager = problem.expected(torch.float64), problem.expected(case.dtype)
    except Exception as exc:
        record["reason"] = "not checked, so not timed: the plain-torch reference failed: " + _reason(exc, [])
        return record
    verdict = compare(outputs, golden, eager, problem.output_names, atol=atol, atol_scale=atol_scale)
    del outputs
    passed = verdict.pop("passed")
    record.update(verdict)
    if record["max_error"] is None:
        record.update(status="wrong", reason="output has NaN/inf or the wrong shape; not timed")
        return record
    if not passed:
        record.update(
            status="wrong",
            reason=f"{record['worst_output']}: max error {record['max_error']:.3g} > tolerance "
            f"{record['tolerance']:.3g}; not timed",
        )
        return record
    try:
        ms = measure_ms(prepared.step, timing or timing_for(case.device))
    except Exception as exc:
        record["reason"] = "correct, but timing failed: " + _reason(exc, [])
        return record
    finally:
        _free_memory(case.device)
    seconds = ms / 1e3
    record.update(
        status="ok", time_ms=ms, tflops=record["flops"] / seconds / 1e12, gbps=record["bytes"] / seconds / 1e9
    )
    if device.gpu is not None:
        ideal = device.gpu.ideal_seconds(record["flops"], record["bytes"], dtype_name)
        record["roofline_fraction"] = None if ideal is None else ideal / seconds
    return record


def run_bench(request: BenchRequest, echo: Callable[[str], None] = print) -> BenchRun:
    """Run one benchmark (a spec, a mode, a list of shapes) and write its JSON file."""
    import mlagen
    from mlagen.runtime.launch import is_interpreted
    from mlagen.spec import LatentSpec, load_spec

    if request.mode not in MODES:
        raise MlagenError(f"--mode {request.mode}: choose one of {', '.join(MODES)}")
    spec_path = Path(request.spec)
    spec = load_spec(spec_path)
    if isinstance(spec, LatentSpec):
        raise MlagenError(
            f"{spec.name}: family latent has no benchmark yet; bench supports mla, mha, gqa, mqa"
        )
    device = _choose_device(request.device, request.smoke)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the generated kernels are imported
    note = None
    bench_path = spec_path
    if request.smoke:
        substitute = smoke_substitute(spec)
        if substitute is not None:
            bench_path = _find_spec(substitute, spec_path)
    bench_spec = load_spec(bench_path)
    if request.smoke:
        shapes = f"{bench_spec.name}'s shapes" if bench_path != spec_path else "its own shapes"
        where = "on CPU under the Triton interpreter" if device.type == "cpu" else f"on {device}"
        note = (
            f"smoke run: {spec.name} benched with {shapes} (same family, test-sized) {where}; "
            "it checks the harness end to end and its times are NOT performance numbers"
        )
    if request.mode == "decode" and bench_spec.family != "mla":
        raise MlagenError(
            f"{spec.name}: --mode decode benches the absorbed MLA decode kernel; family {spec.family} has none"
        )
    dtype_name = _choose_dtype(request.dtype, spec, device)
    dtype = DTYPES[dtype_name]
    cases = _lengths_and_batches(request, bench_spec.max_position)
    package = mlagen.load(bench_path, request.generated)
    interpreted = is_interpreted(package.kernels.KERNELS[0])
    if device.type == "cpu" and not interpreted:
        raise MlagenError(
            "the generated kernels were imported without TRITON_INTERPRET=1 in this process; "
            "run `mlagen bench --smoke` in a fresh process"
        )
    if device.type == "cuda" and interpreted:
        raise MlagenError("TRITON_INTERPRET=1 is set: unset it to time the kernels on the GPU")
    info = describe(device)
    env = Env(package, device, request.smoke)
    contenders = contenders_for(request.mode)
    if note:
        echo(note)
    progress = Progress(len(cases) * len(contenders), f"{spec.name} {request.mode}", request.progress)
    results = []
    try:
        for batch, length in cases:
            torch.manual_seed(0)
            case = Case(request, bench_spec, package, batch, length, dtype, device)
            for contender in contenders:
                results.append(run_contender(contender, case, env, dtype_name, info, ATOL[dtype_name]))
                progress.step(f"{contender.name} B={batch} S={length}")
            del case
            _free_memory(device)
    finally:
        progress.close()

    data = {
        "schema": SCHEMA,
        "spec": spec.name,
        "spec_file": str(spec_path),
        "benched_spec": bench_spec.name,
        "mode": request.mode,
        "smoke": request.smoke,
        "note": note,
        "dtype": dtype_name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": request.command,
        "device": info.to_json(),
        "versions": _versions(),
        "timing": timing_for(device).to_json(),
        "correctness": {
            "rule": "for every output and gradient: max |contender - fp64 golden| <= ratio x eager's error "
            "(reference in the bench dtype) + atol",
            "ratio": ERROR_RATIO,
            "atol": ATOL[dtype_name],
        },
        "length_meaning": "cache length per sequence" if request.mode == "decode" else "sequence length",
        "contenders": {c.name: c.description for c in contenders},
        "results": results,
    }
    out_dir = Path(request.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if request.smoke else ""
    path = out_dir / f"{spec.name}_{request.mode}_{info.slug}{suffix}.json"
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return BenchRun(path, data)
