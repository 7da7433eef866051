"""Drop nodes no output depends on (inputs stay: they are the forward() signature)."""

from __future__ import annotations

import networkx as nx

from mlagen.ir.ops import Graph, OpKind

NAME = "eliminate_dead_nodes"


def run(graph: Graph) -> Graph:
    dag = graph.to_networkx()
    live = set(graph.outputs)
    for name in graph.outputs:
        live |= nx.ancestors(dag, name)
    return graph.with_nodes(tuple(n for n in graph.nodes if n.name in live or n.op is OpKind.INPUT))
