"""`mlagen from-hf`: Hugging Face config.json -> spec.

The published configs in tests/hf_configs/ must convert to the shipped specs field by field;
configs whose attention mlagen cannot express must fail with one line naming the file and key.
(Numerical parity with transformers' attention layers is tests/test_hf_parity.py.)
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from mlagen.cli import main
from mlagen.errors import SpecError
from mlagen.spec import load_spec, parse_spec
from mlagen.spec.from_hf import load_hf_config, spec_from_hf_config, yaml_from_hf_config
from tests.helpers import ROOT, SPECS

CONFIGS = ROOT / "tests" / "hf_configs"
PUBLISHED = {  # config.json -> the shipped spec it must equal
    "deepseek_v3": "deepseek_v3",
    "deepseek_v3_transformers5": "deepseek_v3",  # the same config as transformers 5 saves it
    "deepseek_v2_lite": "deepseek_v2_lite",
    "kimi_k2": "kimi_k2",
    "llama3_8b": "llama3_8b",
    "mistral_7b": "mistral_7b",
    "deepseek_v32": "deepseek_v32",  # deepseek-ai/DeepSeek-V3.2-Exp
    "glm5": "glm5",  # zai-org/GLM-5
}


def config(name: str) -> dict:
    return load_hf_config(CONFIGS / f"{name}.json")


def meaning(spec) -> dict:
    fields = spec.fields_dict()
    fields.pop("name")
    return fields


def convert(data: dict, name: str = "converted"):
    return spec_from_hf_config(data, name, "config.json")


# --- published configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(PUBLISHED))
def test_published_config_converts_to_the_shipped_spec(config_name):
    spec = spec_from_hf_config(config(config_name), "converted", f"{config_name}.json")
    shipped = load_spec(SPECS / f"{PUBLISHED[config_name]}.yaml")
    assert meaning(spec) == meaning(shipped)


def test_kimi_k2_under_model_type_deepseek_v3_is_the_same_layer():
    data = config("kimi_k2")
    data["model_type"] = "deepseek_v3"
    assert convert(data) == convert(config("kimi_k2"))


@pytest.mark.parametrize("config_name", list(PUBLISHED))
def test_yaml_round_trips_to_an_equal_spec_and_is_deterministic(config_name):
    data = config(config_name)
    text = yaml_from_hf_config(data, "round_trip", "config.json")
    assert text == yaml_from_hf_config(copy.deepcopy(data), "round_trip", "config.json")
    assert parse_spec(text, "round_trip.yaml") == spec_from_hf_config(data, "round_trip", "config.json")


def test_yaml_comments_name_the_config_keys():
    text = yaml_from_hf_config(config("deepseek_v3"), "deepseek_v3", "config.json")
    assert "d_model: 7168" in text and "# hidden_size" in text
    assert "# rope_scaling.original_max_position_embeddings" in text
    assert "# rope_interleave (absent: transformers' default true)" in text


def test_sparse_configs_read_transformers_defaults_and_layouts():
    """DeepSeek-V3.2 and GLM-5 as transformers reads them: MLA rotates interleaved pairs whatever
    rope_interleave says; the indexer rotates halves (V3.2) or pairs (GLM-5); absent index keys
    take the config classes' defaults (64 / 32 heads of 128, top 2048)."""
    v32 = convert(edited("deepseek_v32", index_n_heads=DELETE, index_topk=DELETE, rope_interleave=False))
    assert (v32.sparse.index_heads, v32.sparse.index_head_dim, v32.sparse.top_k) == (64, 128, 2048)
    assert (v32.rope.layout, v32.sparse.index_rope_layout) == ("interleave", "half")
    glm = convert(edited("glm5", index_n_heads=DELETE))
    assert (glm.sparse.index_heads, glm.sparse.index_rope_layout, glm.rope.layout) == (32, "interleave", "interleave")
    text = yaml_from_hf_config(edited("deepseek_v32", rope_interleave=False), "v32", "config.json")
    assert "# Note: rope_interleave=false is ignored, as deepseek_v32 in transformers ignores it" in text


