"""`mlagen bench`: FLOP and byte counts against hand-computed ANCHORS examples, smoke runs
on CPU under the interpreter end to end (JSON, plots, report), and the rule that a
contender is timed only after it matched the golden. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlagen.bench import BenchRequest, load_runs, run_bench, write_report
from mlagen.bench import flops as work
from mlagen.bench.contenders import Contender, Env, Prepared, Unavailable
from mlagen.bench.hardware import describe, known_gpu
from mlagen.bench.runner import ATOL, Case, run_contender
from mlagen.cli import main
from tests.helpers import ROOT, SPECS

RECORD_FIELDS = {
    "contender",
    "batch",
    "seq_len",
    "shape",
    "status",
    "reason",
    "time_ms",
    "tflops",
    "gbps",
    "roofline_fraction",
    "max_error",
    "tolerance",
    "flops",
    "bytes",
}
UNAVAILABLE_ON_CPU = {"sdpa-efficient", "sdpa-cudnn", "flex"}


# --- FLOPs, bytes and the roofline by the ANCHORS conventions ---------------------------------------


def test_deepseek_v3_decode_bytes_and_flops_per_call():
    # B=64 sequences of 4096 cached tokens, one new token, 128 heads, latent 512 + rope 64:
    # 2 * (64*4096*576 + 64*128*576 + 64*128*512) = 2 * (150,994,944 + 4,718,592 + 4,194,304)
    assert work.absorbed_decode_bytes(64, 1, 128, 64 * 4096, 576, 512, 2) == 319_815_680
    # 2 * 1 * 128 * (64*4096) * (576 + 512), sum(Sk) already covers the batch
    assert work.decode_flops(1, 128, 64 * 4096, 576, 512) == 73_014_444_032


def test_decode_formulas_reproduce_a_published_flops_to_bytes_ratio():
    # ANCHORS: FlashInfer 396 TF / 1980 GB/s at B=128, 128 heads, 1 query, mean cache 1151:
    # a ratio of 200 FLOP/byte, which only the formula without an extra factor B gives.
    total = 128 * 1151
    ratio = work.decode_flops(1, 128, total, 576, 512) / work.absorbed_decode_bytes(
        128, 1, 128, total, 576, 512, 2
    )
    assert ratio == pytest.approx(396e12 / 1980e9, rel=0.02)


def test_dense_attention_forward_flops():
    # Llama-3-8B shape: 4 * B * H * S * S * D, causal half.
    assert work.attention_flops(1, 32, 4096, 4096, 128, 128, causal=False) == 4 * 32 * 4096 * 4096 * 128
    assert work.attention_flops(1, 32, 4096, 4096, 128, 128, causal=True) == 137_438_953_472
    # MLA prefill, Dqk 192 != Dv 128: 2 * B * H * Sq * Sk/2 * (192 + 128)
    assert work.attention_flops(1, 16, 4096, 4096, 192, 128, causal=True) == 85_899_345_920
    assert work.TRAIN_FLOPS_FACTOR == 3.5  # forward + 2.5 x forward backward


def test_sliding_window_counts_the_visible_keys():
    # 8 queries, window 4: keys seen integrate to 4*8 - 4*4/2 = 24, i.e. 3 per query.
    assert work.mean_keys(8, 8, causal=True, window=4) == 3.0
    assert work.mean_keys(8, 8, causal=True, window=100) == 4.0
    assert work.mean_keys(8, 8, causal=False) == 8.0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("Tesla T4", None),
    ],
)
def test_known_gpus_by_name(name, expected):
    gpu = known_gpu(name)
    assert (gpu.name if gpu else None) == expected


def test_roofline_time_is_the_slower_of_bandwidth_and_compute():
    h100 = known_gpu("NVIDIA H100 80GB HBM3")
    decode_bytes = work.absorbed_decode_bytes(64, 1, 128, 64 * 4096, 576, 512, 2)
    decode_flops = work.decode_flops(1, 128, 64 * 4096, 576, 512)
    assert h100.ideal_seconds(decode_flops, decode_bytes, "bf16") == pytest.approx(decode_bytes / 3.35e12)
    assert h100.ideal_seconds(1e15, 1.0, "bf16") == pytest.approx(1e15 / 989e12)
    assert h100.ideal_seconds(1e15, 1.0, "fp32") is None, (
        "no listed fp32 peak: no fraction rather than a guess"
    )


# --- smoke runs end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The four smoke runs the issue asks CI to check; the decode one through the command line."""
    out = tmp_path_factory.mktemp("benchmarks")
    generated = tmp_path_factory.mktemp("generated")  # never rewrite the committed generated/
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        code = main(
            [
                "bench",
                "specs/deepseek_v3.yaml",
                "--mode",
                "decode",
                "--smoke",
                "--seq-lens",
                "24",
                "70",
                "--out",
                str(out),
                "--generated",
                str(generated),
            ]
        )
        assert code == 0
        runs = {
            ("deepseek_v3", "decode"): json.loads((out / "deepseek_v3_decode_cpu_smoke.json").read_text())
        }
        for spec, mode, lengths in [
            ("llama3_8b", "prefill", None),
            ("deepseek_v3", "prefill", None),
            ("tiny_mla", "train", (24,)),
        ]:
            request = BenchRequest(
                SPECS / f"{spec}.yaml",
                mode,
                lengths=lengths,
                smoke=True,
                out=out,
                generated=generated,
                progress=False,
            )
            runs[spec, mode] = run_bench(request, echo=lambda _: None).data
    return out, runs


