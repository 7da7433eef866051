"""`mlagen` command line: wires spec, ir, passes and codegen; formats errors.

A user's mistake prints one line `mlagen: error: ...` and exits 2; `generate
--check` exits 1 when generated/ is stale. No tracebacks for either.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from mlagen.errors import MlagenError, one_line

SPECS_DIR = Path("specs")


def _specs(paths: list[str], all_specs: bool) -> list[Path]:
    if all_specs:
        found = sorted(SPECS_DIR.glob("*.yaml"))
        if not found:
            raise MlagenError(f"--all found no specs in {SPECS_DIR.resolve()}; run from the project root")
        return found
    if not paths:
        raise MlagenError("name at least one spec file, or use --all")
    return [Path(p) for p in paths]


def _installed_elsewhere(name: str, out_root: Path) -> str | None:
    """Where `import name` finds a module outside `out_root`, or None."""
    if name in sys.builtin_module_names:
        return "built into Python"
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != out_root]
    found = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    for finder in sys.meta_path:  # editable installs and other import hooks
        if found is None and finder is not importlib.machinery.PathFinder and hasattr(finder, "find_spec"):
            found = finder.find_spec(name, None)
    if found is None:
        return None
    return found.origin or next(iter(found.submodule_search_locations or ()), "an import hook")


def _refuse_shadowing(specs: list, out: str) -> None:
    """Generating into a folder Python imports from (`--out .`) puts each package at the top level,
    where it would hide an installed module of the same name: refuse that name there."""
    out_root = Path(out).resolve()
    roots = {Path.cwd().resolve()} | {Path(p or ".").resolve() for p in sys.path}
    if out_root not in roots:
        return
    for spec in specs:
        where = _installed_elsewhere(spec.name, out_root)
        if where:
            raise MlagenError(
                f"{spec.where('name')}: name: {spec.name!r} is also an installed module ({where}); "
                f"generated into {out}, which Python imports from, it would hide that module; "
                f"rename the spec or generate into a subfolder (--out generated)"
            )


def cmd_generate(args: argparse.Namespace) -> int:
    from mlagen.codegen import check_generated, generate
    from mlagen.spec import load_spec

    # `--check` alone checks every shipped spec: the question is "is generated/ stale?".
    every = args.all or (args.check and not args.specs)
    specs = [load_spec(path) for path in _specs(args.specs, every)]  # validate all before writing any
    _refuse_shadowing(specs, args.out)
    if args.check:
        stale = {spec.name: check_generated(spec, args.out) for spec in specs}
        stale = {name: files for name, files in stale.items() if files}
        for name, files in stale.items():
            print(f"stale: {Path(args.out) / name}: {', '.join(files)}")
        if stale:
            print(f"{len(stale)} of {len(specs)} packages would change; run `mlagen generate` and commit")
            return 1
        print(f"{len(specs)} packages up to date")
        return 0
    for spec in specs:
        result = generate(spec, args.out)
        state = f"wrote {', '.join(result.changed)}" if result.changed else "unchanged"
        print(f"{result.package_dir}: {state}")
    return 0


def _format_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def cmd_check(args: argparse.Namespace) -> int:
    from mlagen.ir import lower
    from mlagen.ir.analysis import parameter_count
    from mlagen.ir.ops import format_shape
    from mlagen.passes import run_pipeline
    from mlagen.spec import load_spec

    if args.spec.endswith(".json"):
        return _check_config(args)
    spec = load_spec(args.spec)
    graph = run_pipeline(lower(spec), "prefill", verify_each=True)
    print(f"{spec.name}: family {spec.family}, dtype {spec.dtype}, content hash {spec.content_hash}")
    width = max(len(node.name) for node in graph.nodes)
    print(f"\n{'node':<{width}}  {'op':<13} {'shape':<28} dtype")
    for node in graph.nodes:
        detail = node.attr("param") or node.attr("kernel") or ""
        print(
            f"{node.name:<{width}}  {node.op.value:<13} {format_shape(node.shape):<28} {node.dtype}  {detail}"
        )
    params = parameter_count(graph)
    print(f"\nparameters: {params:,} ({_format_count(params)})")
    print(_cache_line(spec))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """A Hugging Face config.json with several attention layer types (DeepSeek-V4): each type's
    spec is checked, and the model's cache for one sequence at --context tokens is reported."""
    from mlagen.ir import lower
    from mlagen.ir.model_cache import ModelCache, describe
    from mlagen.passes import run_pipeline
    from mlagen.spec.from_hf import load_hf_config
    from mlagen.spec.from_hf_v4 import is_layered, layer_specs

    config = load_hf_config(args.spec)
    if not is_layered(config):
        raise MlagenError(
            f"{args.spec}: check reads config.json files of models with several attention layer types "
            "(DeepSeek-V4); convert others with `mlagen from-hf` and check the spec"
        )
    layered = layer_specs(config, "model", args.spec)
    print(f"{args.spec}: {layered.describe()}")
    for kind, spec in layered.specs.items():
        run_pipeline(lower(spec), "prefill", verify_each=True)
        print(f"  {kind}: {_cache_line(spec)}")
    counts = tuple((kind, layered.layer_types.count(kind), spec) for kind, spec in layered.specs.items())
    print("\n".join(describe(ModelCache(counts, args.context))))
    return 0


