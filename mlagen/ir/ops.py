"""The IR: an immutable graph of small typed nodes with sympy shapes.

Shapes are tuples of sympy expressions over the symbols below, so a node says
`[B, S, heads, qk_nope_head_dim]` rather than a number that only holds for one
call. Passes return new graphs; nothing here is ever mutated.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import sympy

# Batch, query sequence length, and (for decode) cached sequence length.
B, S, T = sympy.symbols("B S T", integer=True, positive=True)


class OpKind(enum.Enum):
    INPUT = "input"  # a forward() argument
    PARAM = "param"  # a learned tensor used directly (latent tokens)
    LINEAR = "linear"  # x @ W^T (+ b), an nn.Linear named like Hugging Face's
    RMS_NORM = "rms_norm"
    ROPE = "rope"  # rotary embedding of the last dim, by position
    SLICE = "slice"  # a range of the last dim
    CONCAT = "concat"  # along the last dim
    SPLIT_HEADS = "split_heads"  # [..., H*D] -> [..., H, D]
    MERGE_HEADS = "merge_heads"  # [..., H, D] -> [..., H*D]
    EXPAND_HEADS = "expand_heads"  # [..., 1, D] -> [..., H, D] (a view, as transformers does for k_pe)
    REPEAT_CHUNKS = "repeat_chunks"  # [M, D] -> [B, C*M, D]: one copy of the latents per batch row and chunk
    ATTENTION = "attention"  # softmax(q.k * scale + mask) @ v
    ADD = "add"
    GATE = "gate"  # x * sigmoid(g[h]) per head
    CACHE_APPEND = (
        "cache_append"  # normalise + rope new latents, write them to the paged cache; the result is
    )
    #                                the whole cached sequence [B, T, r + dr] (a view, never materialised)
    HEAD_MATMUL = "head_matmul"  # x[..., h, :] @ W_h per head, W_h a slice of a linear's weight (absorption)
    LAYER_NORM = "layer_norm"  # nn.LayerNorm (weight and bias): the lightning indexer's key norm
    INDEX_SCORES = "index_scores"  # lightning indexer: sum_h w[s, h] * ReLU(q[s, h] . k[t]) * scale, causal
    TOP_K = "top_k"  # the k best-scoring keys per query: [B, S, min(k, T)] key positions, -1 where none
    CACHE_WRITE = "cache_write"  # write rows as they are into a cache buffer beside an append's rows;
    #                              the result is the whole cached sequence (a view, never materialised)
    COMPRESS = "compress"  # gated pooling of every `rate` tokens (with overlap: 2 * rate slots) into one
    #                        entry, then its RMSNorm and RoPE at the window's first position: [B, W, 1, D]
    KEY_MASK = "key_mask"  # which keys a query sees: a causal window over the raw tokens, then the
    #                        compressed entries closed before it (and among its selected ones) [B, S, S + W]
    GROUPED_LINEAR = "grouped_linear"  # [..., G, in] -> [..., G, out]: a linear per group (block-diagonal)
    OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class Node:
    """One op. `field` names the spec field(s) that decide its shape, for error messages."""

    name: str
    op: OpKind
    inputs: tuple[str, ...]
    shape: tuple[sympy.Expr, ...]
    dtype: str
    attrs: tuple[tuple[str, Any], ...] = ()
    field: str = ""

    def attr(self, key: str, default: Any = None) -> Any:
        for name, value in self.attrs:
            if name == key:
                return value
        return default

    def with_attrs(self, **updates: Any) -> Node:
        merged = dict(self.attrs)
        merged.update(updates)
        return replace(self, attrs=tuple(sorted(merged.items())))


@dataclass(frozen=True, slots=True)
class Graph:
    """Nodes in topological order; `outputs` are the names forward() returns."""

    spec_name: str
    mode: str
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    # Where spec fields were written (field -> "file:line"), for ShapeError messages.
    field_locations: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def users(self, name: str) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if name in node.inputs)

    def of_kind(self, op: OpKind) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if node.op is op)

    def with_nodes(self, nodes: tuple[Node, ...]) -> Graph:
        return replace(self, nodes=nodes)

    def to_networkx(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        for node in self.nodes:
            graph.add_node(node.name, node=node)
            for source in node.inputs:
                graph.add_edge(source, node.name)
        return graph

    def location(self, spec_field: str) -> str:
        first = spec_field.split(",")[0].strip()
        return dict(self.field_locations).get(first, "")


# Operands an attention node may take after its score and value operands, in this order, each
# present when the node's attribute of the same name is set: compressed entries (keys = values
# after the raw ones), the index (the keys, or with entries the entries, each query reads),
# a key mask [B, Sq, Sk] (bool), the per-head sink logits, and the query positions (for RoPE
# fused into the epilogue).
ATTENTION_EXTRAS = ("entries", "indexed", "masked", "sinks", "output_rope")


def attention_extras(node: Node) -> dict[str, str]:
    """The operands an attention node takes beyond q/k/v, by role (see ATTENTION_EXTRAS)."""
    roles = [role for role in ATTENTION_EXTRAS if node.attr(role)]
    return dict(zip(roles, node.inputs[len(node.inputs) - len(roles) :]))


def attention_operands(node: Node) -> tuple[tuple[str, ...], str | None]:
    """An attention node's score and value operands ((q, k, v) or (q_a, q_b, k_a, k_b, v)) and
    its index operand (sparse attention: the keys each query reads), or None."""
    extras = attention_extras(node)
    return node.inputs[: len(node.inputs) - len(extras)], extras.get("indexed")


def format_shape(shape: tuple[sympy.Expr, ...]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"
