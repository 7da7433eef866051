"""The IR: lowering every spec, sympy shapes, immutability, the verifier's messages,
and the two facts the CLI reports (parameter count and KV-cache bytes)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import sympy

from mlagen.errors import ShapeError
from mlagen.ir import B, Graph, S, lower, verify
from mlagen.ir.analysis import cache_report, parameter_count
from mlagen.passes import run_pipeline
from mlagen.spec import CompressedSpec, GqaSpec, LatentSpec, MlaSpec, load_spec
from tests.helpers import SPECS, TINY_SPECS, generated

ALL_SPECS = sorted(p.stem for p in SPECS.glob("*.yaml"))


def spec_of(name: str):
    return load_spec(SPECS / f"{name}.yaml")


def lowered(name: str) -> Graph:
    return lower(spec_of(name))


def replace_node(graph: Graph, target: str, **changes) -> Graph:
    return graph.with_nodes(
        tuple(dataclasses.replace(n, **changes) if n.name == target else n for n in graph)
    )


# --- lowering and shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SPECS)
def test_spec_lowers_and_verifies(name):
    graph = lowered(name)
    assert verify(graph) is graph
    assert run_pipeline(graph, "prefill", verify_each=True).outputs == graph.outputs


@pytest.mark.parametrize("name", ALL_SPECS)
def test_shapes_are_sympy_expressions_in_batch_and_sequence(name):
    spec, graph = spec_of(name), lowered(name)
    for node in graph:
        assert all(isinstance(dim, sympy.Expr) for dim in node.shape), node
        assert set().union(*(dim.free_symbols for dim in node.shape)) <= {B, S}, node
    assert graph.node("hidden_states").shape == (B, S, spec.d_model)
    assert graph.node(graph.outputs[0]).shape == (B, S, spec.d_model)


@pytest.mark.parametrize(
    "name", [n for n in ALL_SPECS if n.startswith(("deepseek", "kimi", "tiny_mla")) and spec_of(n).family == "mla"]
)
def test_mla_attention_node_has_heads_by_v_head_dim(name):
    spec = spec_of(name)
    graph = lowered(name)
    dqk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    assert graph.node("attn").shape == (B, S, spec.heads, spec.v_head_dim)
    assert graph.node("query").shape == (B, S, spec.heads, dqk)
    assert graph.node("key").shape == (B, S, spec.heads, dqk)
    assert graph.node("k_pe").shape == (B, S, 1, spec.qk_rope_head_dim)
    assert graph.node("c_kv").shape == (B, S, spec.kv_lora_rank)


def test_deepseek_v3_attention_shape():
    assert lowered("deepseek_v3").node("attn").shape == (B, S, 128, 128)


@pytest.mark.parametrize("name", ["tiny_hybrid", "hybrid_latent_window"])
def test_causal_latent_shapes_count_chunks_with_ceiling(name):
    spec = spec_of(name)
    chunks = sympy.ceiling(S / spec.chunk_size)
    graph = lowered(name)
    assert graph.node("latents").shape == (spec.latent_tokens, spec.d_model)
    assert graph.node("latents_per_chunk").shape == (B, spec.latent_tokens * chunks, spec.d_model)
    assert graph.node("encode_attn").shape == (B, spec.latent_tokens * chunks, spec.heads, spec.head_dim)
    assert graph.node("decode_attn").shape == (B, S, spec.heads, spec.head_dim)
    assert any(dim.has(sympy.ceiling) for dim in graph.node("latents_per_chunk").shape)


def test_non_causal_latents_are_one_copy_per_batch_row():
    spec = spec_of("tiny_latent")
    assert lowered("tiny_latent").node("latents_per_chunk").shape == (B, spec.latent_tokens, spec.d_model)


# --- immutability --------------------------------------------------------------------------------


@pytest.mark.parametrize("attribute, value", [("name", "renamed"), ("shape", ()), ("inputs", ())])
def test_node_is_frozen(attribute, value):
    node = lowered("tiny_mla").node("attn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(node, attribute, value)


@pytest.mark.parametrize("attribute, value", [("nodes", ()), ("outputs", ()), ("spec_name", "x")])
def test_graph_is_frozen(attribute, value):
    graph = lowered("tiny_mla")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(graph, attribute, value)


def test_node_with_attrs_returns_a_new_node():
    node = lowered("tiny_gqa").node("attn")
    changed = node.with_attrs(causal=False)
    assert node.attr("causal") is True and changed.attr("causal") is False


# --- the verifier --------------------------------------------------------------------------------


def _wrong_shape() -> tuple[Graph, str, str]:
    return (
        replace_node(lowered("tiny_mla"), "kv", shape=(B, S, sympy.Integer(99))),
        "kv",
        "declared [B, S, 99]",
    )


def _dangling_input() -> tuple[Graph, str, str]:
    return replace_node(lowered("tiny_mla"), "kv", inputs=("ghost",)), "kv", "uses ghost before it is defined"


def _duplicate_name() -> tuple[Graph, str, str]:
    # `kv` renamed to an earlier node's name: the second definition is the one blamed.
    return replace_node(lowered("tiny_mla"), "kv", name="c_kv"), "c_kv", "defined twice"


def _wrong_dtype() -> tuple[Graph, str, str]:
    return replace_node(lowered("tiny_mla"), "k_pe", dtype="bfloat16"), "k_pe", "declared dtype bfloat16"


def _mixed_dtypes() -> tuple[Graph, str, str]:
    # The latents parameter and the tokens both feed latents_per_chunk.
    graph = replace_node(lowered("tiny_hybrid"), "latents", dtype="bfloat16")
    return graph, "latents_per_chunk", "operands mix dtypes ['bfloat16', 'float32']"


def _broken_rule() -> tuple[Graph, str, str]:
    return (
        replace_node(lowered("tiny_mla"), "out", inputs=("c_kv",)),
        "out",
        "takes 96 features, input has 32",
    )


CORRUPTIONS = {
    "wrong_shape": _wrong_shape,
    "dangling_input": _dangling_input,
    "duplicate_name": _duplicate_name,
    "wrong_dtype": _wrong_dtype,
    "mixed_dtypes": _mixed_dtypes,
    "broken_shape_rule": _broken_rule,
}


def spec_line(graph: Graph, spec_field: str) -> int:
    first = spec_field.split(",")[0].strip()
    line = spec_of(graph.spec_name).line_of(first)
    assert line is not None, f"{graph.spec_name} has no line for {first}"
    return line


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_verifier_names_node_field_and_spec_location(corruption):
    graph, node_name, fragment = CORRUPTIONS[corruption]()
    node = [n for n in graph if n.name == node_name][-1]
    location = graph.location(node.field)
    assert location.endswith(f"{graph.spec_name}.yaml:{spec_line(graph, node.field)}")
    with pytest.raises(ShapeError) as excinfo:
        verify(graph)
    message = str(excinfo.value)
    assert message.startswith(f"{location}: {node.field}: node '{node_name}'"), message
    assert fragment in message


def test_verifier_rejects_an_output_that_is_not_a_node():
    graph = dataclasses.replace(lowered("tiny_gqa"), outputs=("nowhere",))
    with pytest.raises(ShapeError, match="'nowhere'"):
        verify(graph)


def test_verifier_rejects_an_input_with_operands():
    graph = replace_node(lowered("tiny_gqa"), "position_ids", inputs=("hidden_states",))
    with pytest.raises(ShapeError, match="'position_ids'.*takes no operands"):
        verify(graph)


@pytest.mark.parametrize(
    "name, changes, field, fragment",
    [
        ("tiny_gqa", {"kv_heads": 3}, "kv_heads", "4 query heads cannot share 3 kv heads"),
        ("tiny_gqa", {"head_dim": 15}, "head_dim", "rope dim 15 must be even"),
        ("tiny_mla", {"qk_rope_head_dim": 7}, "qk_rope_head_dim", "must be even"),
    ],
)
def test_lowering_an_inconsistent_spec_names_the_field(name, changes, field, fragment):
    spec = dataclasses.replace(spec_of(name), **changes)
    with pytest.raises(ShapeError) as excinfo:
        lower(spec)
    message = str(excinfo.value)
    assert f"{name}.yaml:{spec.line_of(field)}: {field}" in message
    assert fragment in message


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_SPECS)
def test_parameter_count_matches_generated_module(name):
    module = generated(name).Attention()
    numel = sum(p.numel() for p in module.parameters())
    graph = lowered(name)
    assert parameter_count(graph) == numel
    assert parameter_count(run_pipeline(graph, "prefill")) == numel, "a pass changed the parameter count"


def test_deepseek_v3_parameter_count_by_hand():
    d, H, rq, r, dn, dr, dv = 7168, 128, 1536, 512, 128, 64, 128
    expected = (
        d * rq
        + rq
        + rq * H * (dn + dr)  # q_a_proj, q_a_layernorm, q_b_proj
        + d * (r + dr)
        + r
        + r * H * (dn + dv)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
        + H * dv * d
    )  # o_proj
    assert parameter_count(lowered("deepseek_v3")) == expected == 187_107_328


def test_llama3_8b_parameter_count_by_hand():
    assert parameter_count(lowered("llama3_8b")) == 2 * 4096 * 4096 + 2 * 4096 * 1024


# --- KV cache ------------------------------------------------------------------------------------


def expected_cache(spec) -> tuple[float, int]:
    """(cached values, MHA values) per token per layer, written from DESIGN.md independently."""
    if isinstance(spec, MlaSpec):
        mha = spec.heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim) + spec.heads * spec.v_head_dim
        index = spec.sparse.index_head_dim if spec.sparse else 0  # DSA: the indexer's key beside the latent
        return spec.kv_lora_rank + spec.qk_rope_head_dim + index, mha
    kv_pair = 2 * spec.heads * spec.head_dim
    if isinstance(spec, CompressedSpec):
        # One head_dim entry (and the indexer's key) per `rate` tokens; the window is a fixed cost.
        compression = spec.compression
        if compression is None:
            return 0, kv_pair
        index = compression.indexer.head_dim if compression.indexer else 0
        return (spec.head_dim + index) / compression.rate, kv_pair
    if isinstance(spec, GqaSpec):
        return 2 * spec.kv_heads * spec.head_dim, kv_pair
    assert isinstance(spec, LatentSpec)
    if not spec.causal:
        return 0, kv_pair
    # Only the chunk summaries grow with the sequence; the hybrid's window cache is fixed.
    return kv_pair * spec.latent_tokens / spec.chunk_size, kv_pair


@pytest.mark.parametrize("name", ALL_SPECS)
def test_cache_report_formula(name):
    spec = spec_of(name)
    report = cache_report(spec)
    values, mha = expected_cache(spec)
    assert report.values_per_token == values
    assert report.bytes_per_token == values * spec.dtype_bytes
    assert report.mha_values_per_token == mha
    assert report.mha_bytes_per_token == mha * spec.dtype_bytes
    assert report.note


def test_deepseek_v32_caches_1152_plus_256_bytes_or_656_plus_132_in_fp8():
    spec = spec_of("deepseek_v32")
    report = cache_report(spec)
    assert (report.values_per_token, report.bytes_per_token) == (576 + 128, 1152 + 256)
    fp8 = cache_report(dataclasses.replace(spec, cache_dtype="fp8"))
    assert (fp8.bytes_per_token, fp8.storage) == (656 + 132, "fp8 rows")
    assert "512 e4m3 + 4 fp32 scales + 64 bf16 rope = 656 B" in fp8.note and "= 132 B" in fp8.note


def test_deepseek_v3_caches_576_values_71x_less_than_mha():
    report = cache_report(spec_of("deepseek_v3"))
    assert (report.values_per_token, report.bytes_per_token) == (576, 1152)
    assert (report.mha_values_per_token, report.mha_bytes_per_token) == (40960, 81920)
    assert f"{report.ratio:.1f}" == "71.1"


@pytest.mark.parametrize(
    "name, kv_heads, heads, head_dim",
    [
        ("llama3_8b", 8, 32, 128),
        ("mistral_7b", 8, 32, 128),
        ("llama2_7b", 32, 32, 128),
        ("tiny_mqa", 1, 4, 16),
    ],
)
def test_llama_family_caches_k_and_v_per_kv_head(name, kv_heads, heads, head_dim):
    report = cache_report(spec_of(name))
    assert report.values_per_token == 2 * kv_heads * head_dim
    assert report.mha_values_per_token == 2 * heads * head_dim
    assert math.isclose(report.ratio, heads / kv_heads)


@pytest.mark.parametrize("name", ["tiny_hybrid", "hybrid_latent_window"])
def test_hybrid_reports_its_fixed_window_cache_in_the_note(name):
    spec = spec_of(name)
    fixed = spec.window * 2 * spec.heads * spec.head_dim
    assert f"{fixed:,}-value window cache" in cache_report(spec).note


def test_non_causal_latent_has_no_decode_cache():
    report = cache_report(spec_of("perceiver_latent"))
    assert report.values_per_token == 0 and report.ratio == math.inf
    assert "non-causal" in report.note