@pytest.mark.parametrize(
    "key",
    [("llama3_8b", "prefill"), ("deepseek_v3", "prefill"), ("tiny_mla", "train"), ("deepseek_v3", "decode")],
    ids="-".join,
)
def test_smoke_run_checks_every_contender_before_timing_it(smoke_runs, key):
    _, runs = smoke_runs
    run = runs[key]
    assert run["smoke"] and run["mode"] == key[1] and run["dtype"] == "fp32"
    assert {"torch", "triton", "mlagen"} <= run["versions"].keys()
    assert run["device"]["type"] == "cpu" and run["device"]["interpreter"]
    assert run["command"].startswith("mlagen bench ") and "--smoke" in run["command"]
    assert run["date"].endswith("Z") and "NOT performance numbers" in run["note"]
    for record in run["results"]:
        assert RECORD_FIELDS <= record.keys(), record
        what = f"{record['contender']} at {record['batch']}x{record['seq_len']}: {record['reason']}"
        if record["status"] == "ok":
            assert record["max_error"] <= record["tolerance"] <= 2 * record["eager_error"] + ATOL["fp32"], (
                what
            )
            assert record["time_ms"] > 0 and record["tflops"] > 0 and record["gbps"] > 0, what
            assert record["roofline_fraction"] is None, "a CPU has no roofline"
        else:
            assert record["status"] == "unavailable" and record["reason"], what
            assert record["time_ms"] is None, "nothing unchecked is timed"
    statuses = {r["contender"]: r["status"] for r in run["results"]}
    assert statuses["mlagen"] == "ok" and statuses["reference"] == "ok"
    if key[1] != "decode":
        assert {name for name, status in statuses.items() if status != "ok"} == UNAVAILABLE_ON_CPU
        assert statuses["module"] == "ok" and statuses["sdpa-flash"] == "ok"


def test_smoke_substitutes_the_tiny_spec_of_the_family(smoke_runs):
    _, runs = smoke_runs
    assert runs["deepseek_v3", "prefill"]["benched_spec"] == "tiny_mla"
    assert runs["llama3_8b", "prefill"]["benched_spec"] == "tiny_gqa"
    assert (
        runs["tiny_mla", "train"]["benched_spec"] == "tiny_mla"
        and "its own shapes" in runs["tiny_mla", "train"]["note"]
    )
    assert "tiny_mla's shapes" in runs["deepseek_v3", "decode"]["note"]


def test_decode_smoke_compares_absorbed_and_expanded_paths(smoke_runs):
    _, runs = smoke_runs
    records = {(r["contender"], r["seq_len"]): r for r in runs["deepseek_v3", "decode"]["results"]}
    assert {name for name, _ in records} == {"mlagen", "reference", "expanded-mlagen", "expanded-sdpa"}
    assert all(r["status"] == "ok" for r in records.values())
    absorbed, expanded = records["mlagen", 70], records["expanded-mlagen", 70]
    assert expanded["bytes"] > absorbed["bytes"], "the expanded per-head cache moves more bytes"
    # tiny_mla: 4 heads, latent 32 + rope 8; 2 sequences of 70 tokens, fp32
    assert absorbed["bytes"] == 4 * (2 * 70 * 40 + 2 * 4 * 40 + 2 * 4 * 32)


