"""Graph -> Graphviz DOT text, so a user can look at what a spec lowers to."""

from __future__ import annotations

from mlagen.ir.ops import Graph, OpKind, format_shape

_COLORS = {
    OpKind.INPUT: "lightblue",
    OpKind.PARAM: "lightblue",
    OpKind.OUTPUT: "lightblue",
    OpKind.LINEAR: "khaki",
    OpKind.ATTENTION: "salmon",
    OpKind.ROPE: "palegreen",
    OpKind.RMS_NORM: "palegreen",
}


def _quote(*lines: str) -> str:
    """A DOT string literal; several lines are joined with DOT's own line break escape."""
    escaped = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def to_dot(graph: Graph) -> str:
    lines = [
        f"digraph {_quote(graph.spec_name + ' ' + graph.mode)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    for node in graph.nodes:
        detail = node.attr("param") or node.attr("kernel") or ""
        label = _quote(node.name, f"{node.op.value} {detail}".strip(), format_shape(node.shape))
        lines.append(f"  {_quote(node.name)} [label={label}, fillcolor={_COLORS.get(node.op, 'white')}];")
    for node in graph.nodes:
        for source in node.inputs:
            lines.append(f"  {_quote(source)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
