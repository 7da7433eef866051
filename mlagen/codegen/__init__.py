"""Codegen: the only layer that knows jinja2. Spec -> graph -> passes -> files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlagen.codegen.emit import render, stale_files, write_package
from mlagen.ir import Graph, lower
from mlagen.passes import run_pipeline
from mlagen.spec import MlaSpec, Spec


@dataclass(frozen=True, slots=True)
class Generated:
    spec: Spec
    graph: Graph
    package_dir: Path
    files: dict[str, str]
    changed: tuple[str, ...]


def compile_spec(spec: Spec) -> tuple[Graph, dict[str, str]]:
    """The optimised prefill graph and the rendered files of a spec, in memory
    (for mla, the absorbed decode graph is compiled and rendered too)."""
    graph = run_pipeline(lower(spec), "prefill")
    decode = run_pipeline(lower(spec, "decode"), "decode") if isinstance(spec, MlaSpec) else None
    return graph, render(spec, graph, decode)


def generate(spec: Spec, out_root: str | Path = "generated") -> Generated:
    """Write generated/<spec.name>/ (only files that changed; atomically)."""
    graph, files = compile_spec(spec)
    package_dir = Path(out_root) / spec.name
    changed = write_package(files, package_dir)
    return Generated(spec, graph, package_dir, files, tuple(changed))


def check_generated(spec: Spec, out_root: str | Path = "generated") -> list[str]:
    """Files of generated/<spec.name>/ that regeneration would change."""
    _, files = compile_spec(spec)
    return stale_files(files, Path(out_root) / spec.name)


__all__ = ["Generated", "check_generated", "compile_spec", "generate"]
