"""attention(q, concat(k, entries), concat(k, entries), key_mask(pos, selected), sinks)
 -> attention(q, k, k, entries, selected, sinks) {causal, window, entry_rate}.

The lowering writes DeepSeek-V4's attention as transformers does: the compressed entries
appended to the raw K = V rows along the sequence and a dense key mask over both (the
sliding window, then each entry's causal threshold and the indexer's selection). This pass
gives the attention the raw keys, the entries and the selection as separate operands and
the mask as attributes, so the kernel walks the window's keys and then the entries (all
visible ones, or the selected ones) and never builds the concatenation or the mask.
"""

from __future__ import annotations

from mlagen.ir.ops import Graph, Node, OpKind, attention_extras
from mlagen.ir.shapes import infer

NAME = "attend_compressed_entries"


def _key_sources(graph: Graph, name: str) -> tuple[str, str | None]:
    """(raw keys, entries or None) of keys that are raw rows, or raw rows then entries."""
    node = graph.node(name)
    if node.op is OpKind.CONCAT and node.attr("axis") == 1:
        raw, entries = node.inputs
        return raw, entries
    return name, None


def run(graph: Graph) -> Graph:
    by_name = {node.name: node for node in graph.nodes}
    nodes: list[Node] = []
    for node in graph.nodes:
        extras = attention_extras(node) if node.op is OpKind.ATTENTION else {}
        mask = by_name[extras["masked"]] if "masked" in extras else None
        if mask is None or mask.op is not OpKind.KEY_MASK or node.inputs[1] != node.inputs[2]:
            nodes.append(node)
            continue
        raw, entries = _key_sources(graph, node.inputs[1])
        selected = mask.inputs[1] if len(mask.inputs) > 1 else None
        operands = (node.inputs[0], raw, raw)
        operands += (entries,) if entries else ()
        operands += (selected,) if selected else ()
        operands += (extras["sinks"],) if "sinks" in extras else ()
        attrs = {key: value for key, value in node.attrs if key != "masked"}
        attrs.update(causal=True, window=mask.attr("window"))
        if entries:
            attrs.update(entries=True, entry_rate=mask.attr("rate"))
        if selected:
            attrs.update(indexed=True)
        shape, dtype = infer(OpKind.ATTENTION, attrs, tuple(by_name[name] for name in operands))
        node = Node(
            node.name, OpKind.ATTENTION, operands, shape, dtype, tuple(sorted(attrs.items())), node.field
        )
        by_name[node.name] = node
        nodes.append(node)
    return graph.with_nodes(tuple(nodes))
