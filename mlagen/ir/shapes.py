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
    """`tail`: rotate the last `dim` dims of x and pass the others through (DeepSeek-V4)."""
    if attrs.get("tail"):
        _expect(
            sympy.simplify(x.shape[-1] - attrs["dim"]) >= 0,
            f"rope over the last {attrs['dim']} of {x.shape[-1]} dims",
        )
    else:
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
    if attrs.get("axis") == 1:  # along the sequence: keys after keys
        rest = parts[0].shape[2:]
        for part in parts[1:]:
            _expect(
                len(part.shape) == len(parts[0].shape)
                and _same(part.shape[0], parts[0].shape[0])
                and all(_same(a, b) for a, b in zip(part.shape[2:], rest)),
                f"sequence concat of {format_shape(parts[0].shape)} and {format_shape(part.shape)}",
            )
        return (parts[0].shape[0], sympy.Add(*(part.shape[1] for part in parts)), *rest)
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


INTEGER_DTYPES = ("int32", "int64")
NON_FLOAT_DTYPES = (*INTEGER_DTYPES, "bool")  # operands that do not decide a result's float dtype


def _attention(attrs: dict[str, Any], *io: Node) -> Shape:
    """q [B, Sq, Hq, Dqk], k [B, Sk, Hk, Dqk], v [B, Sk, Hk, Dv]; or the split form
    (q_a, q_b, k_a, k_b, v) whose score is q_a.k_a + q_b.k_b, k_b having Hk or 1 heads.
    Sparse attention adds a last operand, index [B, Sq, K]: the positions (in the keys' sequence
    dim, -1 for none) of the only keys each query attends to.
    Compressed attention (ops.ATTENTION_EXTRAS) adds entries [B, W, Hk, Dqk] after the keys
    (values too: K = V), a key mask [B, Sq, Sk], sinks [Hq] and positions [B, Sq]; with entries
    the index picks entries."""
    if attrs.get("output_rope"):
        *io, positions = io
        _expect(
            all(_same(a, b) for a, b in zip(positions.shape, io[0].shape[:2])),
            f"positions {format_shape(positions.shape)} do not match queries {format_shape(io[0].shape[:2])}",
        )
    if attrs.get("sinks"):
        *io, sinks = io
        _expect(
            len(sinks.shape) == 1 and _same(sinks.shape[0], io[0].shape[2]),
            f"sinks {format_shape(sinks.shape)} must be one logit per query head ({io[0].shape[2]})",
        )
    if attrs.get("masked"):
        *io, mask = io
        _expect(mask.dtype == "bool", f"the key mask must be bool, got {mask.dtype}")
        _expect(
            len(mask.shape) == 3
            and all(_same(a, b) for a, b in zip(mask.shape, (*io[0].shape[:2], io[1].shape[1]))),
            f"key mask {format_shape(mask.shape)} must be [B, Sq, Sk] = "
            f"{format_shape((*io[0].shape[:2], io[1].shape[1]))}",
        )
    if attrs.get("indexed"):
        *io, index = io
        q = io[0]
        _expect(index.dtype in INTEGER_DTYPES, f"the index operand must be integer, got {index.dtype}")
        _expect(
            len(index.shape) == 3 and all(_same(a, b) for a, b in zip(index.shape[:2], q.shape[:2])),
            f"index {format_shape(index.shape)} must be [B, Sq, K] for queries {format_shape(q.shape[:2])}",
        )
    if attrs.get("entries"):
        *io, entries = io
        key = io[1]
        _expect(
            len(entries.shape) == 4
            and _same(entries.shape[0], key.shape[0])
            and all(_same(a, b) for a, b in zip(entries.shape[2:], key.shape[2:])),
            f"entries {format_shape(entries.shape)} must be [B, W, heads, dim] like keys {format_shape(key.shape)}",
        )
        _expect(
            io[1] == io[-1], "compressed entries are keys and values at once: K and V must be one operand"
        )
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