def _cache_line(spec) -> str:
    from mlagen.ir.analysis import cache_report

    cache = cache_report(spec)
    if not cache.bytes_per_token:
        return f"KV cache per token per layer: none ({cache.note})"
    return (
        f"KV cache per token per layer: {cache.values_per_token:g} values = {cache.bytes_per_token:g} bytes in "
        f"{cache.storage} ({cache.note}); MHA equivalent {cache.mha_values_per_token:,} values = "
        f"{cache.mha_bytes_per_token:,} bytes, {cache.ratio:.1f}x more"
    )


def cmd_graph(args: argparse.Namespace) -> int:
    from mlagen.ir import lower
    from mlagen.ir.dot import to_dot
    from mlagen.passes import run_pipeline
    from mlagen.spec import load_spec

    spec = load_spec(args.spec)
    graph = lower(spec) if args.lowered else run_pipeline(lower(spec), "prefill")
    out = Path(args.output or f"{spec.name}.dot")
    try:
        out.write_text(to_dot(graph), encoding="utf-8")
    except OSError as exc:
        raise MlagenError(f"cannot write {out}: {exc.strerror}") from None
    print(f"wrote {out}")
    dot = shutil.which("dot")
    if dot:
        svg = out.with_suffix(".svg")
        done = subprocess.run([dot, "-Tsvg", str(out), "-o", str(svg)], capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
            raise MlagenError(f"graphviz could not write {svg} ({reason}); {out} is written")
        print(f"wrote {svg}")
    else:
        print(
            "graphviz not installed: no SVG (apt-get install graphviz, or paste the .dot into any DOT viewer)"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mlagen.spec import load_spec

    spec = load_spec(args.spec)
    _refuse_shadowing([spec], args.out)
    from mlagen.run import run_spec  # imports torch: only once the spec is known to be usable

    report = run_spec(
        args.spec, batch=args.batch, seqlen=args.seq, dtype=args.dtype, device=args.device, out_root=args.out
    )
    where = "Triton kernels" if report.kernel_path else "plain-torch fallback"
    if report.kernel_path and report.device == "cpu":
        where += " under the interpreter"
    print(
        f"{report.spec_name}: batch {report.batch} x {report.seqlen} tokens, {report.dtype} on {report.device} "
        f"({where}), {report.seconds:.2f}s"
    )
    print(
        f"  max |module - fp64 reference| = {report.kernel_error:.3g}   "
        f"(eager {report.dtype} reference: {report.eager_error:.3g})"
    )
    print("  " + _cache_line(spec))
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from mlagen.spec import from_hf_v4
    from mlagen.spec.from_hf import convert_file, load_hf_config, summary

    if from_hf_v4.is_layered(load_hf_config(args.config)):
        results, layered = from_hf_v4.convert_file(args.config, args.output, name=args.name, force=args.force)
        for result in results:
            print(f"{result.path}: {'wrote' if result.written else 'unchanged'}")
            print(f"  {from_hf_v4.summary(result.spec)}")
        print(f"  {layered.describe()}")
        return 0
    result = convert_file(args.config, args.output, name=args.name, force=args.force)
    print(f"{result.path}: {'wrote' if result.written else 'unchanged'}")
    print(f"  {summary(result.spec)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mlagen.bench import BenchRequest, run_bench, write_plots, write_report
    from mlagen.bench.report import results_table

    if not (args.spec or args.suite or args.plot or args.report):
        raise MlagenError(
            "name a spec to benchmark, --suite gpu, or --plot / --report on the JSON files in --out"
        )
    if args.plan_for and not args.suite:
        raise MlagenError("--plan-for goes with --suite gpu")
    if args.suite:
        from mlagen.bench.suite import SuiteRequest, plan_for, run_suite

        given = [
            flag
            for flag, value in (
                ("a spec", args.spec),
                ("--mode", args.mode),
                ("--seq-lens", args.seq_lens),
                ("--batch", args.batch),
            )
            if value
        ]
        if given:
            raise MlagenError(f"--suite gpu runs its own grid: leave out {', '.join(given)}")
        if args.budget_s is not None and args.budget_s <= 0:
            raise MlagenError(f"--budget-s {args.budget_s:g}: give the seconds the suite may take, > 0")
        if args.plan_for:
            for line in plan_for(args.plan_for, args.budget_s, args.dtype or "bf16"):
                print(line)
            return 0
        # A GPU run writes its BENCHMARKS.md section; a smoke run only when --report asks.
        report_file = args.report_file if (args.report or not args.smoke) else None
        run_suite(
            SuiteRequest(
                smoke=args.smoke,
                out=args.out,
                budget_s=args.budget_s,
                device=args.device,
                dtype=args.dtype,
                generated=args.generated,
                report_file=report_file,
            )
        )
        return 0
    if args.budget_s is not None:
        raise MlagenError("--budget-s goes with --suite gpu")
    if args.spec:
        request = BenchRequest(
            args.spec,
            args.mode or "prefill",
            lengths=tuple(args.seq_lens or ()),
            batch=args.batch,
            smoke=args.smoke,
            out=args.out,
            dtype=args.dtype,
            device=args.device,
            generated=args.generated,
        )
        run = run_bench(request)
        print("\n".join(results_table(run.data)))
        print(f"wrote {run.path}")
    if args.plot:
        for path in write_plots(args.out):
            print(f"wrote {path}")
    if args.report:
        print(f"wrote {write_report(args.out, args.report_file)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from mlagen.aot import parse_archs
    from mlagen.autotune import Shape
    from mlagen.inspect_kernels import format_inspect, inspect_spec
    from mlagen.spec import load_spec

    if args.spec is None and not args.baseline:
        raise MlagenError("inspect needs a spec, or --baseline for the baseline kernels alone")
    spec = load_spec(args.spec) if args.spec is not None else None
    archs = parse_archs(args.arch)
    dtype = args.dtype or (spec.dtype if spec is not None else "bf16")
    if args.baseline and dtype == "fp32":
        raise MlagenError(
            "the baseline kernels run fp16 and bf16 (as Triton's tutorial); use --dtype bf16 or fp16"
        )
    shape = Shape(args.batch, args.seq_len)
    rows = inspect_spec(spec, archs, shape, dtype=dtype, workers=args.workers, baseline=args.baseline)
    if args.json:
        print(json.dumps([row.record() for row in rows], indent=1))
    else:
        print("\n".join(format_inspect(spec, archs, shape, rows, dtype)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from mlagen import autotune
    from mlagen.family_calls import untuned
    from mlagen.runtime.tuning_cache import cache_path
    from mlagen.spec import load_spec

    shapes = [autotune.Shape(batch, seq_len) for seq_len in args.seq_lens for batch in args.batch]
    spec = load_spec(args.spec)
    skipped = untuned(spec)
    if args.static:
        arch = autotune.parse_arch(args.arch)
        rankings = autotune.static_tune(spec, shapes, arch, workers=args.workers, write=args.write)
        print("\n".join(autotune.format_static(rankings, arch, args.top)))
        if skipped:
            print(f"\n{skipped}")
        if args.write:
            print(f"\nwrote the static winners for sm_{arch} to {cache_path()}")
        else:
            print(f"\nnothing was stored (add --write to store the winners for sm_{arch} in {cache_path()})")
        return 0
    if not torch.cuda.is_available():
        raise MlagenError(
            "tune times kernels on a CUDA GPU and torch sees none; "
            "`mlagen tune SPEC --static --arch sm_90` ranks the candidates without one"
        )
    results = autotune.tune_spec(args.spec, shapes, out_root=args.out, workers=args.workers)
    print("\n".join(autotune.format_tuned(results)))
    if skipped:
        print(f"\n{skipped}")
    print(f"\nwinners stored in {cache_path()}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mlagen.doctor import report

    print("\n".join(report()))
    return 0


def _count(text: str) -> int:
    """A batch, length, worker or row count: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def _device(text: str) -> str:
    name, _, index = text.partition(":")
    if name not in ("cpu", "cuda") or (index and not (name == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:N")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one `mlagen: error:` line, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mlagen: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlagen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate kernels and modules into generated/<spec>/")
    gen.add_argument("specs", nargs="*", help="spec files (.yaml)")
    gen.add_argument("--all", action="store_true", help="every spec in specs/")
    gen.add_argument("--out", default="generated", help="output root (default: generated)")
    gen.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if regeneration would change files (every spec when none is named)",
    )
    gen.set_defaults(run=cmd_generate)

    check = sub.add_parser("check", help="validate a spec; print shapes, parameters and KV-cache bytes")
    check.add_argument(
        "spec", help="a spec (.yaml), or a DeepSeek-V4 config.json: every layer type and the model's cache"
    )
    check.add_argument(
        "--context",
        type=_count,
        default=1 << 20,
        help="with a config.json: tokens of the sequence (default 1M)",
    )
    check.set_defaults(run=cmd_check)

    run = sub.add_parser(
        "run", help="generate, run the module on random input, compare with the fp64 reference"
    )
    run.add_argument("spec")
    run.add_argument("--batch", type=_count, default=1)
    run.add_argument("--seq", type=_count, default=32)
    run.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp32 on CPU, the spec's on GPU"
    )
    run.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--out", default="generated", help="output root (default: generated)")
    run.set_defaults(run=cmd_run)

    graph = sub.add_parser("graph", help="write the spec's IR as DOT (and SVG with graphviz)")
    graph.add_argument("spec")
    graph.add_argument("-o", "--output", help="DOT file (default: <spec name>.dot)")
    graph.add_argument("--lowered", action="store_true", help="the graph before passes")
    graph.set_defaults(run=cmd_graph)

    from_hf = sub.add_parser("from-hf", help="write a spec for the attention in a Hugging Face config.json")
    from_hf.add_argument("config", help="the model's config.json")
    from_hf.add_argument("-o", "--output", required=True, help="spec file to write, e.g. specs/my_model.yaml")
    from_hf.add_argument("--name", help="spec name (default: the output file's name)")
    from_hf.add_argument("--force", action="store_true", help="replace an existing spec file that differs")
    from_hf.set_defaults(run=cmd_from_hf)

    bench = sub.add_parser(
        "bench", help="check and time the kernels against torch SDPA, FlexAttention and the reference"
    )
    bench.add_argument("spec", nargs="?", help="spec file (.yaml); leave out with --suite, --plot, --report")
    bench.add_argument(
        "--suite",
        choices=("gpu",),
        help="gpu: check every kernel in bf16, then time prefill, training and MLA decode beside the peers "
        "within --budget-s (one process; JSON, roofline PNG, BENCHMARKS.md section)",
    )
    bench.add_argument(
        "--budget-s", type=float, help="with --suite: seconds the suite may take (default 420; smoke 300)"
    )
    bench.add_argument(
        "--plan-for",
        metavar="GPU",
        help="with --suite gpu: print the plan (points, estimated seconds, what the budget trims) a run on "
        "this GPU would make, e.g. 'NVIDIA H200', and exit (no GPU needed)",
    )
    bench.add_argument("--mode", choices=("prefill", "train", "decode"), help="default: prefill")
    bench.add_argument("--seq-lens", type=_count, nargs="+", help="sequence lengths (decode: cache lengths)")
    bench.add_argument("--batch", type=_count, help="default: 16k tokens / seq len; decode 64; smoke 2")
    bench.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: the spec's; fp32 on CPU")
    bench.add_argument("--device", type=_device, help="cuda (default when available) or cpu (with --smoke)")
    bench.add_argument("--smoke", action="store_true", help="test-sized shapes; on CPU under the interpreter")
    bench.add_argument("--out", default="benchmarks", help="folder of the JSON files and plots")
    bench.add_argument("--generated", default="generated", help="output root of the generated packages")
    bench.add_argument("--plot", action="store_true", help="write PNG plots from the JSON files in --out")
    bench.add_argument(
        "--report", action="store_true", help="rewrite BENCHMARKS.md's benchmark sections from the JSON files"
    )
    bench.add_argument("--report-file", default="BENCHMARKS.md", help="where --report writes")
    bench.set_defaults(run=cmd_bench)

    inspect = sub.add_parser(
        "inspect",
        help="compile a spec's kernels as launched for sm_80..sm_120 (no GPU): registers, spills, "
        "tensor cores, TMA, hot-loop clocks, FLOPs",
    )
    inspect.add_argument("spec", nargs="?", help="a spec (optional with --baseline)")
    inspect.add_argument(
        "--arch", default="sm_90", help="sm_80, sm_89, sm_90 (default), sm_100, sm_120, a comma list, or all"
    )
    inspect.add_argument("--json", action="store_true", help="one JSON record per kernel and arch")
    inspect.add_argument(
        "--baseline",
        action="store_true",
        help="also the Triton-tutorial-style kernels (mlagen.bench.baseline)",
    )
    inspect.add_argument(
        "--seq-len", type=_count, default=4096, help="tokens (decode: cached tokens); default 4096"
    )
    inspect.add_argument("--batch", type=_count, default=1)
    inspect.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: the spec's")
    inspect.add_argument("--workers", type=_count, help="compile processes (default: CPU count)")
    inspect.set_defaults(run=cmd_inspect)

    tune = sub.add_parser(
        "tune", help="time candidate configs on this GPU and cache the winners (or --static)"
    )
    tune.add_argument("spec")
    tune.add_argument("--seq-lens", type=_count, nargs="+", default=[1024, 4096], help="default: 1024 4096")
    tune.add_argument("--batch", type=_count, nargs="+", default=[1], help="default: 1")
    tune.add_argument("--static", action="store_true", help="no GPU: rank candidates by the static model")
    tune.add_argument(
        "--arch", default="sm_90", help="with --static: sm_80, sm_89, sm_90 (default), sm_100 or sm_120"
    )
    tune.add_argument("--write", action="store_true", help="with --static: store the winners in the cache")
    tune.add_argument("--top", type=_count, default=5, help="with --static: candidates shown per launcher")
    tune.add_argument("--workers", type=_count, help="compile processes (default: CPU count)")
    tune.add_argument("--out", default="generated", help="output root (default: generated)")
    tune.set_defaults(run=cmd_tune)

    doctor = sub.add_parser("doctor", help="versions, GPU, interpreter mode and the tuning cache")
    doctor.set_defaults(run=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # so a closed pipe shows up here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # The reader (`mlagen check ... | head -1`) stopped reading: end quietly, as a tool killed
        # by SIGPIPE would (the shell's 128 + 13), and keep Python's exit flush off the dead pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MlagenError as exc:
        print(f"mlagen: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlagen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
