"""Graph -> the Python of a generated `compressed` module (DeepSeek-V4): its submodules, with
transformers' DeepseekV4Attention names, and one statement per node of its forward.

The forward takes `ops`, the table of the layer's heavy operations (compress, index_scores,
top_k, attention): the generated kernels, the plain-torch reference, or either of them
wrapped around a decode cache (runtime/compressed_cache.py). So one generated forward serves
training, prefill, `reference_forward` and token-by-token decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlagen.codegen.module_code import HEAD_COUNT_FIELDS, Submodule
from mlagen.ir.ops import Graph, Node, OpKind, attention_extras
from mlagen.spec import CompressedSpec
from mlagen.tiles import padded


def _linear(node: Node) -> str:
    return f"nn.Linear({node.attr('in_features')}, {node.attr('out_features')}, bias=False, {_FACTORY})"


_FACTORY = "dtype=dtype, device=device"


def submodules(graph: Graph) -> list[Submodule]:
    """Head counts, then parameters in __init__ order. Norm weights, position biases and sinks
    are fp32 whatever the module's dtype, as transformers keeps them (_keep_in_fp32_modules)."""
    result = [Submodule("heads", str(graph.node("q_heads").attr("heads")))]
    containers: set[str] = set()

    def add(path: str, constructor: str) -> None:
        parts = path.split(".")
        for depth in range(1, len(parts)):
            container = ".".join(parts[:depth])
            if container not in containers:
                containers.add(container)
                result.append(Submodule(container, "nn.Module()"))
        result.append(Submodule(path, constructor))

    rope = None
    for node in graph.nodes:
        if node.op is OpKind.LINEAR:
            add(node.attr("param"), _linear(node))
        elif node.op is OpKind.RMS_NORM and node.attr("param") is not None:
            add(
                node.attr("param"),
                f"FP32RMSNorm({node.attr('dim')}, eps={node.attr('eps')!r}, device=device)",
            )
        elif node.op is OpKind.GROUPED_LINEAR:
            add(
                node.attr("param"),
                f"GroupedLinear({node.attr('in_features')}, {node.attr('out_features')}, "
                f"groups={node.attr('groups')}, {_FACTORY})",
            )
        elif node.op is OpKind.COMPRESS:
            width = node.attr("dim") * (2 if node.attr("overlap") else 1)
            add(
                node.attr("bias"),
                f"nn.Parameter(torch.zeros({node.attr('rate')}, {width}, dtype=torch.float32, device=device))",
            )
            add(
                node.attr("norm"), f"FP32RMSNorm({node.attr('dim')}, eps={node.attr('eps')!r}, device=device)"
            )
        elif node.op is OpKind.PARAM:
            shape = ", ".join(str(int(d)) for d in node.shape)
            add(node.attr("param"), f"nn.Parameter(torch.zeros({shape}, dtype=torch.float32, device=device))")
        elif node.op is OpKind.ROPE:
            key = (node.attr("dim"), node.attr("theta"), node.attr("yarn"))
            assert rope in (None, key), "one rope configuration per spec"
            rope = key
    assert rope is not None
    dim, theta, yarn = rope
    result.append(
        Submodule("rotary_emb", f"PairRotary({dim}, theta={theta!r}, yarn={yarn!r}, device=device)")
    )
    return result


def _heads(node: Node) -> str:
    """`self.heads` where the spec's head count decides a split (a sharded module would read
    its own), a literal for the one K = V head, the indexer's heads and the output groups."""
    return "self.heads" if node.field in HEAD_COUNT_FIELDS else str(node.attr("heads"))


def _statement(node: Node) -> str | None:
    out, args, op = node.name, node.inputs, node.op
    if op in (OpKind.INPUT,):
        return None
    if op is OpKind.PARAM:
        return f"{out} = self.{node.attr('param')}"
    if op is OpKind.LINEAR:
        return f"{out} = self.{node.attr('param')}({args[0]})"
    if op is OpKind.RMS_NORM:
        if node.attr("param") is None:
            return f"{out} = unweighted_rms_norm({args[0]}, {node.attr('eps')!r})"
        return f"{out} = self.{node.attr('param')}({args[0]})"
    if op is OpKind.SPLIT_HEADS:
        return f"{out} = {args[0]}.unflatten(-1, ({_heads(node)}, {node.attr('head_dim')}))"
    if op is OpKind.MERGE_HEADS:
        return f"{out} = {args[0]}.flatten(-2)"
    if op is OpKind.ROPE:
        assert node.attr("tail") and node.attr("layout") == "interleave", node
        return f"{out} = rope_pairs({args[0]}, cos, {'-sin' if node.attr('inverse') else 'sin'})"
    if op is OpKind.GROUPED_LINEAR:
        return f"{out} = self.{node.attr('param')}({args[0]})"
    if op is OpKind.COMPRESS:
        return (
            f"{out} = ops.compress({out!r}, {args[0]}, {args[1]}, self.{node.attr('bias')}, "
            f"self.{node.attr('norm')}.weight, self.rotary_emb, rate={node.attr('rate')}, "
            f"overlap={node.attr('overlap')}, eps={node.attr('eps')!r}, kernel={node.attr('kernel')!r})"
        )
    if op is OpKind.INDEX_SCORES:
        return (
            f"{out} = ops.index_scores({', '.join(args)}, scale={node.attr('scale')!r}, "
            f"weight_scale={node.attr('weight_scale')!r}, rate={node.attr('rate')}, kernel={node.attr('kernel')!r})"
        )
    if op is OpKind.TOP_K:
        return f"{out} = ops.top_k({args[0]}, {node.attr('k')})"
    if op is OpKind.ATTENTION:
        extras = attention_extras(node)
        assert node.inputs[1] == node.inputs[2] and "output_rope" in extras, node
        entries = extras.get("entries", "None")
        selected = extras.get("indexed", "None")
        sinks = extras.get("sinks", "None")
        return (
            f"{out} = ops.attention({args[0]}, {args[1]}, {entries}, {selected}, {sinks}, cos, sin, "
            f"scale={node.attr('scale')!r}, window={node.attr('window')}, rate={node.attr('entry_rate') or 0}, "
            f"kernel={node.attr('kernel')!r})"
        )
    if op is OpKind.OUTPUT:
        return f"return {args[0]}"
    raise AssertionError(f"no code for {op} in a compressed graph")