def test_glm5_per_layer_top_k_pattern_is_noted_not_refused():
    """GLM-5.2's index_topk_freq 4 from layer 3: layers 3-5, 7-9 ... reuse the previous full
    layer's selection, as GlmMoeDsaConfig derives it; the spec describes one layer."""
    data = edited("glm5", num_hidden_layers=12, index_topk_freq=4, index_skip_topk_offset=3)
    text = yaml_from_hf_config(data, "glm", "config.json")
    assert "# Note: layers 3-5, 7-9, 11 reuse the previous full layer's top-k" in text
    pattern = edited("glm5", num_hidden_layers=4, index_topk_pattern="FSFS")
    assert "# Note: layers 1, 3 reuse" in yaml_from_hf_config(pattern, "glm", "config.json")


# --- how values are read ---------------------------------------------------------------------------


def test_rope_interleave_false_gives_half_layout_and_v2_always_interleaves():
    v3 = config("deepseek_v3") | {"rope_interleave": False}
    assert convert(v3).rope.layout == "half"
    v2 = config("deepseek_v2_lite") | {"rope_interleave": False}  # DeepseekV2Attention does not read it
    assert convert(v2).rope.layout == "interleave"


def test_mla_norm_eps_is_transformers_fixed_1e_6_not_rms_norm_eps():
    data = config("deepseek_v3") | {"rms_norm_eps": 1e-5}
    assert convert(data).norm_eps == 1e-6
    assert "# Note: rms_norm_eps=1e-05" in yaml_from_hf_config(data, "x", "config.json")


def test_llama_kv_heads_choose_the_family():
    base = config("llama3_8b")
    assert convert(base).family == "gqa"
    assert convert(base | {"num_key_value_heads": 32}).family == "mha"
    assert convert(base | {"num_key_value_heads": 1}).family == "mqa"
    without = {k: v for k, v in base.items() if k != "num_key_value_heads"}
    assert convert(without).family == "mha"  # LlamaConfig: one kv head per query head


def test_head_dim_key_overrides_hidden_size_over_heads():
    spec = convert(config("llama3_8b") | {"head_dim": 64})
    assert (spec.head_dim, spec.d_model) == (64, 4096)


def test_mistral_sliding_window_null_and_absent():
    base = config("mistral_7b")
    assert convert(base | {"sliding_window": None}).window is None
    absent = {k: v for k, v in base.items() if k != "sliding_window"}
    assert convert(absent).window == 4096  # MistralConfig's default


def test_llama_attention_bias_maps_and_mistral_has_none():
    assert convert(config("llama3_8b") | {"attention_bias": True}).attention_bias is True
    assert convert(config("mistral_7b") | {"attention_bias": True}).attention_bias is False


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"torch_dtype": "float16"}, "fp16"),
        ({"torch_dtype": "float32"}, "fp32"),
        ({"torch_dtype": "float16", "dtype": "float32"}, "fp32"),  # transformers keeps `dtype`
        ({"torch_dtype": None}, "bf16"),
    ],
)
def test_dtype(keys, expected):
    assert convert(config("llama3_8b") | keys).dtype == expected


def test_transformers5_rope_parameters_and_rope_type():
    data = config("llama3_8b")
    del data["rope_theta"], data["rope_scaling"]
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 123456.0}
    assert convert(data).rope.theta == 123456.0
    data["rope_parameters"] = {"rope_type": "yarn", "type": "linear", "factor": 2.0, "rope_theta": 1e4}
    assert convert(data).rope.scaling.factor == 2.0  # `rope_type` wins over `type`


def test_yarn_defaults_follow_transformers():
    data = config("deepseek_v3")
    data["rope_scaling"] = {"type": "yarn", "factor": 40, "beta_fast": None, "mscale_all_dim": 1.0}
    scaling = convert(data).rope.scaling
    assert (scaling.beta_fast, scaling.beta_slow) == (32.0, 1.0)
    assert scaling.original_max_position == 163840  # no original: max_position_embeddings
    # mscale unset: transformers scales cos/sin by get_mscale(factor); mscale 0 selects that in mlagen.
    assert (scaling.mscale, scaling.mscale_all_dim) == (0.0, 1.0)
    data["original_max_position_embeddings"] = 2048  # top level overrides the table (Phi-3 rule)
    data["rope_scaling"]["original_max_position_embeddings"] = 4096
    assert convert(data).rope.scaling.original_max_position == 2048