def test_report_writes_the_tables_from_the_json_files(smoke_runs, tmp_path):
    out, runs = smoke_runs
    report = write_report(out, tmp_path / "BENCHMARKS.md").read_text()
    assert "GPU numbers are pending a GPU session" in report
    assert "## CPU smoke runs: NOT performance numbers" in report
    assert "| contender | batch | seq len | status | time (ms) | TF/s | GB/s | roofline |" in report
    assert "| contender | batch | cache len |" in report
    for run in runs.values():
        assert f"`{run['command']}`" in report and run["date"] in report
    assert "`flex` (every shape): FlexAttention runs on CPU only through torch.compile" in report


def test_plot_writes_pngs(smoke_runs, capsys):
    pytest.importorskip("matplotlib")  # installed by the test extra; skip cleanly where it is not
    out, runs = smoke_runs
    assert main(["bench", "--plot", "--out", str(out)]) == 0
    written = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()]
    assert len(written) == len(runs) + 1, "one throughput plot per run and a roofline"
    for path in written:
        with open(path, "rb") as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n", path


def test_load_runs_ignores_other_json(tmp_path):
    (tmp_path / "other.json").write_text('{"not": "a benchmark"}')
    assert load_runs(tmp_path) == []


# --- the rules of a run ------------------------------------------------------------------------------


def _fake_contender(check, name="fake") -> Contender:
    return Contender(name, "attention", "a test double", lambda problem, env: Prepared(lambda: None, check))


@pytest.fixture
def tiny_case(tmp_path):
    import mlagen

    package = mlagen.load(SPECS / "tiny_gqa.yaml", tmp_path)
    from mlagen.spec import load_spec

    request = BenchRequest(SPECS / "tiny_gqa.yaml", "prefill", smoke=True)
    case = Case(
        request, load_spec(SPECS / "tiny_gqa.yaml"), package, 1, 16, torch.float32, torch.device("cpu")
    )
    return case, Env(package, torch.device("cpu"), True)


def test_a_wrong_contender_is_reported_and_not_timed(tiny_case):
    case, env = tiny_case
    problem = case.problem("attention")
    record = run_contender(
        _fake_contender(lambda: tuple(t + 0.1 for t in problem.expected(torch.float64))),
        case,
        env,
        "fp32",
        describe(env.device),
        ATOL["fp32"],
    )
    assert record["status"] == "wrong" and record["time_ms"] is None
    assert record["max_error"] == pytest.approx(0.1) and "not timed" in record["reason"]
    nan = run_contender(
        _fake_contender(lambda: (problem.expected(torch.float64)[0] * math.nan,)),
        case,
        env,
        "fp32",
        describe(env.device),
        ATOL["fp32"],
    )
    assert nan["status"] == "wrong" and nan["max_error"] is None


def test_a_contender_that_cannot_run_says_why(tiny_case):
    case, env = tiny_case

    def refuse():
        raise Unavailable("needs a GPU")

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    for check, reason in [
        (refuse, "needs a GPU"),
        (crash, "RuntimeError: CUDA error: an illegal memory access"),
    ]:
        record = run_contender(_fake_contender(check), case, env, "fp32", describe(env.device), ATOL["fp32"])
        assert record["status"] == "unavailable" and record["reason"] == reason and record["time_ms"] is None


# --- errors a user can cause -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench"], "name a spec to benchmark"),
        (["bench", "specs/llama3_8b.yaml", "--mode", "decode", "--smoke"], "family gqa has none"),
        (["bench", "specs/tiny_latent.yaml", "--smoke"], "family latent has no benchmark yet"),
        (["bench", "specs/tiny_mla.yaml", "--smoke", "--dtype", "bf16"], "bf16 kernels cannot run"),
        (["bench", "specs/tiny_mla.yaml", "--smoke", "--seq-lens", "100000"], "max_position"),
        (["bench", "--report", "--out", "no/such/folder"], "no benchmark JSON files"),
    ],
    ids=["no-spec", "decode-without-mla", "latent-family", "bf16-on-cpu", "too-long", "report-without-runs"],
)
def test_bench_mistakes_are_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlagen: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_performance_run_without_gpu_asks_for_smoke(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "specs/deepseek_v3.yaml"]) == 2
    assert "--smoke" in capsys.readouterr().err


