"""Graph -> the Python of the generated nn.Module: one statement per node,
named after the node, so the generated forward reads like the math."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from mlagen.ir.ops import Graph, Node, OpKind, S, attention_operands

# Spec fields whose head counts forward() reads from attributes rather than literals:
# mlagen.parallel.tensor_parallel lowers them to this rank's share of the heads.
HEAD_COUNT_FIELDS = ("heads", "kv_heads")


@dataclass(frozen=True, slots=True)
class Submodule:
    """One `self.<path> = <constructor>` line of __init__ (a head count's is its value).
    `selection`: a part of the lightning indexer, which a layer built with indexer=False
    (one that reuses another layer's selection) leaves out."""

    path: str
    constructor: str
    selection: bool = False


def _chunks_code(expr: sympy.Expr) -> str:
    """Integer Python for a chunk count: a constant or ceiling(S / chunk)."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return str(int(expr))
    if expr == S:  # chunk_size 1: one chunk per token
        return "seqlen"
    assert isinstance(expr, sympy.ceiling), expr
    numerator, denominator = sympy.fraction(expr.args[0])
    assert numerator == S and denominator.is_Integer, expr
    return f"-(-seqlen // {int(denominator)})"


def _rope_key(node: Node) -> tuple:
    return (node.attr("dim"), node.attr("theta"), node.attr("yarn"))


def _head_count(node: Node) -> str:
    """A head count as code: `self.heads` / `self.kv_heads` where the spec's count decides
    it (so a sharded module attends over its own heads only), a literal for the single
    head every query head shares (MLA's rope key and latent)."""
    if node.op is OpKind.HEAD_MATMUL:  # absorption multiplies per query head
        return "self.heads"
    if node.field == "sparse.index_heads":  # the indexer's own heads: never sharded
        return str(node.attr("heads"))
    if node.field in HEAD_COUNT_FIELDS:
        return f"self.{node.field}"
    assert node.attr("heads") == 1, f"{node.name}: {node.attr('heads')} heads from {node.field!r}"
    return "1"


def head_counts(graph: Graph) -> dict[str, int]:
    """The head-count attributes forward() reads, with the spec's values."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in (OpKind.SPLIT_HEADS, OpKind.EXPAND_HEADS, OpKind.HEAD_MATMUL):
            code = _head_count(node)
            if code.startswith("self."):
                value = counts.setdefault(code.removeprefix("self."), node.attr("heads"))
                assert value == node.attr("heads"), f"{node.name}: {code} is {value} elsewhere"
    return dict(sorted(counts.items(), key=lambda item: HEAD_COUNT_FIELDS.index(item[0])))


def submodules(graph: Graph) -> list[Submodule]:
    """The head counts forward() reads, then parameters and buffers in __init__, with
    transformers' names."""
    result = [Submodule(name, str(count)) for name, count in head_counts(graph).items()]
    containers: set[str] = set()
    region = selection_region(graph)

    def add(path: str, constructor: str, selection: bool = False) -> None:
        parts = path.split(".")
        for depth in range(1, len(parts)):
            container = ".".join(parts[:depth])
            if container not in containers:
                containers.add(container)
                result.append(Submodule(container, "nn.Module()", selection))
        result.append(Submodule(path, constructor, selection))

    ropes: list[tuple] = []
    factory = "dtype=dtype, device=device"
    # The indexer's parameters come last, as transformers registers them (state dicts list the same order).
    ordered = [node for node in graph.nodes if node.name not in region] + [
        node for node in graph.nodes if node.name in region
    ]
    for node in ordered:
        selection = node.name in region
        if node.op is OpKind.LINEAR:
            dtype = f"dtype=torch.{node.attr('dtype')}, device=device" if node.attr("dtype") else factory
            add(
                node.attr("param"),
                f"nn.Linear({node.attr('in_features')}, {node.attr('out_features')}, "
                f"bias={node.attr('bias')}, {dtype})",
                selection,
            )
        elif node.op is OpKind.HEAD_MATMUL and node.attr("param") not in {sub.path for sub in result}:
            # An absorbed up-projection is read per head (its weight only), but it is the layer's
            # nn.Linear all the same: the parameter transformers names.
            latent = node.attr("in_features") if node.attr("transpose") else node.attr("out_features")
            rows = node.attr("heads") * node.attr("rows_per_head")
            add(node.attr("param"), f"nn.Linear({latent}, {rows}, bias=False, {factory})", selection)
        elif node.op is OpKind.LAYER_NORM:
            add(
                node.attr("param"),
                f"nn.LayerNorm({node.attr('dim')}, eps={node.attr('eps')!r}, {factory})",
                selection,
            )
        elif node.op is OpKind.RMS_NORM:
            add(node.attr("param"), f"RMSNorm({node.attr('dim')}, eps={node.attr('eps')!r}, {factory})")
        elif node.op is OpKind.PARAM:
            shape = ", ".join(str(int(d)) for d in node.shape)
            add(node.attr("param"), f"nn.Parameter(0.02 * torch.randn({shape}, {factory}))")
        elif node.op is OpKind.GATE:
            add(node.attr("param"), f"nn.Parameter(torch.zeros({node.attr('heads')}, {factory}))")
        elif node.op is OpKind.ROPE and _rope_key(node) not in ropes:
            ropes.append(_rope_key(node))
    assert len(ropes) <= 1, "one rope configuration per spec"
    for dim, theta, yarn in ropes:
        add("rotary_emb", f"Rotary({dim}, theta={theta!r}, yarn={yarn!r}, device=device)")
    return result


def selection_region(graph: Graph) -> set[str]:
    """The nodes that only serve the top-k selection: the lightning indexer. A layer that is
    handed a selection (GLM-5's layers that share the previous layer's) skips them all."""
    region: set[str] = set()
    for node in reversed(graph.nodes):
        users = graph.users(node.name)
        if node.op is OpKind.TOP_K or (
            node.op is not OpKind.INPUT and users and all(user.name in region for user in users)
        ):
            region.add(node.name)
    return region


def _statement(node: Node, cache_source: str | None = None) -> str | None:
    """One line of Python for `node`; in a decode graph `cache_source` names the append
    whose paged cache the attention reads."""
    out, args = node.name, node.inputs
    op = node.op
    if op is OpKind.CACHE_WRITE:
        return f"{out} = decode.append_index_keys({args[0]}, {args[1]})"
    if op is OpKind.INDEX_SCORES:
        scales = f"scale={node.attr('scale')!r}, weight_scale={node.attr('weight_scale')!r}"
        if cache_source is not None:
            return f"{out} = decode.index_scores({args[0]}, {args[2]}, {args[1]}, {scales})"
        return f"{out} = attention[{node.attr('kernel')!r}]({', '.join(args)}, {scales})"
    if op is OpKind.TOP_K:
        return f"{out} = top_k({args[0]}, {node.attr('k')})"
    if op is OpKind.ATTENTION and node.attr("indexed"):
        (q_a, q_b, k_a, k_b, v), index = attention_operands(node)
        if cache_source is not None:
            return f"{out} = decode.attend_sparse({q_a}, {q_b}, {cache_source}, {index}, scale={node.attr('scale')!r})"
        return (
            f"{out} = attention[{node.attr('kernel')!r}]({q_a}, {q_b}, {k_a}, {k_b}, {v}, index={index}, "
            f"scale={node.attr('scale')!r})"
        )
    if op is OpKind.CACHE_APPEND:
        return (
            f"{out} = decode.append({args[0]}, self.{node.attr('norm')}.weight, {node.attr('eps')!r}, cos, sin, "
            f"cache, new_tokens)"
        )
    if op is OpKind.HEAD_MATMUL:
        return (
            f"{out} = head_matmul({args[0]}, self.{node.attr('param')}.weight, heads={_head_count(node)}, "
            f"rows_per_head={node.attr('rows_per_head')}, rows={node.attr('rows')!r}, "
            f"transpose={node.attr('transpose')})"
        )
    if op is OpKind.ATTENTION and cache_source is not None:
        return (
            f"{out} = decode.attend({args[0]}, {args[1]}, {cache_source}, scale={node.attr('scale')!r}, "
            f"causal={node.attr('causal')})"
        )
    if op is OpKind.INPUT:
        return None
    if op is OpKind.PARAM:
        return f"{out} = self.{node.attr('param')}"
    if op is OpKind.LINEAR and node.attr("dtype"):  # a projection kept in its own dtype (fp32)
        param = f"self.{node.attr('param')}"
        return f"{out} = {param}({args[0]}.to({param}.weight.dtype))"
    if op in (OpKind.LINEAR, OpKind.RMS_NORM, OpKind.LAYER_NORM):
        return f"{out} = self.{node.attr('param')}({args[0]})"
    if op is OpKind.ROPE:
        return f"{out} = apply_rope({args[0]}, cos, sin, {node.attr('layout')!r})"
    if op is OpKind.SLICE:
        return f"{out} = {args[0]}[..., {node.attr('start')}:{node.attr('stop')}]"
    if op is OpKind.CONCAT:
        return f"{out} = torch.cat(({', '.join(args)}), dim=-1)"
    if op is OpKind.SPLIT_HEADS:
        return f"{out} = {args[0]}.unflatten(-1, ({_head_count(node)}, {node.attr('head_dim')}))"
    if op is OpKind.MERGE_HEADS:
        return f"{out} = {args[0]}.flatten(-2)"
    if op is OpKind.EXPAND_HEADS:
        return f"{out} = {args[0]}.expand(-1, -1, {_head_count(node)}, -1)"
    if op is OpKind.REPEAT_CHUNKS:
        return f"{out} = repeat_chunks({args[0]}, batch, {_chunks_code(node.attr('chunks'))})"
    if op is OpKind.ATTENTION:
        q_a, q_b, k_a, k_b, v = args if len(args) == 5 else (args[0], None, args[1], None, args[2])
        return (
            f"{out} = attention[{node.attr('kernel')!r}]({q_a}, {q_b}, {k_a}, {k_b}, {v}, "
            f"scale={node.attr('scale')!r}, causal={node.attr('causal')}, window={node.attr('window')}, "
            f"group_mask={node.attr('group_mask')!r})"
        )
    if op is OpKind.ADD:
        return f"{out} = {args[0]} + {args[1]}"
    if op is OpKind.GATE:
        return f"{out} = {args[0]} * torch.sigmoid(self.{node.attr('param')}).to({args[0]}.dtype)[:, None]"
    if op is OpKind.OUTPUT:
        return f"return {args[0]}"
    raise AssertionError(f"no code for {op}")


def forward_body(graph: Graph) -> list[str]:
    """The statements of `_forward(self, hidden_states, position_ids, attention)`, or for a
    decode graph of `_decode_forward(self, hidden_states, position_ids, cache, new_tokens, decode)`.
    With a top-k selection both also take `selected` (None: the indexer selects) and return
    (output, selected)."""
    lines = ["batch, seqlen = hidden_states.shape[:2]"] if graph.mode != "decode" else []
    if graph.of_kind(OpKind.ROPE):
        lines.append("cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)")
    appends = graph.of_kind(OpKind.CACHE_APPEND)
    cache_source = appends[0].name if appends else None
    views = _cache_views(graph)
    region = selection_region(graph)
    selection: list[str] = []
    for node in graph.nodes:
        if node.name in views:
            continue
        reads_cache = node.op in (OpKind.ATTENTION, OpKind.INDEX_SCORES)
        line = _statement(node, cache_source if reads_cache else None)
        if line is None:
            continue
        if node.name in region:
            # The region's statements move down to the selection: they only feed it, and
            # everything they read is defined above it.
            selection.append(line)
            if node.op is OpKind.TOP_K:
                lines += [
                    f"if {node.name} is None:",
                    "    with torch.no_grad():  # the selection is not differentiable (as in transformers)",
                    *(f"        {statement}" for statement in selection),
                ]
        elif node.op is OpKind.OUTPUT and region:
            (top,) = graph.of_kind(OpKind.TOP_K)
            lines.append(f"{line}, {top.name}")
        else:
            lines.append(line)
    return lines


def _cache_views(graph: Graph) -> set[str]:
    """Slices and head splits of the paged cache: the kernels read the pages, so these are
    never materialised (the attention that consumes them reads the cache itself)."""
    views = {node.name for node in graph.of_kind(OpKind.CACHE_APPEND)}
    for node in graph.nodes:
        if node.op in (OpKind.SLICE, OpKind.SPLIT_HEADS) and node.inputs[0] in views:
            views.add(node.name)
    return views - {node.name for node in graph.of_kind(OpKind.CACHE_APPEND)}