def _layer_norm(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(_same(x.shape[-1], attrs["dim"]), f"norm over {attrs['dim']} features, input has {x.shape[-1]}")
    return x.shape


def _index_scores(attrs: dict[str, Any], query: Node, key: Node, weights: Node) -> Shape:
    """query [B, S, H_I, D], key [B, T, 1, D] (one key per token, every index head reads it),
    weights [B, S, H_I] -> scores [B, S, T]."""
    _expect(len(query.shape) == 4 and len(key.shape) == 4, "indexer operands are [B, S, heads, dim]")
    _expect(_same(key.shape[2], 1), f"the indexer has one key head, got {key.shape[2]}")
    _expect(
        _same(query.shape[-1], key.shape[-1]), f"index query dim {query.shape[-1]} != key dim {key.shape[-1]}"
    )
    _expect(
        len(weights.shape) == 3 and all(_same(a, b) for a, b in zip(weights.shape, query.shape[:3])),
        f"head weights {format_shape(weights.shape)} must be [B, S, heads] of {format_shape(query.shape[:3])}",
    )
    _expect(_same(query.shape[0], key.shape[0]), "index query and key batch differ")
    return (query.shape[0], query.shape[1], key.shape[1])


def _top_k(attrs: dict[str, Any], scores: Node) -> Shape:
    _expect(len(scores.shape) == 3, f"top_k takes scores [B, S, T], got {format_shape(scores.shape)}")
    return (*scores.shape[:2], sympy.Min(attrs["k"], scores.shape[2]))


def _cache_write(attrs: dict[str, Any], x: Node, append: Node) -> Shape:
    _expect(
        append.op is OpKind.CACHE_APPEND, f"rows go beside a cache append's, not beside {append.op.value}"
    )
    _expect(
        _same(x.shape[-1], attrs["width"]), f"cache rows are {attrs['width']} wide, input has {x.shape[-1]}"
    )
    return (x.shape[0], T, *x.shape[2:])


def _compress(attrs: dict[str, Any], kv: Node, gate: Node) -> Shape:
    """kv, gate [B, S, C * D] (C = 2 series with overlap) -> entries [B, floor(S / rate), 1, D]."""
    series = 2 if attrs["overlap"] else 1
    _expect(
        _same(kv.shape[-1], series * attrs["dim"]),
        f"the compressor projects {series} x {attrs['dim']} features per token, input has {kv.shape[-1]}",
    )
    _expect(
        len(gate.shape) == len(kv.shape) and all(_same(a, b) for a, b in zip(gate.shape, kv.shape)),
        f"gate {format_shape(gate.shape)} and kv {format_shape(kv.shape)} differ",
    )
    _expect(
        attrs["dim"] % 2 == 0 and attrs["rope_dim"] <= attrs["dim"], "entries rotate pairs of their last dims"
    )
    return (
        kv.shape[0],
        sympy.floor(kv.shape[1] / attrs["rate"]),
        sympy.Integer(1),
        sympy.Integer(attrs["dim"]),
    )


def _key_mask(attrs: dict[str, Any], positions: Node, *index: Node) -> Shape:
    """positions [B, S] (and the selected entries [B, S, k]) -> bool [B, S, S + W]: raw keys,
    then the W = floor(S / rate) entries."""
    seqlen = positions.shape[1]
    entries = sympy.floor(seqlen / attrs["rate"]) if attrs["rate"] else sympy.Integer(0)
    if index:
        _expect(attrs["rate"] > 0, "only compressed entries are selected")
        _expect(
            all(_same(a, b) for a, b in zip(index[0].shape[:2], positions.shape)),
            f"selection {format_shape(index[0].shape)} does not match positions {format_shape(positions.shape)}",
        )
    return (positions.shape[0], seqlen, seqlen + entries)


def _grouped_linear(attrs: dict[str, Any], x: Node) -> Shape:
    _expect(
        _same(x.shape[-2], attrs["groups"]), f"{attrs['groups']} groups expected, input has {x.shape[-2]}"
    )
    _expect(
        _same(x.shape[-1], attrs["in_features"]),
        f"{attrs['param']} takes {attrs['in_features']} features per group, input has {x.shape[-1]}",
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
    OpKind.LAYER_NORM: _layer_norm,
    OpKind.INDEX_SCORES: _index_scores,
    OpKind.TOP_K: _top_k,
    OpKind.CACHE_WRITE: _cache_write,
    OpKind.COMPRESS: _compress,
    OpKind.KEY_MASK: _key_mask,
    OpKind.GROUPED_LINEAR: _grouped_linear,
    OpKind.OUTPUT: _output,
}
# Result dtypes that do not follow the operands': index scores accumulate in fp32 whatever the
# model dtype (as transformers' indexer does), selections are int32 positions (FlashMLA's type).
RESULT_DTYPES = {OpKind.INDEX_SCORES: "float32", OpKind.TOP_K: "int32", OpKind.KEY_MASK: "bool"}
# Ops whose floating operands may differ: the indexer's head weights are fp32 in a bf16 model.
MIXED_DTYPE_OPS = frozenset({OpKind.INDEX_SCORES})


def infer(op: OpKind, attrs: dict[str, Any], inputs: tuple[Node, ...]) -> tuple[Shape, str]:
    """Shape and dtype of an op's result. INPUT and PARAM carry their own shapes."""
    shape = RULES[op](attrs, *inputs)
    if op in RESULT_DTYPES:
        dtype = RESULT_DTYPES[op]
    elif op is OpKind.LINEAR and attrs.get("dtype"):
        dtype = attrs["dtype"]  # a projection kept in its own dtype (the indexer's fp32 head weights)
    else:
        dtype = next((node.dtype for node in inputs if node.dtype not in NON_FLOAT_DTYPES), inputs[0].dtype)
    return tuple(sympy.sympify(dim) for dim in shape), dtype