# --- the GPU suite (`mlagen bench --suite gpu`), its smoke run on CPU ---------------------------------------

SUITE_RECORD_FIELDS = RECORD_FIELDS | {"section", "target", "seq_q", "tier", "first_call_s"}
CHECK_FIELDS = {"name", "target", "role", "spec", "status", "reason", "max_error", "tolerance", "eager_error"}
# What the CPU smoke run can check and time; every other contender records why not.
RUNS_ON_CPU = {
    "prefill": {"mlagen", "sdpa-flash"},
    "train": {"mlagen", "sdpa-flash"},
    "decode": {"mlagen", "sdpa-latent"},
}


@pytest.fixture(scope="module")
def suite_smoke(tmp_path_factory):
    """`mlagen bench --suite gpu --smoke --report`, through the command line, as CI runs it."""
    out = tmp_path_factory.mktemp("suite")
    generated = tmp_path_factory.mktemp("generated")
    report = out / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Static reading\n\nWritten by hand, kept by every report.\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        argv = ["bench", "--suite", "gpu", "--smoke", "--out", str(out), "--generated", str(generated)]
        assert main([*argv, "--report", "--report-file", str(report)]) == 0
    data = json.loads((out / "gpu_suite_cpu_smoke.json").read_text())
    return out, data, report, generated


def test_suite_smoke_writes_the_json_schema(suite_smoke):
    _, data, _, _ = suite_smoke
    assert data["schema"] == "mlagen-gpu-suite/1" and data["smoke"] and data["state"] == "finished"
    assert {"torch", "triton", "cuda", "mlagen", "python"} <= data["versions"].keys()
    assert data["device"]["type"] == "cpu" and data["dtype"] == "fp32" and data["date"].endswith("Z")
    assert data["command"].startswith("mlagen bench --suite gpu --smoke")
    assert 0 < data["elapsed_s"] <= data["budget_s"] and data["estimated_s"] > 0
    assert data["plot"]["file"] or "matplotlib" in data["plot"]["note"]
    assert {c["role"] for c in data["checks"]} == {"forward", "backward", "decode"}
    for check in data["checks"]:
        assert CHECK_FIELDS <= check.keys(), check
        assert check["status"] == "pass", check
        assert check["max_error"] <= check["tolerance"]
    sections = {r["section"] for r in data["results"]}
    assert sections == {"prefill", "train", "decode"}
    for record in data["results"]:
        assert SUITE_RECORD_FIELDS <= record.keys(), record
        if record["status"] == "ok":
            assert record["max_error"] <= record["tolerance"] and record["time_ms"] > 0, record
            assert record["tflops"] > 0 and record["gbps"] > 0 and record["first_call_s"] >= 0
            assert record["roofline_fraction"] is None, "a CPU has no roofline"
        else:
            assert record["time_ms"] is None and record["reason"], record


def test_suite_smoke_every_contender_ran_or_said_why(suite_smoke):
    _, data, _, _ = suite_smoke
    for section in ("prefill", "train", "decode"):
        names = data["contenders"]["decode" if section == "decode" else "prefill"]
        records = [r for r in data["results"] if r["section"] == section]
        assert {r["contender"] for r in records} == set(names), section
        ran = {r["contender"] for r in records if r["status"] == "ok"}
        assert ran == RUNS_ON_CPU[section], section
        for record in records:
            assert record["status"] == "ok" or record["reason"], record
    reasons = {r["contender"]: r["reason"] for r in data["results"] if r["status"] != "ok"}
    assert reasons["flex"].startswith("FlexAttention runs on CPU only through torch.compile")
    assert "float16 or bfloat16" in reasons["baseline"] or "baseline.py" in reasons["baseline"]
    assert reasons["flashmla"].startswith("not installed") or "GPU" in reasons["flashmla"]
    assert reasons["flashinfer"].startswith("not installed") or "GPU" in reasons["flashinfer"]


