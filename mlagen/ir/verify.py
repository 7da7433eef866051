"""The verifier: every edge's shape and dtype re-derived from the op rules.

Run before and after each pass in tests (and with MLAGEN_VERIFY=1 anywhere),
so a pass that breaks the graph is named at once, with the spec field behind
the node it broke.
"""

from __future__ import annotations

import sympy

from mlagen.errors import ShapeError
from mlagen.ir.ops import Graph, Node, OpKind, format_shape
from mlagen.ir.shapes import MIXED_DTYPE_OPS, NON_FLOAT_DTYPES, RuleViolation, infer


def _fail(graph: Graph, node: Node, message: str) -> ShapeError:
    location = graph.location(node.field)
    prefix = f"{location}: " if location else ""
    field = f"{node.field}: " if node.field else ""
    return ShapeError(f"{prefix}{field}node {node.name!r} ({node.op.value}): {message}")


def verify(graph: Graph) -> Graph:
    """Raise ShapeError on the first broken node; return the graph unchanged."""
    seen: dict[str, Node] = {}
    for node in graph.nodes:
        if node.name in seen:
            raise _fail(graph, node, "defined twice")
        missing = [name for name in node.inputs if name not in seen]
        if missing:
            raise _fail(graph, node, f"uses {', '.join(missing)} before it is defined")
        inputs = tuple(seen[name] for name in node.inputs)
        if node.op in (OpKind.INPUT, OpKind.PARAM):
            if inputs:
                raise _fail(graph, node, "an input or parameter takes no operands")
        else:
            floating = {n.dtype for n in inputs if n.dtype not in NON_FLOAT_DTYPES}
            if len(floating) > 1 and node.op not in MIXED_DTYPE_OPS:
                raise _fail(graph, node, f"operands mix dtypes {sorted(floating)}")
            try:
                shape, dtype = infer(node.op, dict(node.attrs), inputs)
            except RuleViolation as exc:
                raise _fail(graph, node, str(exc)) from None
            if len(shape) != len(node.shape) or any(
                sympy.simplify(a - b) != 0 for a, b in zip(shape, node.shape)
            ):
                raise _fail(
                    graph,
                    node,
                    f"declared {format_shape(node.shape)} but its operands give {format_shape(shape)}",
                )
            if dtype != node.dtype:
                raise _fail(graph, node, f"declared dtype {node.dtype} but operands give {dtype}")
        seen[node.name] = node
    for name in graph.outputs:
        if name not in seen:
            raise ShapeError(f"graph output {name!r} is not a node")
    return graph
