"""IR: typed ops with sympy shapes (ops), their rules (shapes), lowering and verification."""

from mlagen.ir.lower import lower
from mlagen.ir.ops import B, Graph, Node, OpKind, S, T
from mlagen.ir.verify import verify

__all__ = ["B", "S", "T", "Graph", "Node", "OpKind", "lower", "verify"]