def test_suite_smoke_covers_the_grid_of_the_issue(suite_smoke):
    _, data, _, _ = suite_smoke
    from mlagen.bench import suite

    targets = {r["target"] for r in data["results"]}
    assert targets == {t.label for t in suite.PREFILL_TARGETS + suite.DECODE_TARGETS}
    assert {r["seq_q"] for r in data["results"] if r["section"] == "decode"} == {1, 2}
    gpu = suite.grid_points(suite.GPU_GRID)
    assert {p.length for p in gpu if p.section != "decode"} == {1024, 4096, 16384}
    decode = [p for p in gpu if p.section == "decode"]
    assert {p.batch for p in decode} == {1, 16, 64, 128} and {p.seq_q for p in decode} == {1, 2}
    assert {p.length for p in decode} == {1024, 4096, 32768}
    assert [p.tier for p in gpu] == sorted(p.tier for p in gpu), "tier 1 runs first"


def test_suite_report_section_keeps_hand_written_text(suite_smoke):
    out, data, report, _ = suite_smoke
    text = report.read_text()
    assert text.count("## GPU suite: mlagen beside its peers on one GPU") == 1
    assert "GPU numbers are pending: no GPU session has run the suite yet" in text
    assert "Written by hand, kept by every report." in text
    assert "16 of 16 kernel checks passed" in text and data["date"] in text
    assert main(["bench", "--report", "--out", str(out), "--report-file", str(report)]) == 0
    assert report.read_text() == text, "the report is a function of the JSON files"


