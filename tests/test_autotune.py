"""Autotuning without a GPU: the tuning cache (round trip, atomic and concurrent writes,
corrupt, stale and foreign entries), candidates from the IR and the templates, static
pruning and ranking on AOT results, timing with an injected timer, the run-time lookup
in the generated launchers, and the `tune` / `doctor` commands."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mlagen import autotune, cli
from mlagen.aot import CompiledKernel
from mlagen.errors import MlagenError
from mlagen.runtime import tuning_cache
from mlagen.runtime.launch import BlockConfig
from mlagen.spec import load_spec
from tests.helpers import ROOT, SPECS, generated

TINY = "tiny_mha_bidirectional"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty cache; nothing here touches ~/.cache."""
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(tuning_cache.LOG_ENV, raising=False)
    tuning_cache.reset()
    yield tmp_path / "cache"
    tuning_cache.reset()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Let CPU tensors look the cache up as if they were on a GPU named "Fake GPU" (sm_90)."""
    monkeypatch.setattr(tuning_cache, "gpu_identity", lambda device: ("Fake GPU", 90))


def _tiny_inputs(seqlen=40):
    q, k, v = (torch.randn(1, seqlen, 2, 32) for _ in range(3))
    return q, k, v


def _forward_entry(config, *, gpu="Fake GPU", triton_version=None, seqlen=40):
    kernels = generated(TINY).kernels
    dims = type("Dims", (), dict(batch=1, seqlen_q=seqlen, seqlen_k=seqlen, heads_q=2, heads_k=2))
    shape = tuning_cache.attention_key(dims, causal=False, windowed=False, mask_code=0)
    key, entry = tuning_cache.new_entry((kernels.attention_fwd_qk32_v32,), shape, torch.float32, gpu, 90, config,
                                        ms=0.5, method="timed")
    if triton_version:
        key = key.rsplit("|", 1)[0] + "|" + triton_version
        entry["triton"] = triton_version
    return key, entry


# --- the cache ---------------------------------------------------------------------------------


def test_cache_round_trip_from_store_to_launcher_lookup(fake_gpu, cache_dir):
    config = BlockConfig(32, 16, 4, 2)
    path = tuning_cache.store(dict([_forward_entry(config)]))
    assert path == cache_dir / "tuning.json"
    saved = json.loads(path.read_text())
    assert saved["format"] == tuning_cache.FORMAT and len(saved["entries"]) == 1
    (entry,) = saved["entries"].values()
    assert entry["gpu"] == "Fake GPU" and entry["config"]["block_m"] == 32 and entry["dtype"] == "float32"
    kernels = generated(TINY).kernels
    q, _, _ = _tiny_inputs()
    shape = tuning_cache.attention_key(type("D", (), dict(batch=1, seqlen_q=40, seqlen_k=40, heads_q=2, heads_k=2)),
                                       causal=False, windowed=False, mask_code=0)
    assert tuning_cache.tuned_config((kernels.attention_fwd_qk32_v32,), shape, q) == config
    assert tuning_cache.tuned_config((kernels.attention_fwd_qk32_v32,), shape, q.double()) is None  # other dtype


def test_a_backward_config_with_its_own_dq_step_round_trips(fake_gpu, cache_dir):
    config = BlockConfig(16, 64, 4, 2, dq_block_n=32)
    tuning_cache.store(dict([_forward_entry(config)]))
    (entry,) = json.loads((cache_dir / "tuning.json").read_text())["entries"].values()
    assert entry["config"]["dq_block_n"] == 32
    tuning_cache.reset()  # read the file again (store() resets too)
    assert list(tuning_cache.entries().values()) == [config]
    assert tuning_cache.describe(config) == "16x64 w4 s2 dq 64x32"


def test_shapes_share_a_power_of_two_bucket():
    assert [tuning_cache.bucket(n) for n in (1, 2, 3, 64, 65, 4096, 4097)] == [1, 2, 4, 64, 128, 4096, 8192]


def test_a_write_is_atomic_and_leaves_no_temp_files(cache_dir, monkeypatch):
    tuning_cache.store({"a": {"config": {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}}})
    before = (cache_dir / "tuning.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tuning_cache.os, "replace", broken_replace)
    with pytest.raises(MlagenError, match="cannot write the tuning cache .*: disk full"):
        tuning_cache.store({"b": {"config": {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1}}})
    assert (cache_dir / "tuning.json").read_bytes() == before
    assert sorted(p.name for p in cache_dir.iterdir()) == ["tuning.json", "tuning.json.lock"]


def _store_many(cache_dir: str, who: str, count: int, barrier) -> None:
    os.environ["MLAGEN_CACHE_DIR"] = cache_dir
    from mlagen.runtime import tuning_cache as cache

    barrier.wait()
    for i in range(count):
        cache.store({f"{who}-{i}": {"config": {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}}})


def test_two_tuning_processes_writing_at_once_lose_nothing(cache_dir):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_store_many, args=(str(cache_dir), who, 12, barrier)) for who in "ab"]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    entries, problem = tuning_cache.read_file(cache_dir / "tuning.json")
    assert problem is None
    assert sorted(entries) == sorted(f"{who}-{i}" for who in "ab" for i in range(12))


@pytest.mark.parametrize("text, says", [
    ("{not json", "corrupt JSON"),
    ('{"format": 1, "entries": {"k": {"config": {"block_m": "big"}}}}', "corrupt entry"),
    ('{"format": 1, "entries": {"k": {"config": {"block_m": 24, "block_n": 16, "num_warps": 4, "num_stages": 1}}}}',
     "corrupt entry"),
    ('{"format": 0, "entries": {}}', "stale"),
], ids=["not-json", "a-config-that-is-not-a-number", "a-tile-that-is-not-a-power-of-two", "an-older-format"])
def test_a_corrupt_or_stale_cache_is_reported_once_and_ignored(text, says, cache_dir, fake_gpu):
    cache_dir.mkdir()
    (cache_dir / "tuning.json").write_text(text)
    kernels = generated(TINY).kernels
    q, k, v = _tiny_inputs()
    with pytest.warns(UserWarning, match=says) as caught:
        out, _ = kernels.attention_fwd_qk32_v32_launch(q, None, k, None, v, scale=0.2, causal=False)
    (reported,) = [w for w in caught if "tuning cache" in str(w.message)]
    assert "\n" not in str(reported.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read once per process: no second warning
        kernels.attention_fwd_qk32_v32_launch(q[:, :8], None, k, None, v, scale=0.2, causal=False)
    assert torch.isfinite(out).all()


def test_a_write_over_a_corrupt_cache_replaces_it(cache_dir, capsys):
    cache_dir.mkdir()
    (cache_dir / "tuning.json").write_text("\x00garbage")
    tuning_cache.store({"k": {"config": {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}}})
    assert "replacing the tuning cache" in capsys.readouterr().err
    assert list(tuning_cache.read_file(cache_dir / "tuning.json")[0]) == ["k"]


GOOD_CONFIG = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}


def _cache_text(entries) -> str:
    return json.dumps({"format": tuning_cache.FORMAT, "entries": entries})


# name -> (what to put at the cache path, what the one-line report says). Each of these
# crashed entries(), `mlagen doctor` or `tune --write` before it was read defensively.
CORRUPT = {
    "not-utf8": (b'{"format": 1, "entries": {"\xff\xfe": {}}}', "not UTF-8"),
    "nested-100000-deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a-5000-digit-integer": ('{"format": 1, "entries": {}, "n": 1' + "0" * 4999 + "}", "too many digits"),
    "truncated": (_cache_text({"k": {"config": GOOD_CONFIG, "ms": 0.5}})[:40], "corrupt JSON"),
    "a-huge-power-of-two-tile": (_cache_text({"k": {"config": {**GOOD_CONFIG, "block_m": 2**64}}}),
                                 "block_m=18446744073709551616 is not a power of two from 16 to 256"),
    "a-dq-step-that-is-no-tile": (_cache_text({"k": {"config": {**GOOD_CONFIG, "dq_block_n": 24}}}),
                                  "dq_block_n=24 is not a power of two from 16 to 256, or null"),
    "an-infinite-time": (_cache_text({"k": {"config": GOOD_CONFIG, "ms": math.inf}}), "ms=inf is not a finite"),
    "a-nan-time": (_cache_text({"k": {"config": GOOD_CONFIG, "ms": math.nan}}), "ms=nan is not a finite"),
    "wrong-types": (_cache_text({"a": [16], "b": {"config": "16x16"}, "c": {"config": GOOD_CONFIG, "gpu": ["H100"]},
                                 "d": {"config": {**GOOD_CONFIG, "num_warps": 4.0}}}), "4 corrupt entries"),
    "a-directory": (None, "cannot read it (Is a directory)"),
}


def _write_corrupt(cache_dir, variant):
    content, _ = CORRUPT[variant]
    path = cache_dir / "tuning.json"
    cache_dir.mkdir(exist_ok=True)
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("variant", CORRUPT)
def test_a_corrupt_cache_is_one_warning_and_never_breaks_a_launch(variant, cache_dir, fake_gpu):
    _write_corrupt(cache_dir, variant)
    kernels = generated(TINY).kernels
    q, k, v = _tiny_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = kernels.attention_fwd_qk32_v32_launch(q, None, k, None, v, scale=0.2, causal=False)
        kernels.attention_fwd_qk32_v32_launch(q[:, :8], None, k, None, v, scale=0.2, causal=False)
    (reported,) = [str(w.message) for w in caught]
    assert CORRUPT[variant][1] in reported and "\n" not in reported
    assert tuning_cache.entries() == {}
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", CORRUPT)
def test_doctor_reports_a_corrupt_cache_in_one_line(variant, cache_dir):
    _write_corrupt(cache_dir, variant)
    done = subprocess.run([sys.executable, "-m", "mlagen", "doctor"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MLAGEN_CACHE_DIR": str(cache_dir)}, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "tuning cache" in line]
    assert CORRUPT[variant][1] in line and "(ignored; " in line


@pytest.mark.parametrize("variant", [name for name in CORRUPT if name != "a-directory"])
def test_a_write_over_a_corrupt_cache_says_so_in_one_line_and_replaces_it(variant, cache_dir, capsys):
    _write_corrupt(cache_dir, variant)
    tuning_cache.store({"new": {"config": GOOD_CONFIG}})
    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith("mlagen: replacing the tuning cache") and CORRUPT[variant][1] in said
    assert tuning_cache.read_file(cache_dir / "tuning.json") == ({"new": {"config": GOOD_CONFIG}}, None)


def test_well_formed_entries_beside_corrupt_ones_are_kept(cache_dir, capsys):
    cache_dir.mkdir()
    good = {"config": GOOD_CONFIG, "ms": 0.5}
    (cache_dir / "tuning.json").write_text(_cache_text({"good": good, "bad": {"config": {**GOOD_CONFIG,
                                                                                         "num_stages": 0}}}))
    with pytest.warns(UserWarning, match="ignoring part of the tuning cache .*1 corrupt entry .'bad': num_stages=0"):
        assert tuning_cache.entries() == {"good": BlockConfig(16, 16, 4, 1)}
    tuning_cache.store({"new": {"config": GOOD_CONFIG}})
    assert "replacing the tuning cache" in capsys.readouterr().err
    assert tuning_cache.read_file(cache_dir / "tuning.json") == ({"good": good, "new": {"config": GOOD_CONFIG}}, None)


def test_tune_write_refuses_a_directory_in_place_of_the_cache_before_any_work(cache_dir, monkeypatch, capsys):
    _write_corrupt(cache_dir, "a-directory")

    def compile_calls(*args, **kwargs):
        raise AssertionError("compiled before finding that the cache cannot be written")

    monkeypatch.setattr(autotune, "compile_calls", compile_calls)
    code = cli.main(["tune", str(SPECS / "tiny_mla.yaml"), "--static", "--seq-lens", "64", "--write"])
    (said,) = capsys.readouterr().err.splitlines()
    assert code == 2
    assert said == (f"mlagen: error: cannot write the tuning cache {cache_dir / 'tuning.json'}: it is not a file; "
                    "remove it or set MLAGEN_CACHE_DIR")
    with pytest.raises(MlagenError, match="it is not a file"):
        tuning_cache.store({"new": {"config": GOOD_CONFIG}})


def test_entries_for_another_triton_version_or_gpu_are_ignored(fake_gpu):
    tuning_cache.store(dict([_forward_entry(BlockConfig(32, 32, 4, 1), gpu="Other GPU"),
                             _forward_entry(BlockConfig(32, 32, 8, 1), triton_version="0.0.1")]))
    kernels = generated(TINY).kernels
    q, k, v = _tiny_inputs()
    dims = type("D", (), dict(batch=1, seqlen_q=40, seqlen_k=40, heads_q=2, heads_k=2))
    shape = tuning_cache.attention_key(dims, causal=False, windowed=False, mask_code=0)
    assert tuning_cache.tuned_config((kernels.attention_fwd_qk32_v32,), shape, q) is None


def test_the_launcher_uses_a_cached_entry_and_the_log_says_so(fake_gpu, monkeypatch, capsys):
    config = BlockConfig(32, 16, 4, 2)
    tuning_cache.store(dict([_forward_entry(config)]))
    monkeypatch.setenv(tuning_cache.LOG_ENV, "1")
    kernels = generated(TINY).kernels

    def no_default(*args, **kwargs):
        raise AssertionError("the launcher fell back to the default config")

    monkeypatch.setattr(kernels, "default_config", no_default)
    q, k, v = _tiny_inputs()
    out, _ = kernels.attention_fwd_qk32_v32_launch(q, None, k, None, v, scale=0.2, causal=False)
    expected = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.2, -1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", expected, v), atol=1e-5, rtol=1e-5)
    log = capsys.readouterr().err
    assert "mlagen autotune: attention_fwd_qk32_v32" in log and "tuned 32x16 w4 s2 (from Fake GPU)" in log


def test_cpu_tensors_never_read_the_cache(cache_dir):
    cache_dir.mkdir()
    (cache_dir / "tuning.json").write_text("{not json")
    kernels = generated(TINY).kernels
    q, k, v = _tiny_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.attention_fwd_qk32_v32_launch(q, None, k, None, v, scale=0.2, causal=False)


# --- candidates from the IR and the template -----------------------------------------------------


def _launchers(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    constexprs = autotune.jit_constexprs((ROOT / "generated" / name / "kernels.py").read_text())
    return {launcher.role: launcher for launcher in autotune.all_launchers(spec)}, constexprs


def test_candidates_come_from_the_templates_tile_constexprs_bounded_by_the_ir():
    launchers, constexprs = _launchers("deepseek_v3")
    assert set(launchers) == {"forward", "backward", "decode"}
    assert constexprs["mla_decode_lat512_rope64"][-2:] == ("BLOCK_H", "BLOCK_N")
    long = autotune.Shape(1, 4096)
    for role, launcher in launchers.items():
        found = autotune.candidates(launcher, constexprs, long)
        assert found and len(set(found)) == len(found)
        for config in found:
            assert all(v in (16, 32, 64, 128) for v in (config.block_m, config.block_n)), config
            assert autotune.register_estimate(launcher, config) <= autotune.REGISTER_ESTIMATE_LIMIT
        # the static defaults (spill-free on every arch: tests/test_gpu_compile.py) are in the space
        for arch in autotune.ARCHS:
            assert autotune.default_for(launcher, long, arch) in autotune.candidates(launcher, constexprs, long,
                                                                                     arch), (role, arch)
    # the backward's dQ kernel steps on its own: wider steps than dK/dV's, never the same one twice
    backward = autotune.candidates(launchers["backward"], constexprs, long, 90)
    assert {c.dq_block_n for c in backward} == {None, 32, 64, 128}
    assert all(c.dq_block_n is None or c.dq_block_n > c.block_m for c in backward)
    decode = autotune.candidates(launchers["decode"], constexprs, long)
    # without an arch, as a program that keeps half of the 512-wide output (mma.sync archs): 64
    # rows fit one warpgroup, 128 rows need 8 warps ([128, 256] fp32 on 4 warps is 256 registers
    # a thread)
    assert BlockConfig(64, 64, 4, 2) in decode
    assert {c.num_warps for c in decode if c.block_m == 128} == {8}
    # on sm_90 a program keeps all of it: 64 rows need two warpgroups
    hopper = autotune.candidates(launchers["decode"], constexprs, long, 90)
    assert BlockConfig(64, 64, 8, 2) in hopper and BlockConfig(64, 64, 4, 2) not in hopper


def test_tiles_are_no_wider_than_the_shape_needs():
    launchers, constexprs = _launchers("tiny_mla")
    short = autotune.Shape(2, 24)
    forward = autotune.candidates(launchers["forward"], constexprs, short)
    assert max(c.block_m for c in forward) == 32 and max(c.block_n for c in forward) == 32
    # 4 heads x 1 new token: one 16-row tile holds every (token, head) row
    assert {c.block_m for c in autotune.candidates(launchers["decode"], constexprs, short)} == {16}
    assert autotune.split_candidates(1000, 64) == [1, 2, 4, 8, 16]


def test_an_unknown_tile_constexpr_is_an_error_that_names_it():
    launchers, constexprs = _launchers(TINY)
    changed = {**constexprs, "attention_fwd_qk32_v32": ("BLOCK_M", "BLOCK_Q")}
    with pytest.raises(MlagenError, match="BLOCK_Q"):
        autotune.candidates(launchers["forward"], changed, autotune.Shape(1, 64))


# --- static pruning and ranking -------------------------------------------------------------------


def _compiled(registers=128, spill=0, shared=32 * 1024, warps=4, mma=(("HGMMA", 8),), error=""):
    return (CompiledKernel("k", 90, shared, registers, spill, warps, mma, error),)


def test_occupancy_is_limited_by_registers_and_shared_memory():
    h100 = autotune.ARCHS[90]
    assert autotune.occupancy(_compiled(255, warps=8)[0], h100) == 8  # 256 regs x 32 lanes: 8 warps fill 64K
    assert autotune.occupancy(_compiled(128, warps=4, shared=1024)[0], h100) == 16
    assert autotune.occupancy(_compiled(64, warps=4, shared=100 * 1024)[0], h100) == 8  # two CTAs of smem
    assert autotune.occupancy(_compiled(32, warps=4, shared=0)[0], h100) == 64


def test_static_pruning_drops_spills_shared_memory_overflow_and_failures_then_ranks():
    configs = [BlockConfig(128, 64, 8, 3), BlockConfig(128, 128, 8, 3), BlockConfig(64, 64, 4, 3),
               BlockConfig(64, 64, 4, 2), BlockConfig(32, 32, 4, 2), BlockConfig(64, 32, 4, 2),
               BlockConfig(128, 32, 4, 2)]
    compiled = {
        configs[0]: _compiled(255, warps=8, shared=64 * 1024),
        configs[1]: _compiled(255, spill=512, warps=8),
        configs[2]: _compiled(168, shared=240 * 1024),
        configs[3]: _compiled(168),
        configs[4]: _compiled(96, mma=()),  # no tensor cores
        configs[5]: _compiled(error="out of resources"),
        configs[6]: _compiled(200, warps=4),
    }
    survivors, dropped = autotune.rank(configs, compiled, autotune.ARCHS[90])
    assert {d.config: d.reason.split(": ", 1)[1].split(" ")[0] for d in dropped} == {
        configs[1]: "spills", configs[2]: "240", configs[5]: "compile"}
    order = [s.config for s in survivors]
    assert order[0] == BlockConfig(128, 64, 8, 3)  # largest tile at full occupancy
    assert order[-1] == BlockConfig(32, 32, 4, 2)  # no tensor cores: last
    assert all(a.score >= b.score for a, b in zip(survivors, survivors[1:]))


def _fake_compile(calls, workers=None, desc="", keep=None):
    """AOT results by a rule, for the ranking logic: big tiles spill, 4 stages overflow shared memory.
    A call is launch_call(kernels_file, launcher, shape, config, device)."""
    results = []
    for call, arch in calls:
        _, launcher, _, config, _ = call.args
        spill = 64 if config.block_m * config.block_n >= 64 * 64 else 0
        shared = 64 * 1024 * config.num_stages
        results.append(tuple(
            (None, CompiledKernel(kernel, arch, shared, 160, spill, config.num_warps,
                                  (("HGMMA", config.block_m * config.block_n // 256),)))
            for kernel in launcher.kernels))
    return results


def test_tune_static_ranks_candidates_and_writes_arch_winners(monkeypatch, capsys, fake_gpu):
    monkeypatch.setattr(autotune, "compile_calls", _fake_compile)
    code = cli.main(["tune", str(SPECS / "tiny_mla.yaml"), "--static", "--arch", "sm_90", "--seq-lens", "64",
                     "--write", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "static ranking for sm_90" in out
    for role in ("forward", "backward", "decode"):
        assert f" {role} (" in out
    assert "dropped: " in out and "spill" in out and "shared memory" in out
    entries, _ = tuning_cache.read_file(tuning_cache.cache_path())
    assert {e["gpu"] for e in entries.values()} == {"sm_90"} and len(entries) == 3
    assert {e["method"] for e in entries.values()} == {"static"}
    # a GPU of that arch without a timed entry takes the static winner
    kernels = generated("tiny_mla").kernels
    forward = next(e for e in entries.values() if e["kernel"] == "attention_fwd_qk16_rope8_v24")
    tuning_cache.reset()
    found = tuning_cache.tuned_config((kernels.attention_fwd_qk16_rope8_v24,), forward["shape"], torch.zeros(1))
    assert found is not None and found.block_m == forward["config"]["block_m"]


def test_tune_static_without_write_says_that_nothing_was_stored(monkeypatch, capsys, cache_dir):
    monkeypatch.setattr(autotune, "compile_calls", _fake_compile)
    assert cli.main(["tune", str(SPECS / "tiny_mla.yaml"), "--static", "--seq-lens", "64", "--top", "1"]) == 0
    assert "\nnothing was stored (add --write to store the winners for sm_90 in " in capsys.readouterr().out
    assert not (cache_dir / "tuning.json").exists()


# --- timing ----------------------------------------------------------------------------------------


def test_a_failing_candidate_scores_infinity_and_the_run_goes_on():
    configs = [BlockConfig(16, 16, 4, s) for s in (1, 2, 3, 4)]

    def timer(config):
        if config.num_stages == 2:
            raise RuntimeError("out of resources: shared memory")
        return {1: 3.0, 3: 1.5, 4: float("nan")}[config.num_stages]

    timed = autotune.time_candidates(configs, lambda config: config, timer)
    assert [t.ms for t in timed] == [3.0, math.inf, 1.5, math.inf]
    assert "out of resources" in timed[1].error and "nan" in timed[3].error


def test_tune_times_candidates_with_an_injected_timer_and_stores_the_winners(fake_gpu, monkeypatch, capsys,
                                                                              tmp_path):
    monkeypatch.setenv(tuning_cache.LOG_ENV, "1")
    calls = itertools.count()
    scripted = {0: 5.0, 1: None, 2: 3.0, 3: 4.0, 4: None, 5: 2.0}  # None: the candidate fails

    def timer(fn):
        value = scripted[next(calls)]
        if value is None:
            raise RuntimeError("failed to launch")
        return value

    results = autotune.tune_spec(SPECS / f"{TINY}.yaml", [autotune.Shape(1, 40)], out_root=tmp_path / "generated",
                                 device=torch.device("cpu"), timer=timer,
                                 select=lambda launcher, shape, configs: configs[:3])
    assert [r.launcher.role for r in results] == ["forward", "backward"]
    assert results[0].default_ms == 5.0  # the default is timed first
    table = "\n".join(autotune.format_tuned(results))
    assert "16x16 w4 s2" in table and "3.0000" in table and "5.0000" in table
    for result, best in zip(results, (3.0, 2.0)):
        assert [t.ms for t in result.timed][1] == math.inf
        assert result.winner.ms == best and result.winner.config == result.timed[2].config
    entries, _ = tuning_cache.read_file(tuning_cache.cache_path())
    assert sorted((e["kernel"], e["ms"], e["method"], e["gpu"]) for e in entries.values()) == [
        ("attention_fwd_qk32_v32", 3.0, "timed", "Fake GPU"), ("attention_fwd_qk32_v32_bwd_dkdv", 2.0, "timed", "Fake GPU")]
    log = capsys.readouterr().err
    assert "mlagen autotune: attention_fwd_qk32_v32 [" in log and "16x16 w4 s2 3.0000 ms (best of 3)" in log
    assert "mlagen autotune: attention_fwd_qk32_v32_bwd_dkdv [" in log and "2.0000 ms" in log
    # the generated launcher now finds the forward winner for this shape bucket
    kernels = generated(TINY).kernels
    q, k, v = _tiny_inputs()
    shape = results[0].key
    assert tuning_cache.tuned_config((kernels.attention_fwd_qk32_v32,), shape, q) == results[0].winner.config


def test_tune_drives_the_real_forward_backward_and_decode_launchers(fake_gpu, tmp_path):
    """The calls the GPU timer would time, run once each under the interpreter."""
    def run_once(fn):
        fn()
        return 1.0

    def two_small(launcher, shape, configs):
        return [c for c in configs if c.block_m <= 32 and c.block_n <= 32][:2]

    results = autotune.tune_spec(SPECS / "tiny_mla.yaml", [autotune.Shape(2, 40)], out_root=tmp_path / "generated",
                                 device=torch.device("cpu"), timer=run_once, select=two_small)
    assert [r.launcher.role for r in results] == ["forward", "backward", "decode"]
    for result in results:
        assert result.winner is not None and all(t.ms == 1.0 for t in result.timed), result.timed
    # decode also sweeps the split-KV factor of its winner: 40 keys in 16-key tiles allow 1 or 2 splits
    assert [t.config.num_splits for t in results[2].timed] == [None, None, 1, 2]


# --- commands -------------------------------------------------------------------------------------


def test_tune_without_a_gpu_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["tune", str(SPECS / "tiny_mla.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("mlagen: error: ")
    assert "--static" in captured.err


def test_bad_arch_is_one_line(capsys):
    assert cli.main(["tune", str(SPECS / "tiny_mla.yaml"), "--static", "--arch", "sm_70"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mlagen: error: --arch sm_70: choose from sm_80, sm_89, sm_90, sm_100, sm_120 or all")


def test_doctor_reports_versions_gpu_interpreter_and_cache(cache_dir, capsys):
    assert cli.main(["doctor"]) == 0
    first = capsys.readouterr().out
    assert "torch " in first and "triton " in first
    assert ("no GPU" in first) != torch.cuda.is_available()
    assert "TRITON_INTERPRET=1" in first  # tests run under the interpreter
    assert f"tuning cache: {cache_dir / 'tuning.json'}: none yet" in first
    tuning_cache.store(dict([_forward_entry(BlockConfig(16, 16, 4, 1))]))
    cli.main(["doctor"])
    assert "1 entry," in capsys.readouterr().out
    (cache_dir / "tuning.json").write_text("[1, 2")
    cli.main(["doctor"])
    report = capsys.readouterr().out
    assert "corrupt JSON" in report and len(report.splitlines()) <= 8


def test_the_run_time_lookup_stays_in_the_runtime_layer():
    """DESIGN.md "Layers": a generated module and the tuning cache import no sympy, jinja2,
    networkx, passes, codegen or autotune (nor filelock until a write)."""
    code = ("import sys, generated.deepseek_v3, mlagen.runtime.tuning_cache; "
            "print(sorted(m for m in ('sympy', 'jinja2', 'networkx', 'mlagen.passes', 'mlagen.codegen', "
            "'mlagen.autotune', 'filelock') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
