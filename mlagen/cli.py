"""`mlagen` command line: wires spec, ir, passes and codegen; formats errors.

A user's mistake prints one line `mlagen: error: ...` and exits 2; `generate
--check` exits 1 when generated/ is stale. No tracebacks for either.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from mlagen.errors import MlagenError

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


def cmd_generate(args: argparse.Namespace) -> int:
    from mlagen.codegen import check_generated, generate
    from mlagen.spec import load_spec

    specs = [load_spec(path) for path in _specs(args.specs, args.all)]  # validate all before writing any
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


def _cache_line(spec) -> str:
    from mlagen.ir.analysis import cache_report

    cache = cache_report(spec)
    if not cache.bytes_per_token:
        return f"KV cache per token per layer: none ({cache.note})"
    return (
        f"KV cache per token per layer: {cache.values_per_token:g} values = {cache.bytes_per_token:g} bytes in "
        f"{spec.dtype} ({cache.note}); MHA equivalent {cache.mha_values_per_token:,} values = "
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
        subprocess.run([dot, "-Tsvg", str(out), "-o", str(svg)], check=True)
        print(f"wrote {svg}")
    else:
        print(
            "graphviz not installed: no SVG (apt-get install graphviz, or paste the .dot into any DOT viewer)"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mlagen.run import run_spec
    from mlagen.spec import load_spec

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
    print("  " + _cache_line(load_spec(args.spec)))
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from mlagen.spec.from_hf import convert_file, summary

    result = convert_file(args.config, args.output, name=args.name, force=args.force)
    print(f"{result.path}: {'wrote' if result.written else 'unchanged'}")
    print(f"  {summary(result.spec)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlagen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate kernels and modules into generated/<spec>/")
    gen.add_argument("specs", nargs="*", help="spec files (.yaml)")
    gen.add_argument("--all", action="store_true", help="every spec in specs/")
    gen.add_argument("--out", default="generated", help="output root (default: generated)")
    gen.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if regeneration would change files"
    )
    gen.set_defaults(run=cmd_generate)

    check = sub.add_parser("check", help="validate a spec; print shapes, parameters and KV-cache bytes")
    check.add_argument("spec")
    check.set_defaults(run=cmd_check)

    run = sub.add_parser(
        "run", help="generate, run the module on random input, compare with the fp64 reference"
    )
    run.add_argument("spec")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--seq", type=int, default=32)
    run.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp32 on CPU, the spec's on GPU"
    )
    run.add_argument("--device", help="cpu or cuda (default: cuda when available)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MlagenError as exc:
        print(f"mlagen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlagen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
