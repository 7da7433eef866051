"""`mlagen inspect` without a GPU: every kernel of a spec compiled as launched for each arch
at the config the runtime would choose, with registers, spills, shared memory, tensor-core
and TMA instructions, the hot loop's issue-clocks per 1K scores, occupancy, and FLOPs /
bytes per call by ANCHORS.md's conventions; as a table or one JSON record per kernel and
arch; with the Triton-tutorial-style baseline beside them, read as ANCHORS.md reads it."""

from __future__ import annotations

import json
import re

import pytest

from mlagen import autotune, cli, family_calls
from mlagen.inspect_kernels import chosen_config, layer_work, visible_pairs, work
from mlagen.runtime import tuning_cache
from mlagen.runtime.launch import BlockConfig
from mlagen.spec import load_spec
from tests.helpers import SPECS, generated

DEEPSEEK_KERNELS = (
    "attention_fwd_qk128_rope64_v128", "attention_fwd_qk128_rope64_v128_bwd_dkdv",
    "attention_fwd_qk128_rope64_v128_bwd_dq", "_attention_bwd_delta", "mla_decode_lat512_rope64",
    "mla_decode_lat512_rope64_append", "mla_decode_lat512_rope64_combine",
)


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(tmp_path))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"\s{2,}", line.strip())]