def forward_body(graph: Graph) -> list[str]:
    """The statements of `_forward(self, hidden_states, position_ids, ops)`."""
    lines = ["cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)"]
    for node in graph.nodes:
        line = _statement(node)
        if line is not None:
            lines.append(line)
    return lines


# --- the kernels a compressed package renders --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompressedKernels:
    """The kernel variants of a compressed spec, by template: the attention (one per head and
    rope dims), the compressors (entries, and the indexer's keys) and the entry indexer."""

    attention: tuple[AttentionVariant, ...]
    compressors: tuple[CompressorVariant, ...]
    indexers: tuple[IndexerVariant, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for group in (self.attention, self.compressors, self.indexers) for v in group)


@dataclass(frozen=True, slots=True)
class AttentionVariant:
    """Attention over the window's raw K = V rows and compressed entries (all visible ones,
    or the selected ones), sinks in the softmax, inverse RoPE in the epilogue. Columns are
    processed in two halves, [0, pad_half) and [pad_half, dim), that a program may keep
    the output of one at a time."""

    name: str
    dim: int
    rope_dim: int

    @property
    def pad_half(self) -> int:
        """The first half's width: a tile width (a power of two, so an even number of columns:
        no RoPE pair straddles the halves) of at least half the head."""
        return padded(-(-self.dim // 2))


@dataclass(frozen=True, slots=True)
class CompressorVariant:
    """Gated pooling of a window's projected rows, RMSNorm, RoPE and the entry's write."""

    name: str
    dim: int
    rope_dim: int

    @property
    def half(self) -> int:
        return self.dim // 2

    @property
    def pad_half(self) -> int:
        return padded(self.half)


@dataclass(frozen=True, slots=True)
class IndexerVariant:
    """The lightning indexer's logits over compressed entries."""

    name: str
    dim: int

    @property
    def pad_dim(self) -> int:
        return padded(self.dim)


def kernels(graph: Graph) -> CompressedKernels:
    attention: dict[str, AttentionVariant] = {}
    compressors: dict[str, CompressorVariant] = {}
    indexers: dict[str, IndexerVariant] = {}
    for node in graph.nodes:
        if node.op is OpKind.ATTENTION:
            variant = AttentionVariant(node.attr("kernel"), node.attr("d_a"), node.attr("d_b"))
            attention[variant.name] = variant
        elif node.op is OpKind.COMPRESS:
            compressor = CompressorVariant(node.attr("kernel"), node.attr("dim"), node.attr("rope_dim"))
            compressors[compressor.name] = compressor
        elif node.op is OpKind.INDEX_SCORES:
            indexer = IndexerVariant(node.attr("kernel"), node.attr("d_a"))
            indexers[indexer.name] = indexer
    return CompressedKernels(tuple(attention.values()), tuple(compressors.values()), tuple(indexers.values()))


def summary(spec: CompressedSpec) -> str:
    compression = spec.compression
    if compression is None:
        keys = f"the last {spec.window} tokens"
    elif compression.indexer is None:
        keys = f"the last {spec.window} tokens and every entry of {compression.rate} earlier tokens"
    else:
        indexer = compression.indexer
        keys = (
            f"the last {spec.window} tokens and the top {indexer.top_k} entries of {compression.rate} earlier "
            f"tokens (overlapping windows), chosen by a {indexer.heads}-head indexer"
        )
    sinks = " with sinks" if spec.sinks else ""
    return (
        f"DeepSeek-V4 {spec.layer_type}: {spec.heads} heads of {spec.head_dim} (one shared K = V head){sinks} "
        f"attending to {keys}."
    )
