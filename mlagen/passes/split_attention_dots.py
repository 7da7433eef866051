"""attention(concat(q_a, q_b), concat(k_a, expand(k_b)), v) -> attention(q_a, q_b, k_a, k_b, v).

MLA's score is q_nope.k_nope + q_pe.k_pe with one k_pe shared by every head.
The lowering writes the concatenated K that transformers builds; this pass
makes the attention take both parts, so the kernel runs two dot products into
one score and never materialises K (or k_pe copied per head) in memory.
"""

from __future__ import annotations

from mlagen.ir.ops import Graph, Node, OpKind, attention_operands

NAME = "split_attention_dots"


def _parts(graph: Graph, name: str) -> tuple[str, ...] | None:
    node = graph.node(name)
    if node.op is not OpKind.CONCAT or len(node.inputs) != 2:
        return None
    return node.inputs


def _unexpanded(graph: Graph, name: str) -> str:
    node = graph.node(name)
    return node.inputs[0] if node.op is OpKind.EXPAND_HEADS else name


def run(graph: Graph) -> Graph:
    nodes: list[Node] = []
    for node in graph.nodes:
        operands, index = attention_operands(node) if node.op is OpKind.ATTENTION else ((), None)
        if len(operands) == 3:
            q_parts, k_parts = _parts(graph, operands[0]), _parts(graph, operands[1])
            if q_parts and k_parts:
                (q_a, q_b), (k_a, k_b) = q_parts, k_parts
                if graph.node(q_a).shape[-1] == graph.node(k_a).shape[-1]:
                    node = Node(
                        node.name,
                        node.op,
                        (q_a, q_b, k_a, _unexpanded(graph, k_b), operands[2]) + ((index,) if index else ()),
                        node.shape,
                        node.dtype,
                        node.attrs,
                        node.field,
                    )
        nodes.append(node)
    return graph.with_nodes(tuple(nodes))