def test_suite_report_of_a_gpu_run_shows_tables_and_marks(suite_smoke, tmp_path):
    """The section a GPU run gets, from the smoke file dressed as one (no GPU here)."""
    from mlagen.bench.hardware import DeviceInfo
    from mlagen.bench.report import write_report

    _, data, _, _ = suite_smoke
    gpu = json.loads(json.dumps(data))
    gpu.update(smoke=False, note=None, state="running")
    gpu["device"] = DeviceInfo(
        "cuda", "NVIDIA H100 80GB HBM3", "9.0", False, known_gpu("NVIDIA H100")
    ).to_json()
    mlagen_prefill = next(
        r for r in gpu["results"] if r["contender"] == "mlagen" and r["section"] == "prefill"
    )
    mlagen_prefill.update(status="invalid", reason="timed, but the kernel failed its correctness check: x")
    gpu["checks"][0].update(status="fail", reason="out: max error 0.5 > tolerance 0.02")
    (tmp_path / "gpu_suite_nvidia-h100-80gb-hbm3.json").write_text(json.dumps(gpu))
    text = write_report(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "GPU numbers are pending" not in text
    assert "### NVIDIA H100 80GB HBM3 · fp32" in text and "roofline as H100 SXM" in text
    assert "**cut off**" in text, "a file still 'running' was cut off from outside"
    assert "| gqa-d128 forward | tiny_gqa | **FAIL** |" in text
    assert (
        "| target | seq len | batch | mlagen | sdpa-flash | sdpa-efficient | sdpa-cudnn | flex | baseline |"
        in text
    )
    assert (
        "| target | new tokens | batch | cache len | mlagen | sdpa-latent | flashmla | flashinfer |" in text
    )
    assert "**invalid**" in text and "First calls" in text


def test_suite_stops_at_its_budget_with_partial_results(tmp_path, monkeypatch):
    """A budget too short for anything: every check and point says why it did not run, the
    lower tiers are trimmed up front, and the files are still written."""
    monkeypatch.chdir(ROOT)
    argv = ["bench", "--suite", "gpu", "--smoke", "--budget-s", "1", "--out", str(tmp_path)]
    assert main([*argv, "--generated", str(tmp_path / "generated")]) == 0
    data = json.loads((tmp_path / "gpu_suite_cpu_smoke.json").read_text())
    assert data["state"] == "stopped early: the time budget ran out"
    assert all(c["status"] == "skipped" for c in data["checks"])
    assert all(r["status"] == "skipped" for r in data["results"])
    reasons = {r["reason"].split(" (")[0] for r in data["results"]}
    assert reasons == {"the time budget ran out", "trimmed before the run to fit the 1 s budget"}
    assert {r["tier"] for r in data["results"] if r["reason"].startswith("trimmed")} == {2}
    assert data["plot"]["file"] is None and data["plot"]["note"]


def test_a_failed_kernel_check_marks_its_timings_invalid(tmp_path, monkeypatch):
    from mlagen.bench import suite

    monkeypatch.chdir(ROOT)
    for name, value in [
        ("PREFILL_TARGETS", (suite.GQA,)),
        ("CHECK_TARGETS", (suite.GQA,)),
        ("DECODE_TARGETS", ()),
        ("DECODE_CHECK_TARGETS", ()),
    ]:
        monkeypatch.setattr(suite, name, value)

    def failing_forward(check, *args):
        record = dict(name=check.name, target=check.target.label, role=check.role, seq_q=check.seq_q)
        passed = check.role != "forward"
        record.update(
            status="pass" if passed else "fail", reason=None if passed else "out: max error 1 > 0.1"
        )
        return record

    monkeypatch.setattr(suite, "run_check", failing_forward)
    request = suite.SuiteRequest(smoke=True, out=tmp_path, generated=tmp_path / "generated")
    data = suite.run_suite(request, echo=lambda _: None).data
    mlagen = {r["section"]: r for r in data["results"] if r["contender"] == "mlagen"}
    for section in ("prefill", "train"):  # training runs the forward kernel too
        record = mlagen[section]
        assert record["status"] == "invalid" and record["time_ms"] > 0, record
        assert "gqa-d128 forward: out: max error 1 > 0.1" in record["reason"]
    assert all(r["status"] != "invalid" for r in data["results"] if r["contender"] != "mlagen")


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["grouped-kv-repeated", "one-kv-head-per-query-head"])
def test_baseline_contender_layout_and_gradients(heads, monkeypatch, tmp_path):
    """mlagen/bench/baseline.py runs bf16 on a GPU only: a stand-in with its signature (q, k, v
    [B, H, S, D], as many K/V heads as query heads) checks the contender's layouts, the repeated
    K/V heads and the sums of their gradients, in training."""
    import sys
    import types

    import torch.nn.functional as F

    import mlagen
    from mlagen.bench.contenders import BASELINE
    from mlagen.bench.problems import AttentionDims, AttentionProblem

    def stand_in(q, k, v, causal, sm_scale):
        assert q.shape == k.shape == v.shape, "the baseline takes one K/V head per query head"
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)

    monkeypatch.setitem(
        sys.modules, "mlagen.bench.baseline", types.SimpleNamespace(baseline_attention=stand_in)
    )
    dims = AttentionDims(heads[0], heads[1], 16, 0, 16, True, None, 0.25)

    class OneCase:
        batch, length, dtype, device = 2, 24, torch.float32, torch.device("cpu")
        problem_ = AttentionProblem(
            dims, 2, 24, torch.float32, torch.device("cpu"), train=True, check_rows=24
        )

        def problem(self, kind):
            return self.problem_

    package = mlagen.load(SPECS / "tiny_gqa.yaml", tmp_path)
    env = Env(package, torch.device("cpu"), True)
    record = run_contender(BASELINE, OneCase(), env, "fp32", describe(env.device), ATOL["fp32"])
    assert record["status"] == "ok", record["reason"]
    assert record["max_error"] <= record["tolerance"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--suite", "gpu", "specs/tiny_mla.yaml", "--smoke"], "leave out a spec"),
        (["bench", "--suite", "gpu", "--smoke", "--seq-lens", "64"], "leave out --seq-lens"),
        (["bench", "--suite", "gpu", "--smoke", "--budget-s", "0"], "--budget-s 0"),
        (["bench", "specs/tiny_mla.yaml", "--smoke", "--budget-s", "10"], "--budget-s goes with --suite gpu"),
        (["bench", "--suite", "gpu", "--smoke", "--dtype", "bf16"], "bf16 kernels cannot run"),
    ],
    ids=["spec-and-suite", "suite-with-lengths", "zero-budget", "budget-without-suite", "bf16-on-cpu"],
)
def test_suite_mistakes_are_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlagen: error: ") and message in err and len(err.splitlines()) == 1


def test_report_blocks_replace_in_place_and_append_when_missing():
    from mlagen.bench.report import replace_blocks

    text = "# Benchmarks\n\nby hand\n"
    once = replace_blocks(text, {"gpu-suite": "A\n", "runs": "B"})
    assert once.index("by hand") < once.index("\nA\n") < once.index("\nB\n")
    twice = replace_blocks(once + "\nafter, by hand\n", {"gpu-suite": "C"})
    assert "\nA\n" not in twice and "\nC\n" in twice and "\nB\n" in twice
    assert twice.endswith("after, by hand\n")
    assert replace_blocks(twice, {"gpu-suite": "C"}) == twice
