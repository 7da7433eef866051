"""Pick the kernel template variant for each attention node.

The variant is a deterministic name (like a FlashInfer URI) that the codegen
renders once per spec; the dims and head grouping become constexpr arguments
of the launch, so one template serves MLA, GQA, MQA and the latent family.
"""

from __future__ import annotations

from mlagen.ir.ops import Graph, Node, OpKind, attention_operands

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


def sparse_variant(graph: Graph, node: Node) -> dict[str, object]:
    """Absorbed attention over each query's selected latent rows (prefill, training and decode:
    contiguous rows or the paged cache, one kernel)."""
    q_latent, q_rope, latent, _, values = (graph.node(name) for name in attention_operands(node)[0])
    assert latent.name == values.name, f"{node.name}: sparse attention reads the latent as keys and values"
    width, rope = int(q_latent.shape[-1]), int(q_rope.shape[-1])
    return {"kernel": f"sparse_mla_lat{width}_rope{rope}", "d_a": width, "d_b": rope, "d_v": width}


def indexer_variant(graph: Graph, node: Node) -> dict[str, object]:
    """The lightning indexer's logits, named by the index head dim (the head count is a loop bound)."""
    dim = int(graph.node(node.inputs[0]).shape[-1])
    return {"kernel": f"indexer_logits_d{dim}", "d_a": dim}


def compressed_variant(graph: Graph, node: Node) -> dict[str, object]:
    """Attention over raw K = V rows and compressed entries with sinks and the output's inverse
    RoPE (DeepSeek-V4): one kernel for every layer type, named by the head and rope dims."""
    dim, rope = int(graph.node(node.inputs[1]).shape[-1]), node.attr("rope")[0]
    return {"kernel": f"compressed_attention_d{dim}_rope{rope}", "d_a": dim, "d_b": rope, "d_v": dim}


def compress_variant(graph: Graph, node: Node) -> dict[str, object]:
    """The compressor (pooling, RMSNorm, RoPE, the write), named by the entry and rope dims."""
    return {"kernel": f"compress_d{node.attr('dim')}_rope{node.attr('rope_dim')}"}


def entry_indexer_variant(graph: Graph, node: Node) -> dict[str, object]:
    """The lightning indexer over compressed entries (visible by causal threshold, not token by token)."""
    dim = int(graph.node(node.inputs[0]).shape[-1])
    return {"kernel": f"entry_indexer_logits_d{dim}", "d_a": dim}


def _variant(graph: Graph, node: Node) -> dict[str, object] | None:
    if node.op is OpKind.COMPRESS:
        return compress_variant(graph, node)
    if node.op is OpKind.INDEX_SCORES:
        return (entry_indexer_variant if node.attr("rate") else indexer_variant)(graph, node)
    if node.op is not OpKind.ATTENTION:
        return None
    if node.attr("output_rope"):
        return compressed_variant(graph, node)
    if node.attr("indexed"):
        return sparse_variant(graph, node)
    return (decode_variant if graph.mode == "decode" else attention_variant)(graph, node)


def run(graph: Graph) -> Graph:
    nodes = []
    for node in graph.nodes:
        variant = _variant(graph, node)
        nodes.append(node.with_attrs(**variant) if variant is not None else node)
    return graph.with_nodes(tuple(nodes))
