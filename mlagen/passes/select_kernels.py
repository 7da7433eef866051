"""Pick the kernel template variant for each attention node.

The variant is a deterministic name (like a FlashInfer URI) that the codegen
renders once per spec; the dims and head grouping become constexpr arguments
of the launch, so one template serves MLA, GQA, MQA and the latent family.
"""

from __future__ import annotations

from mlagen.ir.ops import Graph, Node, OpKind

NAME = "select_kernels"


def attention_variant(graph: Graph, node: Node) -> dict[str, object]:
    operands = [graph.node(name) for name in node.inputs]
    split = len(operands) == 5
    q_a, v = operands[0], operands[-1]
    d_a, d_v = int(q_a.shape[-1]), int(v.shape[-1])
    d_b = int(operands[1].shape[-1]) if split else 0
    second = f"_rope{d_b}" if split else ""
    return {
        "kernel": f"attention_fwd_qk{d_a}{second}_v{d_v}",
        "d_a": d_a,
        "d_b": d_b,
        "d_v": d_v,
    }


def decode_variant(graph: Graph, node: Node) -> dict[str, object]:
    """Attention over the paged cache (absorbed MLA): a decode kernel named by its widths."""
    q_latent, q_rope = (graph.node(name) for name in node.inputs[:2])
    latent, rope = int(q_latent.shape[-1]), int(q_rope.shape[-1])
    return {
        "kernel": f"mla_decode_lat{latent}_rope{rope}",
        "d_a": latent,
        "d_b": rope,
        "d_v": latent,
    }


def run(graph: Graph) -> Graph:
    choose = decode_variant if graph.mode == "decode" else attention_variant
    nodes = tuple(
        node.with_attrs(**choose(graph, node)) if node.op is OpKind.ATTENTION else node
        for node in graph.nodes
    )
    return graph.with_nodes(nodes)
