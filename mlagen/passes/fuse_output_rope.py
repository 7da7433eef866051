"""rope_inverse(attention(...), positions) -> attention(..., positions) {output_rope}.

With K = V (DeepSeek-V4) the values carry the keys' RoPE, which the layer rotates back on
the attention output at the query's position. Folded into the attention, the rotation is a
few multiplies on the output tile before it is stored, instead of another pass over
[B, S, heads, head_dim] in memory.
"""

from __future__ import annotations

from dataclasses import replace

from mlagen.ir.ops import Graph, Node, OpKind
from mlagen.ir.shapes import infer

NAME = "fuse_output_rope"


def _foldable(graph: Graph, rope: Node) -> Node | None:
    """The attention an inverse tail RoPE rotates back, when the rope is its only user."""
    if rope.op is not OpKind.ROPE or not rope.attr("inverse"):
        return None
    source = graph.node(rope.inputs[0])
    if source.op is not OpKind.ATTENTION or source.attr("output_rope") or len(graph.users(source.name)) != 1:
        return None
    return source


def run(graph: Graph) -> Graph:
    folded = {}  # attention name -> its inverse rope
    for node in graph.nodes:
        source = _foldable(graph, node)
        if source is not None:
            folded[source.name] = node
    if not folded:
        return graph
    by_name = {node.name: node for node in graph.nodes}
    renamed = {rope.name: attention for attention, rope in folded.items()}
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.name in renamed:
            continue
        if node.name in folded:
            rope = folded[node.name]
            attrs = dict(node.attrs)
            attrs.update(
                output_rope=True,
                rope=(rope.attr("dim"), rope.attr("theta"), rope.attr("layout"), rope.attr("yarn")),
            )
            operands = (*node.inputs, rope.inputs[1])
            shape, dtype = infer(OpKind.ATTENTION, attrs, tuple(by_name[name] for name in operands))
            node = Node(node.name, node.op, operands, shape, dtype, tuple(sorted(attrs.items())), node.field)
        elif any(name in renamed for name in node.inputs):
            node = Node(
                node.name,
                node.op,
                tuple(renamed.get(name, name) for name in node.inputs),
                node.shape,
                node.dtype,
                node.attrs,
                node.field,
            )
        by_name[node.name] = node
        nodes.append(node)
    outputs = tuple(renamed.get(name, name) for name in graph.outputs)
    return replace(graph, nodes=tuple(nodes), outputs=outputs)
