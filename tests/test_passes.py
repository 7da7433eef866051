"""Passes: golden text files (xDSL style: input IR -> expected IR) and what each pass promises.

Each golden file tests/golden/<spec>.<pass>.txt holds the graph a pass receives in the
prefill pipeline and the graph it returns. After an intended change to the lowering or a
pass, regenerate them and review the diff:

    MLAGEN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_passes.py
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import sympy

from mlagen.errors import ShapeError
from mlagen.ir import Graph, Node, OpKind, lower
from mlagen.ir.ops import attention_operands
from mlagen.passes import PASSES, PIPELINES, Pass, run_pipeline
from mlagen.spec import load_spec
from tests.helpers import SPECS

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("MLAGEN_UPDATE_GOLDEN") == "1"
GOLDEN_SPECS = ("tiny_mla", "tiny_gqa", "tiny_hybrid", "tiny_dsa", "tiny_compressed_csa")
PREFILL = PIPELINES["prefill"]
FAMILIES = {p.stem: load_spec(p).family for p in SPECS.glob("*.yaml")}
MLA_SPECS = sorted(name for name, family in FAMILIES.items() if family == "mla")
LATENT_SPECS = sorted(name for name, family in FAMILIES.items() if family == "latent")


def lowered(name: str) -> Graph:
    return lower(load_spec(SPECS / f"{name}.yaml"))


def stages(name: str) -> dict[str, tuple[Graph, Graph]]:
    """Pass name -> (its input, its output) along the prefill pipeline."""
    graph, result = lowered(name), {}
    for pass_name in PREFILL:
        after = PASSES[pass_name].run(graph)
        result[pass_name] = (graph, after)
        graph = after
    return result


# --- the printer ---------------------------------------------------------------------------------


def _value(value: object) -> str:
    if isinstance(value, sympy.Basic):
        return str(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def print_node(node: Node) -> str:
    attrs = ", ".join(f"{key}={_value(value)}" for key, value in node.attrs)
    shape = "[" + ", ".join(str(dim) for dim in node.shape) + "]"
    return f"{node.name} = {node.op.value}({', '.join(node.inputs)}) {{{attrs}}} -> {shape} {node.dtype}"


def print_graph(graph: Graph) -> str:
    lines = [f"graph {graph.spec_name} {graph.mode} -> ({', '.join(graph.outputs)})"]
    lines += ["  " + print_node(node) for node in graph]
    return "\n".join(lines) + "\n"


def golden_text(spec_name: str, pass_name: str, before: Graph, after: Graph) -> str:
    return (
        f"// {spec_name}: pass {pass_name}\n"
        f"// regenerate: MLAGEN_UPDATE_GOLDEN=1 pytest tests/test_passes.py\n"
        f"// input\n{print_graph(before)}"
        f"// output\n{print_graph(after)}"
    )


@pytest.mark.parametrize("pass_name", PREFILL)
@pytest.mark.parametrize("spec_name", GOLDEN_SPECS)
def test_pass_matches_golden(spec_name, pass_name):
    before, after = stages(spec_name)[pass_name]
    text = golden_text(spec_name, pass_name, before, after)
    path = GOLDEN / f"{spec_name}.{pass_name}.txt"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing; run MLAGEN_UPDATE_GOLDEN=1 pytest tests/test_passes.py"
    assert text == path.read_text(encoding="utf-8"), (
        f"{spec_name} through {pass_name} differs from {path.name}; if the change is intended, "
        "regenerate with MLAGEN_UPDATE_GOLDEN=1 and review the diff"
    )


def test_golden_files_are_all_in_use():
    expected = {f"{s}.{p}.txt" for s in GOLDEN_SPECS for p in PREFILL}
    assert {p.name for p in GOLDEN.glob("*.txt")} == expected


def test_printer_is_one_line_per_node():
    graph = lowered("tiny_mla")
    text = print_graph(graph)
    assert len(text.splitlines()) == len(graph.nodes) + 1
    assert "  kv_heads = split_heads(kv) {head_dim=40, heads=4} -> [B, S, 4, 40] float32" in text.splitlines()


# --- what each pass promises ---------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", MLA_SPECS)
def test_split_attention_dots_gives_mla_attention_five_operands(spec_name):
    after = PASSES["split_attention_dots"].run(lowered(spec_name))
    assert attention_operands(after.node("attn"))[0] == ("q_nope", "q_pe_rot", "k_nope", "k_pe", "v")
    assert after.node("k_pe").shape[2] == 1, "the shared rope key must reach the kernel unexpanded"
    live = PASSES["eliminate_dead_nodes"].run(after)
    attention_inputs = {name for node in live.of_kind(OpKind.ATTENTION) for name in node.inputs}
    assert not live.of_kind(OpKind.EXPAND_HEADS)
    assert not [name for name in attention_inputs if live.node(name).op is OpKind.CONCAT], "K was concatenated"


@pytest.mark.parametrize("spec_name", ["tiny_gqa", "tiny_mqa", "tiny_latent"])
def test_split_attention_dots_leaves_unsplit_attention_alone(spec_name):
    graph = lowered(spec_name)
    assert PASSES["split_attention_dots"].run(graph) == graph


@pytest.mark.parametrize("spec_name", LATENT_SPECS)
def test_hoist_projects_the_latents_once_before_repeating(spec_name):
    graph = lowered(spec_name)
    after = PASSES["hoist_linear_over_repeat"].run(graph)
    latents = after.node("latents")
    projected = after.node("encode_q_once")
    assert projected.op is OpKind.LINEAR and projected.inputs == ("latents",)
    assert projected.shape == (latents.shape[0], graph.node("encode_q").shape[-1])
    assert not projected.shape[0].free_symbols, "the projection must not scale with B or S"
    repeated = after.node("encode_q")
    assert repeated.op is OpKind.REPEAT_CHUNKS and repeated.inputs[0] == "encode_q_once"
    assert repeated.shape == graph.node("encode_q").shape
    for node in after.of_kind(OpKind.LINEAR):
        assert after.node(node.inputs[0]).op is not OpKind.REPEAT_CHUNKS, node.name


@pytest.mark.parametrize("spec_name", GOLDEN_SPECS)
def test_select_kernels_names_a_kernel_for_every_attention(spec_name):
    graph = run_pipeline(lowered(spec_name), "prefill", verify_each=True)
    for node in graph.of_kind(OpKind.ATTENTION):
        d_b = f"_rope{node.attr('d_b')}" if node.attr("d_b") else ""
        if node.attr("output_rope"):  # compressed (DeepSeek-V4): K = V, entries, sinks, the rope undone
            assert node.attr("kernel") == f"compressed_attention_d{node.attr('d_a')}{d_b}"
        elif node.attr("indexed"):  # sparse: absorbed, over the latent
            assert node.attr("kernel") == f"sparse_mla_lat{node.attr('d_a')}{d_b}"
        else:
            assert node.attr("kernel") == f"attention_fwd_qk{node.attr('d_a')}{d_b}_v{node.attr('d_v')}"


@pytest.mark.parametrize("pass_name", PREFILL)
@pytest.mark.parametrize("spec_name", GOLDEN_SPECS)
def test_pass_does_not_mutate_its_input(spec_name, pass_name):
    before, _ = stages(spec_name)[pass_name]
    snapshot = copy.deepcopy(before)
    node_ids = [id(node) for node in before.nodes]
    PASSES[pass_name].run(before)
    assert before == snapshot
    assert print_graph(before) == print_graph(snapshot)
    assert [id(node) for node in before.nodes] == node_ids


def test_run_pipeline_verifies_before_and_after_every_pass(monkeypatch):
    import mlagen.passes

    seen: list[Graph] = []
    real_verify = mlagen.passes.verify

    def recording_verify(graph: Graph) -> Graph:
        seen.append(graph)
        return real_verify(graph)

    monkeypatch.setattr(mlagen.passes, "verify", recording_verify)
    graph = lowered("tiny_mla")
    run_pipeline(graph, "prefill", verify_each=True)
    outputs = [after for _, after in stages("tiny_mla").values()]
    assert seen[0] == graph
    assert seen[1 : 1 + len(outputs)] == outputs


def _wire_value_as_key(graph: Graph) -> Graph:
    """A broken rewrite: the attention's first key part replaced by the values (dim 24, not 16)."""
    nodes = []
    for node in graph.nodes:
        if node.op is OpKind.ATTENTION:
            q_a, q_b, _, k_b, v = node.inputs
            node = Node(
                node.name, node.op, (q_a, q_b, v, k_b, v), node.shape, node.dtype, node.attrs, node.field
            )
        nodes.append(node)
    return graph.with_nodes(tuple(nodes))


@pytest.fixture
def broken_pipeline(monkeypatch):
    monkeypatch.setitem(PASSES, "wire_value_as_key", Pass("wire_value_as_key", _wire_value_as_key, "broken"))
    monkeypatch.setitem(
        PIPELINES, "broken", ("split_attention_dots", "wire_value_as_key", "eliminate_dead_nodes")
    )
    return "broken"


def test_broken_pass_is_named_by_the_verifier(broken_pipeline):
    with pytest.raises(ShapeError) as excinfo:
        run_pipeline(lowered("tiny_mla"), broken_pipeline, verify_each=True)
    message = str(excinfo.value)
    assert message.startswith("after pass wire_value_as_key: ")
    assert "node 'attn' (attention)" in message
    assert "query dim 16 differs from key dim 24" in message
    assert "tiny_mla.yaml:5: heads, v_head_dim" in message


def test_verify_env_var_turns_on_per_pass_verification(broken_pipeline, monkeypatch):
    monkeypatch.setenv("MLAGEN_VERIFY", "1")
    with pytest.raises(ShapeError, match="^after pass wire_value_as_key: "):
        run_pipeline(lowered("tiny_mla"), broken_pipeline)
