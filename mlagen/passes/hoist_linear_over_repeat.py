"""linear(repeat_chunks(p)) -> repeat_chunks(linear(p)).

The latent family repeats its M learned latents once per batch row and chunk.
Projecting the repeated copies costs B * chunks times the work of projecting
the M latents once and repeating the result, which this pass does instead.
"""

from __future__ import annotations

from dataclasses import replace

from mlagen.ir.ops import Graph, Node, OpKind
from mlagen.ir.shapes import infer

NAME = "hoist_linear_over_repeat"


def run(graph: Graph) -> Graph:
    by_name = {node.name: node for node in graph.nodes}
    nodes: list[Node] = []
    for node in graph.nodes:
        source = by_name[node.inputs[0]] if node.inputs else None
        if node.op is OpKind.LINEAR and source is not None and source.op is OpKind.REPEAT_CHUNKS:
            param, like = (by_name[name] for name in source.inputs)
            projected_name = f"{node.name}_once"
            shape, dtype = infer(OpKind.LINEAR, dict(node.attrs), (param,))
            projected = Node(
                projected_name, OpKind.LINEAR, (param.name,), shape, dtype, node.attrs, node.field
            )
            nodes.append(projected)
            by_name[projected_name] = projected
            node = replace(
                node, op=OpKind.REPEAT_CHUNKS, inputs=(projected_name, like.name), attrs=source.attrs
            )
        nodes.append(node)
        by_name[node.name] = node
    return graph.with_nodes(tuple(nodes))