# --- refusals --------------------------------------------------------------------------------------


DELETE = object()


def edited(name: str, **changes) -> dict:
    """A published config with keys changed (or removed, given DELETE)."""
    data = config(name)
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    return data


REFUSALS = {
    "unknown_model_type": (lambda: config("gpt2"), "model_type: 'gpt2' is not supported"),
    "qwen2_biases": (lambda: config("qwen2_7b"), "model_type: 'qwen2' is not supported"),
    "llama3_rope": (lambda: config("llama3_1_8b"), "rope_scaling.rope_type: rope scaling 'llama3'"),
    "linear_rope": (lambda: config("vicuna_7b_16k"), "rope_scaling.type: rope scaling 'linear'"),
    "dynamic_rope": (
        lambda: edited("llama3_8b", rope_scaling={"type": "dynamic", "factor": 2.0}),
        "rope_scaling.type: rope scaling 'dynamic'",
    ),
    "longrope": (
        lambda: edited("llama3_8b", rope_scaling={"rope_type": "longrope", "short_factor": [1.0]}),
        "rope_scaling.rope_type: rope scaling 'longrope'",
    ),
    "missing_kv_lora_rank": (lambda: edited("deepseek_v3", kv_lora_rank=DELETE), "kv_lora_rank: missing"),
    "missing_q_lora_rank": (lambda: edited("deepseek_v2_lite", q_lora_rank=DELETE), "q_lora_rank: missing"),
    "missing_hidden_size": (lambda: edited("mistral_7b", hidden_size=DELETE), "hidden_size: missing"),
    "missing_model_type": (lambda: edited("llama3_8b", model_type=DELETE), "model_type: missing"),
    "mla_grouped_kv_heads": (lambda: edited("deepseek_v3", num_key_value_heads=8), "num_key_value_heads: 8:"),
    "partial_rotary": (lambda: edited("llama3_8b", partial_rotary_factor=0.5), "partial_rotary_factor: 0.5"),
    "yarn_attention_factor": (
        lambda: edited("deepseek_v3", rope_scaling={"type": "yarn", "factor": 4, "attention_factor": 1.5}),
        "rope_scaling.attention_factor:",
    ),
    "yarn_untruncated": (
        lambda: edited("deepseek_v3", rope_scaling={"type": "yarn", "factor": 4, "truncate": False}),
        "rope_scaling.truncate:",
    ),
    "yarn_missing_factor": (
        lambda: edited("deepseek_v3", rope_scaling={"type": "yarn", "mscale": 1.0}),
        "rope_scaling.factor: missing",
    ),
    "float64": (lambda: edited("llama3_8b", torch_dtype="float64"), "torch_dtype: 'float64' is not one of"),
    "string_size": (lambda: edited("llama3_8b", hidden_size="4096"), "hidden_size: must be an integer"),
    "infinite_theta": (lambda: edited("llama3_8b", rope_theta=float("inf")), "rope_theta: must be a finite"),
    "not_an_object": (lambda: [1, 2], "config.json: a config.json holds a JSON object"),
    # Values mlagen's own spec rules reject are blamed on the config key they came from.
    "rank_not_multiple_of_16": (
        lambda: edited("deepseek_v3", kv_lora_rank=500),
        "kv_lora_rank: kv_lora_rank=500: must be a multiple of 16",
    ),
    "d_model_not_multiple_of_8": (
        lambda: edited("llama3_8b", hidden_size=4100, head_dim=128),
        "hidden_size: d_model=4100: must be a multiple of 8",
    ),
    "kv_heads_not_dividing": (
        lambda: edited("llama3_8b", num_key_value_heads=5),
        "num_key_value_heads: kv_heads=5: must divide heads=32",
    ),
    "yarn_factor_below_1": (
        lambda: edited("deepseek_v3", rope_scaling={"type": "yarn", "factor": 0.5}),
        "rope_scaling.factor: factor=0.5: must be at least 1",
    ),
    "rope_dim_not_multiple_of_8": (
        lambda: edited("deepseek_v3", qk_rope_head_dim=60),
        "qk_rope_head_dim: qk_rope_head_dim=60: must be a multiple of 8",
    ),
    # DeepSeek Sparse Attention
    "sparse_without_q_lora": (
        lambda: edited("deepseek_v32", q_lora_rank=None),
        "q_lora_rank: must be set for deepseek_v32: the indexer reads the query latent c_q",
    ),
    "index_head_dim_not_multiple_of_16": (
        lambda: edited("glm5", index_head_dim=100),
        "index_head_dim: index_head_dim=100: must be a multiple of 16",
    ),
    "glm_shared_first_layer": (
        lambda: edited("glm5", indexer_types=["shared", "full"]),
        "indexer_types: the first layer is 'shared' but no earlier layer selects keys for it",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexpressible_config_is_one_line_naming_file_and_key(case):
    make, expected = REFUSALS[case]
    with pytest.raises(SpecError) as info:
        convert(make())
    message = str(info.value)
    assert message.startswith("config.json: ") and expected in message, message
    assert "\n" not in message


# --- command line ----------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlagen: error: "), err
    return lines[0]


def test_cli_writes_a_spec_that_loads_to_the_converted_one(capsys, tmp_path):
    out = tmp_path / "kimi.yaml"
    code, stdout, err = run_cli(capsys, "from-hf", str(CONFIGS / "kimi_k2.json"), "-o", str(out))
    assert (code, err) == (0, "")
    assert stdout.splitlines()[0] == f"{out}: wrote"
    assert "kimi: family mla, d_model 7168, 64 heads" in stdout.splitlines()[1]
    spec = load_spec(out)
    assert spec.name == "kimi"
    assert meaning(spec) == meaning(load_spec(SPECS / "kimi_k2.yaml"))
    assert [p.name for p in tmp_path.iterdir()] == ["kimi.yaml"]  # no temporary file left

    code, stdout, _ = run_cli(capsys, "from-hf", str(CONFIGS / "kimi_k2.json"), "-o", str(out))
    assert code == 0 and stdout.startswith(f"{out}: unchanged")


def test_cli_name_option(capsys, tmp_path):
    out = tmp_path / "Some-File.yaml"  # not a module name; --name gives one
    code, _, err = run_cli(capsys, "from-hf", str(CONFIGS / "llama3_8b.json"), "-o", str(out), "--name", "l3")
    assert (code, err) == (0, "")
    assert load_spec(out).name == "l3"


def test_cli_keeps_a_different_existing_file_unless_forced(capsys, tmp_path):
    out = tmp_path / "model.yaml"
    out.write_text("# hand-edited\n")
    code, stdout, err = run_cli(capsys, "from-hf", str(CONFIGS / "mistral_7b.json"), "-o", str(out))
    assert code == 2 and stdout == ""
    assert "--force" in assert_one_error_line(err)
    assert out.read_text() == "# hand-edited\n"
    code, _, err = run_cli(capsys, "from-hf", str(CONFIGS / "mistral_7b.json"), "-o", str(out), "--force")
    assert (code, err) == (0, "")
    assert load_spec(out).window == 4096


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_file", "no such file"),
        ("bad_json", "bad.json:2: invalid JSON"),
        ("unsupported", "rope_scaling.rope_type: rope scaling 'llama3' is not supported"),
        ("bad_name", "is not a safe module name"),
        ("missing_directory", "does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path, case, expected):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type":\n')
    config_path, out = {
        "missing_file": (tmp_path / "nope.json", tmp_path / "x.yaml"),
        "bad_json": (bad, tmp_path / "x.yaml"),
        "unsupported": (CONFIGS / "llama3_1_8b.json", tmp_path / "x.yaml"),
        "bad_name": (CONFIGS / "llama3_8b.json", tmp_path / "My-Model.yaml"),
        "missing_directory": (CONFIGS / "llama3_8b.json", tmp_path / "no" / "x.yaml"),
    }[case]
    code, stdout, err = run_cli(capsys, "from-hf", str(config_path), "-o", str(out))
    assert code == 2 and stdout == ""
    assert expected in assert_one_error_line(err)
    assert not out.exists()


def test_python_m_mlagen_from_hf_exit_code(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("not json")
    result = subprocess.run(
        [sys.executable, "-m", "mlagen", "from-hf", str(bad), "-o", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr)
