"""Shape and dtype rules, one per op kind.

The lowering builds every node's shape with these rules and the verifier
re-derives them after each pass, so a pass that wires a wrong edge is caught
with the spec field behind the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy

from mlagen.ir.ops import Node, OpKind, T, format_shape

Shape = tuple[sympy.Expr, ...]


class RuleViolation(Exception):
    """A shape rule failed; the caller adds which node and spec field."""


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuleViolation(message)


def _linear(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(
        _same(x.shape[-1], attrs["in_features"]),
        f"{attrs['param']} takes {attrs['in_features']} features, input has {x.shape[-1]}",
    )
    return (*x.shape[:-1], sympy.Integer(attrs["out_features"]))


def _rms_norm(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(_same(x.shape[-1], attrs["dim"]), f"norm over {attrs['dim']} features, input has {x.shape[-1]}")
    return x.shape


def _rope(attrs: dict[str, Any], x: Node, positions: Node) -> Shape:
    _expect(_same(x.shape[-1], attrs["dim"]), f"rope over {attrs['dim']} dims, input has {x.shape[-1]}")
    _expect(attrs["dim"] % 2 == 0, f"rope dim {attrs['dim']} must be even")
    _expect(
        all(_same(a, b) for a, b in zip(x.shape[:2], positions.shape)),
        f"positions {format_shape(positions.shape)} do not match tokens {format_shape(x.shape[:2])}",
    )
    return x.shape


def _slice(attrs: dict[str, Any], x: Node) -> Shape:
    start, stop = attrs["start"], attrs["stop"]
    _expect(
        0 <= start < stop and sympy.simplify(stop - x.shape[-1]) <= 0,
        f"slice [{start}:{stop}] outside last dim {x.shape[-1]}",
    )
    return (*x.shape[:-1], sympy.Integer(stop - start))


def _concat(attrs: dict[str, Any], *parts: Node) -> Shape:
    lead = parts[0].shape[:-1]
    for part in parts[1:]:
        _expect(
            len(part.shape) == len(lead) + 1 and all(_same(a, b) for a, b in zip(part.shape[:-1], lead)),
            f"concat of {format_shape(parts[0].shape)} and {format_shape(part.shape)}",
        )
    return (*lead, sympy.Add(*(part.shape[-1] for part in parts)))


def _split_heads(attrs: dict[str, Any], x: Node) -> Shape:
    heads, dim = attrs["heads"], attrs["head_dim"]
    _expect(_same(x.shape[-1], heads * dim), f"{x.shape[-1]} features do not split into {heads} x {dim}")
    return (*x.shape[:-1], sympy.Integer(heads), sympy.Integer(dim))


def _merge_heads(attrs: dict[str, Any], x: Node) -> Shape:
    return (*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _expand_heads(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(_same(x.shape[-2], 1), f"expand needs one head, input has {x.shape[-2]}")
    return (*x.shape[:-2], sympy.Integer(attrs["heads"]), x.shape[-1])


def _repeat_chunks(attrs: dict[str, Any], x: Node, like: Node) -> Shape:
    return (like.shape[0], attrs["chunks"] * x.shape[0], *x.shape[1:])


def _attention(attrs: dict[str, Any], *io: Node) -> Shape:
    """q [B, Sq, Hq, Dqk], k [B, Sk, Hk, Dqk], v [B, Sk, Hk, Dv]; or the split form
    (q_a, q_b, k_a, k_b, v) whose score is q_a.k_a + q_b.k_b, k_b having Hk or 1 heads."""
    if len(io) == 3:
        q, k, v = io
        pairs = [(q, k)]
    else:
        q, q_b, k, k_b, v = io
        pairs = [(q, k), (q_b, k_b)]
        _expect(_same(q_b.shape[2], q.shape[2]), f"q parts have {q.shape[2]} and {q_b.shape[2]} heads")
        _expect(
            _same(k_b.shape[2], k.shape[2]) or _same(k_b.shape[2], 1),
            f"second key part has {k_b.shape[2]} heads; needs {k.shape[2]} or 1",
        )
    for query, key in pairs:
        _expect(
            len(query.shape) == 4 and len(key.shape) == 4,
            f"attention takes [B, S, heads, dim] operands, got {format_shape(query.shape)}",
        )
        _expect(
            _same(query.shape[-1], key.shape[-1]),
            f"query dim {query.shape[-1]} differs from key dim {key.shape[-1]}",
        )
        _expect(_same(query.shape[0], key.shape[0]), "query and key batch differ")
        _expect(
            _same(key.shape[1], v.shape[1]), f"keys {key.shape[1]} and values {v.shape[1]} differ in length"
        )
    _expect(_same(k.shape[2], v.shape[2]), f"keys have {k.shape[2]} heads, values {v.shape[2]}")
    heads_q, heads_k = int(q.shape[2]), int(k.shape[2])
    _expect(heads_q % heads_k == 0, f"{heads_q} query heads cannot share {heads_k} kv heads evenly")
    return (*q.shape[:3], v.shape[3])


def _add(attrs: dict[str, Any], a: Node, b: Node) -> Shape:
    _expect(
        len(a.shape) == len(b.shape) and all(_same(x, y) for x, y in zip(a.shape, b.shape)),
        f"add of {format_shape(a.shape)} and {format_shape(b.shape)}",
    )
    return a.shape


def _gate(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(_same(x.shape[-2], attrs["heads"]), f"gate has {attrs['heads']} heads, input {x.shape[-2]}")
    return x.shape


def _cache_append(attrs: dict[str, Any], x: Node, positions: Node) -> Shape:
    _expect(
        _same(x.shape[-1], attrs["width"]), f"cache rows are {attrs['width']} wide, input has {x.shape[-1]}"
    )
    return (x.shape[0], T, x.shape[-1])


def _head_matmul(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(_same(x.shape[-2], attrs["heads"]), f"{attrs['heads']} heads expected, input has {x.shape[-2]}")
    _expect(
        _same(x.shape[-1], attrs["in_features"]),
        f"per-head matmul takes {attrs['in_features']} features, input has {x.shape[-1]}",
    )
    return (*x.shape[:-1], sympy.Integer(attrs["out_features"]))


def _output(attrs: dict[str, Any], x: Node) -> Shape:
    return x.shape


RULES: dict[OpKind, Callable[..., Shape]] = {
    OpKind.LINEAR: _linear,
    OpKind.RMS_NORM: _rms_norm,
    OpKind.ROPE: _rope,
    OpKind.SLICE: _slice,
    OpKind.CONCAT: _concat,
    OpKind.SPLIT_HEADS: _split_heads,
    OpKind.MERGE_HEADS: _merge_heads,
    OpKind.EXPAND_HEADS: _expand_heads,
    OpKind.REPEAT_CHUNKS: _repeat_chunks,
    OpKind.ATTENTION: _attention,
    OpKind.ADD: _add,
    OpKind.GATE: _gate,
    OpKind.CACHE_APPEND: _cache_append,
    OpKind.HEAD_MATMUL: _head_matmul,
    OpKind.OUTPUT: _output,
}


def infer(op: OpKind, attrs: dict[str, Any], inputs: tuple[Node, ...]) -> tuple[Shape, str]:
    """Shape and dtype of an op's result. INPUT and PARAM carry their own shapes."""
    shape = RULES[op](attrs, *inputs)
    dtype = (
        "int64"
        if op is OpKind.INPUT and attrs.get("integer")
        else next((node.dtype for node in inputs if node.dtype != "int64"), inputs[0].dtype)
    )
    return tuple(sympy.sympify(dim) for dim in shape), dtype