@pytest.mark.slow
def test_inspect_deepseek_v3_for_sm90_tables_every_kernel(capsys):
    assert cli.main(["inspect", str(SPECS / "deepseek_v3.yaml"), "--arch", "sm_90", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("deepseek_v3 on sm_90")
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    assert _cells(lines[header]) == ["kernel", "node", "role", "config", "regs", "spill B (loop ld/st)", "smem KB",
                                     "tensor-core ops", "TMA", "loop clk/1K", "warps/SM", "GFLOP", "MB"]
    rows = {line.split()[0]: _cells(line) for line in lines[header + 1: header + 1 + len(DEEPSEEK_KERNELS)]}
    assert set(rows) == set(DEEPSEEK_KERNELS)
    for kernel, cells in rows.items():
        _, _node, _role, _config, registers, spills, _smem, mma, _tma, clocks, occupancy = cells[:11]
        assert 0 < int(registers) <= 255 and spills == "0", cells
        assert occupancy.endswith("/64") and int(occupancy.split("/")[0]) > 0, cells
        if kernel in DEEPSEEK_KERNELS[:3] + DEEPSEEK_KERNELS[4:5]:  # forward, backward, decode: tensor cores
            assert "MMA" in mma and int(mma.split()[0]) > 0 and float(clocks) > 0, cells
        else:
            assert clocks == "-", cells
    # FLOPs of the causal forward at 4096 tokens, 128 heads: 2 * H * S(S+1)/2 * (192 + 128)
    assert f"{2 * 128 * 4096 * 4097 // 2 * 320 / 1e9:.3g}" in rows["attention_fwd_qk128_rope64_v128"]
    assert rows["attention_fwd_qk128_rope64_v128"][2] == "forward"
    assert rows["attention_fwd_qk128_rope64_v128"][3] == "128x128 w8 s2"  # the sm_90 default, as launched
    # 32 streamed rows of MLA's dK/dV fit sm_90's registers with the masked steps unpipelined
    assert rows["attention_fwd_qk128_rope64_v128_bwd_dkdv"][3] == "32x128 MASKED_STAGES=1 w8 s2"
    assert int(rows["attention_fwd_qk128_rope64_v128"][8]) > 0  # keys and values through TMA
    assert "loop clk/1K: issue-clocks per 1K scores" in out


@pytest.mark.slow
def test_inspect_json_is_one_record_per_kernel_and_arch(capsys):
    assert cli.main(["inspect", str(SPECS / "llama3_8b.yaml"), "--arch", "sm_80,sm_90", "--json",
                     "--workers", "2"]) == 0
    records = json.loads(capsys.readouterr().out)
    roles = ("forward", "backward_delta", "backward_dkdv", "backward_dq", "decode", "decode_combine")
    assert sorted((r["arch"], r["role"]) for r in records) == sorted(
        (arch, role) for arch in ("sm_80", "sm_90") for role in roles)
    for record in records:
        assert record["kind"] == "mlagen" and record["spec"] == "llama3_8b" and record["dtype"] == "bf16"
        assert record["error"] is None and record["spill_bytes"] == 0 and record["registers"] > 0
        assert set(record["mma"]) == {"HGMMA", "HMMA", "tcgen05"} and record["tma_loads"] >= 0
        assert {"num_warps", "num_stages"} <= set(record["config"])
        if record["role"] in ("backward_delta", "decode_combine"):
            assert record["hot_loop"] is None and sum(record["mma"].values()) == 0
            continue
        loop = record["hot_loop"]
        assert loop["mma"] > 0 and loop["instructions"] > loop["mma"] and loop["local_accesses"] == 0
        m, n = loop["tile"]
        assert loop["issue_clocks_per_1k_scores"] == pytest.approx(
            loop["instructions"] * loop["warps"] / (m * n / 1024) / 4, abs=0.05)
    forward = {r["arch"]: r for r in records if r["role"] == "forward"}
    assert forward["sm_90"]["mma"]["HGMMA"] > 0 and forward["sm_80"]["mma"]["HGMMA"] == 0
    assert forward["sm_80"]["mma"]["HMMA"] > 0 and forward["sm_90"]["config"]["BLOCK_M"] == 128
    # one new token over 4096 cached keys: the 4 query heads of a key head packed into one program's
    # rows, the keys split over programs (8 programs do not fill a GPU) and merged by the combine
    decode = {r["arch"]: r for r in records if r["role"] == "decode"}
    assert all(r["config"]["PACK_GQA"] and r["config"]["SPLIT_KV"] for r in decode.values())


@pytest.mark.slow
def test_the_baseline_reads_as_anchors_says(capsys):
    """ANCHORS.md "Static reading": Triton's tutorial 06 on sm_90 in bf16 at D128 reads about 65
    issue-clocks per 1K scores forward (128x128, TMA) and 261 backward (dK/dV + dQ, all wgmma).
    The baseline written after it must read so, or the metric is not to be trusted."""
    assert cli.main(["inspect", "--baseline", "--arch", "sm_90", "--json", "--workers", "2"]) == 0
    records = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {"forward", "backward_delta", "backward_dkdv", "backward_dq"}
    assert all(r["kind"] == "baseline" and r["spill_bytes"] == 0 for r in records.values())
    forward = records["forward"]
    assert forward["tma_loads"] > 0 and forward["mma"]["HGMMA"] > 0 and forward["config"]["BLOCK_N"] == 128
    assert 58 <= forward["hot_loop"]["issue_clocks_per_1k_scores"] <= 72
    backward = [records[role] for role in ("backward_dkdv", "backward_dq")]
    assert all(r["mma"]["HMMA"] == 0 and r["mma"]["HGMMA"] > 0 for r in backward)
    assert 235 <= sum(r["hot_loop"]["issue_clocks_per_1k_scores"] for r in backward) <= 290


# (kernel, role) of every kernel a sparse (DeepSeek-V3.2) and a compressed (DeepSeek-V4 CSA) layer
# launches: forward, backward and one decode step (mlagen.family_calls).
LAYER_KERNELS = {
    "deepseek_v32": {
        ("indexer_logits_d128", "indexer"), ("sparse_mla_lat512_rope64", "forward"),
        ("_attention_bwd_delta", "backward_delta"), ("sparse_mla_lat512_rope64_bwd", "backward"),
        ("mla_decode_lat512_rope64_append", "decode_append"), ("indexer_logits_d128_paged", "decode_indexer"),
        ("sparse_mla_lat512_rope64", "decode"), ("mla_decode_lat512_rope64_combine", "decode_combine"),
    },
    "deepseek_v4_flash_csa": {
        ("compress_d512_rope64", "compressor"), ("compress_d128_rope64", "compressor"),
        ("entry_indexer_logits_d128", "indexer"), ("compressed_attention_d512_rope64", "forward"),
        ("compress_d512_rope64_bwd", "compressor_backward"), ("compress_d128_rope64_bwd", "compressor_backward"),
        ("compressed_attention_d512_rope64_bwd", "backward"), ("compress_d512_rope64", "decode_compressor"),
        ("compress_d128_rope64", "decode_compressor"), ("entry_indexer_logits_d128", "decode_indexer"),
        ("compressed_attention_d512_rope64", "decode"),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYER_KERNELS))
def test_inspect_lists_every_kernel_of_a_sparse_or_compressed_layer(name, capsys, monkeypatch, compile_cache):
    # the arch matrix's readings (tests/test_gpu_compile.py inspects this spec at this shape); no tuning cache
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(compile_cache))
    assert cli.main(["inspect", str(SPECS / f"{name}.yaml"), "--arch", "sm_90", "--json", "--workers", "2"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["kernel"], r["role"]) for r in records} == LAYER_KERNELS[name] and len(records) == len(
        LAYER_KERNELS[name])
    nodes = {r["node"] for r in records}
    assert nodes == ({"index_scores", "attn_latent"} if name == "deepseek_v32" else
                     {"entries", "index_keys", "index_scores", "attn"})
    for record in records:
        assert record["kind"] == "mlagen" and record["spec"] == name and record["arch"] == "sm_90", record
        assert record["error"] is None and record["spill_bytes"] == 0 and record["registers"] > 0, record
        assert record["config_source"] == "launch defaults", record
        assert (record["flops"] is None) == (record["role"] == "decode_combine"), record
        assert {"num_warps", "num_stages"} <= set(record["config"]), record
        if record["role"] in ("forward", "backward", "decode", "indexer", "decode_indexer"):
            assert sum(record["mma"].values()) > 0 and record["hot_loop"]["mma"] > 0, record
            assert record["flops"] > 0 and record["bytes"] > 0, record
        if record["kernel"].startswith("compress_"):
            assert "BLOCK_J" in record["config"] and sum(record["mma"].values()) == 0, record
    # the launchers' own tiles on sm_90: heads per program for sparse MLA, (token, head) rows for
    # compressed attention; 64 for wgmma
    forward = next(r for r in records if r["role"] == "forward")
    assert forward["config"].get("BLOCK_H" if name == "deepseek_v32" else "BLOCK_M") == 64
    assert forward["mma"]["HGMMA"] > 0 and forward["mma"]["HMMA"] == 0


def test_tune_says_which_kernels_it_leaves_to_their_defaults(capsys):
    assert cli.main(["tune", str(SPECS / "tiny_dsa.yaml"), "--static", "--arch", "sm_90", "--seq-lens", "64",
                     "--workers", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("not tuned")]
    assert lines == [
        "not tuned: indexer_logits_d32, sparse_mla_lat32_rope8 and their backward and decode kernels: the sparse "
        "and compressed launchers take no config from the tuning cache, they run their defaults "
        "(mlagen/runtime/sparse.py, compressed_kernels.py), which `mlagen inspect` shows"
    ]


def test_inspect_rejects_an_unknown_arch_in_one_line(capsys):
    assert cli.main(["inspect", str(SPECS / "tiny_mla.yaml"), "--arch", "sm_75"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _launchers(name):
    return {launcher.role: launcher for launcher in autotune.all_launchers(load_spec(SPECS / f"{name}.yaml"))}


def test_flops_and_bytes_follow_the_anchors_conventions():
    deepseek = _launchers("deepseek_v3")
    shape = autotune.Shape(batch=2, seq_len=1151)
    # absorbed decode: flops = 2 * B * Sq * Hq * Sk * (576 + 512), bytes = 2 * (B*Sk*576 + B*Sq*Hq*(576 + 512))
    flops, moved = work(deepseek["decode"].use, "decode", shape, splits=8)
    assert flops == 2 * 2 * 1 * 128 * 1151 * (576 + 512)
    assert moved == 2 * (2 * 1151 * 576 + 2 * 128 * 576 + 2 * 128 * 512)
    # dense forward with Dqk == Dv == D: 4 * B * H * Sq * Sk * D
    perceiver = _launchers("perceiver_latent")["forward"]
    seq_q, seq_k = perceiver.use.lengths(shape)
    flops, _ = work(perceiver.use, "forward", shape, splits=1)
    assert perceiver.use.group_mask is None and not perceiver.use.causal
    assert flops == 4 * 2 * perceiver.use.heads_q * seq_q * seq_k * 128
    # backward as executed: dK/dV 2x and dQ 1.5x the forward's FLOPs when Dqk == Dv
    forward = _launchers("llama2_7b")
    base, _ = work(forward["forward"].use, "forward", shape, splits=1)
    dkdv, _ = work(forward["backward"].use, "backward_dkdv", shape, splits=1)
    dq, _ = work(forward["backward"].use, "backward_dq", shape, splits=1)
    assert (dkdv, dq) == (2 * base, 1.5 * base)


def test_sparse_and_compressed_flops_count_the_keys_each_query_attends_to():
    problem = family_calls.Problem(batch=2, seq_len=3000, context=5000, new_tokens=2)
    (sparse,) = family_calls.family_uses(load_spec(SPECS / "deepseek_v32.yaml"))
    selected = 2 * sum(min(2048, q + 1) for q in range(3000))  # causal: query q sees q + 1 keys, keeps 2048
    flops, _ = layer_work(sparse, sparse.attention, "forward", problem, "bf16")
    assert flops == 2 * 128 * selected * (512 + 64 + 512)
    flops, moved = layer_work(sparse, sparse.attention, "decode", problem, "bf16")
    assert flops == 2 * 128 * (2 * 2 * 2048) * (512 + 64 + 512)
    (csa,) = family_calls.family_uses(load_spec(SPECS / "deepseek_v4_flash_csa.yaml"))
    # the 128-key window, and of the entries closed so far (one per 4 tokens) the top 512
    keys = 2 * sum(min(128, q + 1) + min(512, (q + 1) // 4) for q in range(3000))
    flops, _ = layer_work(csa, csa.attention, "forward", problem, "bf16")
    assert flops == 2 * 64 * keys * 2 * 512
    indexer_flops, _ = layer_work(csa, csa.indexer, "indexer", problem, "bf16")
    assert indexer_flops == 2 * 2 * sum((q + 1) // 4 for q in range(3000)) * 64 * 128
    assert layer_work(csa, "compress_d512_rope64", "compressor", problem, "bf16")[0] == 0.0


def test_visible_pairs_count_the_masks():
    hybrid = {launcher.use.node: launcher.use for launcher in autotune.all_launchers(
        load_spec(SPECS / "hybrid_latent_window.yaml"))}
    assert visible_pairs(hybrid["local_attn"], 1000, 1000) == sum(min(i + 1, 512) for i in range(1000))
    # encode: 64 latents per 256-token chunk read their chunk; decode: tokens read earlier chunks' latents
    assert visible_pairs(hybrid["encode_attn"], 4 * 64, 1024) == 4 * 64 * 256
    assert visible_pairs(hybrid["decode_attn"], 1024, 4 * 64) == sum(c * 64 * 256 for c in range(4))


def test_inspect_shows_the_config_the_cache_holds_for_the_arch(tmp_path):
    launcher = _launchers("tiny_mla")["decode"]
    kernels = (generated("tiny_mla").kernels.mla_decode_lat32_rope8,)
    shape = autotune.Shape(1, 256)
    assert chosen_config(launcher, kernels, shape, 90, {}) == (autotune.default_for(launcher, shape, 90), "default")
    tuned = BlockConfig(16, 32, 4, 2, num_splits=4)
    key, entry = tuning_cache.new_entry(kernels, autotune.shape_key(launcher, shape), autotune.DTYPES["fp32"],
                                        "NVIDIA H100 80GB HBM3", 90, tuned, ms=0.01, method="timed")
    assert chosen_config(launcher, kernels, shape, 90, {key: entry}) == (tuned, "timed on NVIDIA H100 80GB HBM3")
    assert chosen_config(launcher, kernels, shape, 80, {key: entry})[1] == "default"
