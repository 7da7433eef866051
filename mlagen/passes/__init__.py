"""Graph rewrites, one per module, each `run(graph) -> graph`, registered by name.

`run_pipeline` applies a named pipeline; with verify=True (tests, MLAGEN_VERIFY=1)
the verifier runs before and after every pass and names the pass that broke it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from mlagen.errors import ShapeError
from mlagen.ir import Graph, verify
from mlagen.passes import (
    absorb_latent,
    attend_compressed_entries,
    eliminate_dead_nodes,
    fuse_output_rope,
    hoist_linear_over_repeat,
    select_kernels,
    split_attention_dots,
)


@dataclass(frozen=True, slots=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]
    doc: str


def _register(*modules: ModuleType) -> dict[str, Pass]:
    return {m.NAME: Pass(m.NAME, m.run, (m.__doc__ or "").strip().splitlines()[0]) for m in modules}


PASSES = _register(
    split_attention_dots,
    hoist_linear_over_repeat,
    absorb_latent,
    attend_compressed_entries,
    fuse_output_rope,
    eliminate_dead_nodes,
    select_kernels,
)

# A pass leaves alone what it does not apply to (absorption: decode graphs and sparse
# attention; hoisting: the latent family; compressed entries and the output rope: the
# compressed family), so every family runs the same pipeline.
PIPELINES: dict[str, tuple[str, ...]] = {
    "prefill": (
        "split_attention_dots",
        "hoist_linear_over_repeat",
        "absorb_latent",
        "attend_compressed_entries",
        "fuse_output_rope",
        "eliminate_dead_nodes",
        "select_kernels",
    ),
    "decode": ("split_attention_dots", "absorb_latent", "eliminate_dead_nodes", "select_kernels"),
}


def run_pipeline(graph: Graph, pipeline: str = "prefill", *, verify_each: bool | None = None) -> Graph:
    if verify_each is None:
        verify_each = os.environ.get("MLAGEN_VERIFY") == "1"
    verify(graph)
    for name in PIPELINES[pipeline]:
        graph = PASSES[name].run(graph)
        if verify_each:
            try:
                verify(graph)
            except ShapeError as exc:
                raise ShapeError(f"after pass {name}: {exc}") from None
    return verify(graph)
