"""Weight absorption for MLA (DeepSeek-V2, section 2.1.2), in decode graphs and for sparse
(indexed) attention in any graph.

    attention(q_nope, q_pe, k_nope = (c_kv @ W_UK_h), k_pe, v = (c_kv @ W_UV_h)[, index])
 -> o_lat = attention(q_lat = q_nope @ W_UK_h^T, q_pe, c_kv, k_pe, c_kv[, index]);  o = o_lat @ W_UV_h

q_nope . (c_kv W_UK_h) = (q_nope W_UK_h^T) . c_kv, and softmax(.) (c_kv W_UV_h) =
(softmax(.) c_kv) W_UV_h, so attention reads the latent itself: one shared KV head of
width kv_lora_rank (+ the rope key), and the graph keeps no [B, T, heads, dim].

Decode is bound by reading the cache, which the absorbed form reads once for all heads.
Sparse attention gives every query its own keys, so no two queries share a key tile: the
expanded form would gather heads x (qk + v) values per selected key and query (H 128:
80 KB), the absorbed form 576 values shared by all heads (1 KB). That is why FlashMLA's
sparse prefill is absorbed too, although it spends 3.4x the FLOPs of the expanded form.
"""

from __future__ import annotations

from mlagen.ir.ops import Graph, Node, OpKind, attention_operands
from mlagen.ir.shapes import infer

NAME = "absorb_latent"


def _expanded_part(graph: Graph, name: str) -> tuple[Node, Node, Node] | None:
    """(slice, split_heads, linear) when `name` is a slice of a per-head split of a linear."""
    part = graph.node(name)
    if part.op is not OpKind.SLICE:
        return None
    heads = graph.node(part.inputs[0])
    if heads.op is not OpKind.SPLIT_HEADS:
        return None
    linear = graph.node(heads.inputs[0])
    if linear.op is not OpKind.LINEAR or linear.attr("bias"):
        return None
    return part, heads, linear


def _absorbs(graph: Graph, node: Node) -> bool:
    return node.op is OpKind.ATTENTION and (graph.mode == "decode" or node.attr("indexed", False))


def run(graph: Graph) -> Graph:
    if not any(_absorbs(graph, node) for node in graph.nodes):
        return graph
    nodes: list[Node] = []
    by_name = {node.name: node for node in graph.nodes}

    def add(name: str, op: OpKind, inputs: tuple[str, ...], field: str, **attrs) -> str:
        shape, dtype = infer(op, attrs, tuple(by_name[i] for i in inputs))
        node = Node(name, op, inputs, shape, dtype, tuple(sorted(attrs.items())), field)
        nodes.append(node)
        by_name[name] = node
        return name

    for node in graph.nodes:
        operands, index = attention_operands(node) if _absorbs(graph, node) else ((), None)
        key = _expanded_part(graph, operands[2]) if len(operands) == 5 else None
        value = _expanded_part(graph, operands[4]) if key else None
        if not (key and value and key[2].name == value[2].name):
            nodes.append(node)
            continue
        q_nope, q_pe, _, k_pe, _ = operands
        (k_slice, heads, linear), (v_slice, _, _) = key, value
        per_head, latent = heads.attr("head_dim"), linear.attr("in_features")
        weight = dict(param=linear.attr("param"), heads=heads.attr("heads"), rows_per_head=per_head)
        q_lat = add(
            f"{node.name}_q_latent",
            OpKind.HEAD_MATMUL,
            (q_nope,),
            k_slice.field,
            **weight,
            in_features=k_slice.attr("stop") - k_slice.attr("start"),
            out_features=latent,
            rows=(k_slice.attr("start"), k_slice.attr("stop")),
            transpose=False,
        )
        c_kv = add(
            f"{node.name}_latent_head",
            OpKind.SPLIT_HEADS,
            linear.inputs,
            linear.field,
            heads=1,
            head_dim=latent,
        )
        o_lat = add(
            f"{node.name}_latent",
            OpKind.ATTENTION,
            (q_lat, q_pe, c_kv, k_pe, c_kv) + ((index,) if index else ()),
            node.field,
            **dict(node.attrs),
        )
        add(
            node.name,
            OpKind.HEAD_MATMUL,
            (o_lat,),
            v_slice.field,
            **weight,
            in_features=latent,
            out_features=v_slice.attr("stop") - v_slice.attr("start"),
            rows=(v_slice.attr("start"), v_slice.attr("stop")),
            transpose=True,
        )
    return graph.with_nodes(tuple(nodes))
