"""`mlagen inspect` without a GPU: every kernel of a spec compiled as launched for each arch
at the config the runtime would choose, with registers, spills, shared memory, tensor-core
and TMA instructions, the hot loop's issue-clocks per 1K scores, occupancy, and FLOPs /
bytes per call by ANCHORS.md's conventions; as a table or one JSON record per kernel and
arch; with the Triton-tutorial-style baseline beside them, read as ANCHORS.md reads it."""

from __future__ import annotations

import json
import re

import pytest

from mlagen import autotune, cli
from mlagen.inspect_kernels import chosen_config, visible_pairs, work
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
    assert _cells(lines[header]) == ["kernel", "node", "config", "regs", "spill B", "smem KB", "tensor-core ops",
                                     "TMA", "loop clk/1K", "warps/SM", "GFLOP", "MB"]
    rows = {line.split()[0]: _cells(line) for line in lines[header + 1: header + 1 + len(DEEPSEEK_KERNELS)]}
    assert set(rows) == set(DEEPSEEK_KERNELS)
    for kernel, cells in rows.items():
        _, _node, _config, registers, spills, _smem, mma, _tma, clocks, occupancy = cells[:10]
        assert 0 < int(registers) <= 255 and spills == "0", cells
        assert occupancy.endswith("/64") and int(occupancy.split("/")[0]) > 0, cells
        if kernel in DEEPSEEK_KERNELS[:3] + DEEPSEEK_KERNELS[4:5]:  # forward, backward, decode: tensor cores
            assert "MMA" in mma and int(mma.split()[0]) > 0 and float(clocks) > 0, cells
        else:
            assert clocks == "-", cells
    # FLOPs of the causal forward at 4096 tokens, 128 heads: 2 * H * S(S+1)/2 * (192 + 128)
    assert f"{2 * 128 * 4096 * 4097 // 2 * 320 / 1e9:.3g}" in rows["attention_fwd_qk128_rope64_v128"]
    assert rows["attention_fwd_qk128_rope64_v128"][2] == "128x128 w8 s2"  # the sm_90 default, as launched
    assert int(rows["attention_fwd_qk128_rope64_v128"][7]) > 0  # keys and values through TMA
    assert "loop clk/1K: issue-clocks per 1K scores" in out


@pytest.mark.slow
def test_inspect_json_is_one_record_per_kernel_and_arch(capsys):
    assert cli.main(["inspect", str(SPECS / "llama3_8b.yaml"), "--arch", "sm_80,sm_90", "--json",
                     "--workers", "2"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sorted((r["arch"], r["role"]) for r in records) == sorted(
        (arch, role) for arch in ("sm_80", "sm_90") for role in ("forward", "backward_delta", "backward_dkdv",
                                                                  "backward_dq"))
    for record in records:
        assert record["kind"] == "mlagen" and record["spec"] == "llama3_8b" and record["dtype"] == "bf16"
        assert record["error"] is None and record["spill_bytes"] == 0 and record["registers"] > 0
        assert set(record["mma"]) == {"HGMMA", "HMMA", "tcgen05"} and record["tma_loads"] >= 0
        assert {"num_warps", "num_stages"} <= set(record["config"])
        if record["role"] == "backward_delta":
            assert record["hot_loop"] is None and sum(record["mma"].values()) == 0
            continue
        loop = record["hot_loop"]
        assert loop["mma"] > 0 and loop["instructions"] > loop["mma"]
        m, n = loop["tile"]
        assert loop["issue_clocks_per_1k_scores"] == pytest.approx(
            loop["instructions"] * loop["warps"] / (m * n / 1024) / 4, abs=0.05)
    forward = {r["arch"]: r for r in records if r["role"] == "forward"}
    assert forward["sm_90"]["mma"]["HGMMA"] > 0 and forward["sm_80"]["mma"]["HGMMA"] == 0
    assert forward["sm_80"]["mma"]["HMMA"] > 0 and forward["sm_90"]["config"]["BLOCK_M"] == 128


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
