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
    "sparse-prefill": {"mlagen", "dense-mlagen"},
    "sparse-train": {"mlagen", "dense-mlagen"},
    "sparse-decode": {"mlagen", "dense-mlagen"},  # dense-mlagen: over the bf16/fp32 caches only
    "compressed-prefill": {"mlagen", "reference"},
    "compressed-train": {"mlagen", "reference"},
    "compressed-decode": {"mlagen", "reference"},
}
SUITE_ROLES = {
    "forward",
    "backward",
    "decode",
    "sparse-forward",
    "sparse-backward",
    "sparse-decode",
    "compressed-forward",
    "compressed-backward",
    "compressed-decode",
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
    assert {c["role"] for c in data["checks"]} == SUITE_ROLES
    for check in data["checks"]:
        assert CHECK_FIELDS <= check.keys(), check
        assert check["status"] == "pass", check
        assert check["max_error"] <= check["tolerance"]
    sections = {r["section"] for r in data["results"]}
    assert sections == set(RUNS_ON_CPU)
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
    for section in RUNS_ON_CPU:
        names = data["contenders"][section]
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
    assert reasons["flashmla-sparse"].startswith("not installed") or "GPU" in reasons["flashmla-sparse"]
    assert reasons["flashmla-model1"].startswith("not installed") or "MODEL1" in reasons["flashmla-model1"]
    fp8 = [r for r in data["results"] if r["target"].endswith("-fp8") and r["contender"] == "dense-mlagen"]
    assert fp8 and all("model-dtype caches" in r["reason"] for r in fp8)


def test_suite_smoke_covers_the_grid_of_the_issue(suite_smoke):
    _, data, _, _ = suite_smoke
    from mlagen.bench import suite

    targets = {r["target"] for r in data["results"]}
    families = suite.SPARSE_TARGETS + suite.SPARSE_DECODE_TARGETS + suite.COMPRESSED_TARGETS
    assert targets == {t.label for t in suite.PREFILL_TARGETS + suite.DECODE_TARGETS + families}
    assert {r["seq_q"] for r in data["results"] if r["section"] == "decode"} == {1, 2}
    gpu = suite.grid_points(suite.GPU_GRID)
    assert {p.length for p in gpu if p.section in ("prefill", "train")} == {1024, 4096, 16384}
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
    assert "38 of 38 kernel checks passed" in text and data["date"] in text
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
    assert {r["tier"] for r in data["results"] if r["reason"].startswith("trimmed")} == {2, 3}
    assert data["plot"]["file"] is None and data["plot"]["note"]


def test_a_failed_kernel_check_marks_its_timings_invalid(tmp_path, monkeypatch):
    from mlagen.bench import suite

    monkeypatch.chdir(ROOT)
    for name, value in [
        ("PREFILL_TARGETS", (suite.GQA,)),
        ("CHECK_TARGETS", (suite.GQA,)),
        ("DECODE_TARGETS", ()),
        ("DECODE_CHECK_TARGETS", ()),
        ("SPARSE_TARGETS", ()),
        ("SPARSE_DECODE_TARGETS", ()),
        ("COMPRESSED_TARGETS", ()),
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


# --- the GPU suite's DeepSeek families: DeepSeek Sparse Attention and DeepSeek-V4 ----------------------


def test_suite_family_grid_is_the_issues():
    """Issues 16 and 17: DSA prefill and training at 4k / 16k with top-k 2048, decode over the bf16
    and FP8 caches at batch 1 / 16 / 64, cache 4k / 32k, 1 and 2 new tokens, 128 and 16 heads;
    V4 prefill, training and decode per layer type; tier 1 of each family measured first."""
    from mlagen.bench import suite

    targets = suite.Targets(False, "generated")
    points = suite.grid_points(suite.GPU_GRID)
    sparse = [p for p in points if p.section in ("sparse-prefill", "sparse-train")]
    assert {p.length for p in sparse} == {4096, 16384} and targets.spec(suite.DSA).sparse.top_k == 2048
    decode = [p for p in points if p.section == "sparse-decode"]
    assert {p.batch for p in decode} == {1, 16, 64} and {p.length for p in decode} == {4096, 32768}
    assert {p.seq_q for p in decode} == {1, 2}
    assert {(targets.decode_heads(p.target), p.target.cache_dtype) for p in decode} == {
        (128, "model"),
        (128, "fp8"),
        (16, "model"),
        (16, "fp8"),
    }
    for section in ("compressed-prefill", "compressed-train", "compressed-decode"):
        layers = {targets.spec(p.target).name for p in points if p.section == section}
        assert layers == {"deepseek_v4_flash_csa", "deepseek_v4_flash_hca", "deepseek_v4_flash_sliding"}
    tier_one = {(p.section, p.target.label) for p in points if p.tier == 1 and "-" in p.section}
    assert tier_one == {
        ("sparse-prefill", "dsa-h128"),
        ("sparse-decode", "dsa-decode-h128-fp8"),
        ("compressed-prefill", "v4-csa"),
        ("compressed-decode", "v4-csa"),
    }
    checks = {c.name for c in suite.required_checks(decode[0])}
    assert checks == {
        f"{decode[0].target.label} sparse-decode, {decode[0].seq_q} new token" + "s" * (decode[0].seq_q > 1)
    }


def test_suite_plan_for_an_h200_fits_its_budget(capsys, monkeypatch):
    """The plan a GPU run would print, made here: tier 1 of every section within the 420 s budget
    (the 8 minutes of scripts/gpu_suite.sh less the tests and the report), compiles included."""
    monkeypatch.chdir(ROOT)
    assert main(["bench", "--suite", "gpu", "--plan-for", "NVIDIA H200"]) == 0
    out = capsys.readouterr().out
    estimate = next(line for line in out.splitlines() if line.startswith("estimate: "))
    planned = float(estimate.split(": ")[-1].split(" s of a ")[0])
    assert planned <= 420 and "of a 420 s budget" in estimate
    for section in ("sparse-prefill", "sparse-decode", "compressed-prefill", "compressed-decode"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {section} | 1 |"))
        assert row.split(" | ")[3] != "0" and row.endswith("| 0 |"), row
    assert main(["bench", "--suite", "gpu", "--plan-for", "Tesla T4"]) == 2


def test_sparse_and_compressed_flops_count_the_attended_keys():
    from mlagen.bench import families
    from mlagen.spec import load_spec

    v32 = load_spec(SPECS / "deepseek_v32.yaml")
    # 4096 queries: the first 2048 see t + 1 keys, the rest top_k = 2048.
    assert families.mean_selected(4096, 2048) == (2048 * 2049 / 2 + 2048 * 2048) / 4096
    flops, _ = families.sparse_prefill_work(v32, 1, 4096, 2, train=False)
    attention = 2 * 128 * 4096 * families.mean_selected(4096, 2048) * (576 + 512)
    indexer = 4096 * 2048 * 2 * 64 * 129  # causal half of the pairs, 64 heads x (128 + 1)
    assert flops == pytest.approx(attention + indexer, rel=1e-12)
    # Bytes, a lower bound: q, out and the latent rows once (576 + 512 per head, 576 per key), the
    # indexer's query (64 x 128), key (128), head weights (fp32) and its fp32 scores twice.
    _, moved = families.sparse_prefill_work(v32, 1, 4096, 2, train=False)
    assert moved == 2 * 4096 * (128 * 1088 + 576) + 2 * 4096 * (64 * 128 + 128) + 4 * 4096 * (64 + 2 * 4096)
    # Decode, FP8: 2048 selected rows of 656 B and 32768 indexer keys of 132 B per sequence.
    _, moved = families.sparse_decode_work(v32, 128, 1, 32768, 1, 2, fp8_cache=True)
    assert moved == 32768 * 132 + 2048 * 656 + 2 * (128 * 1088 + 64 * 128) + 2 * 4 * 32768
    hca = load_spec(SPECS / "deepseek_v4_flash_hca.yaml")
    assert families.compressed_keys(hca, 1000) == (128, 1001 // 128, 0)
    csa = load_spec(SPECS / "deepseek_v4_flash_csa.yaml")
    assert families.compressed_keys(csa, 4095) == (128, 512, 1024)
    attention, indexer = families.compressed_attention_work(csa, 1, 4095, 1)
    assert attention == 2 * 64 * (128 + 512) * 2 * 512 and indexer == 2 * 64 * 129 * 1024


def _family_problem(kind: str, cache_dtype: str = "model"):
    from mlagen.bench import families
    from mlagen.spec import load_spec
    from tests.helpers import generated

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    if kind.startswith("sparse"):
        package = generated("tiny_dsa")
        spec = load_spec(SPECS / "tiny_dsa.yaml")
        if kind == "sparse-decode":
            cache = families.filled_sparse_cache(spec, 2, 29, torch.float32, cpu, cache_dtype)
            return families.SparseDecodeProblem(spec, package, cache, 2, 3, torch.float32, cpu, 2), package
        train = kind == "sparse-train"
        return families.SparsePrefillProblem(
            spec, package, 1, 21, torch.float32, cpu, train=train, check_rows=21
        ), package
    package = generated("tiny_compressed_csa")
    spec = load_spec(SPECS / "tiny_compressed_csa.yaml")
    if kind == "compressed-decode":
        return families.CompressedDecodeProblem(spec, package, 2, 29, 2, torch.float32, cpu, 2), package
    return families.CompressedPrefillProblem(
        spec, package, 1, 29, torch.float32, cpu, train=False, check_len=29
    ), package


class _OneProblem:
    batch, length, dtype, device = 1, 1, torch.float32, torch.device("cpu")

    def __init__(self, problem):
        self.problem_ = problem

    def problem(self, kind):
        return self.problem_


@pytest.mark.parametrize(
    "kind, cache_dtype",
    [
        ("sparse-prefill", "model"),
        ("sparse-train", "model"),
        ("sparse-decode", "model"),
        ("sparse-decode", "fp8"),
        ("compressed-prefill", "model"),
        ("compressed-decode", "model"),
    ],
)
def test_family_contenders_pass_and_a_wrong_kernel_is_marked_wrong(kind, cache_dtype):
    """mlagen's contender of each family passes against the fp64 golden; the same contender with
    a wrong kernel (its output off by 1% of its largest value, or one more key made visible to
    the indexer) is recorded as wrong and not timed."""
    from mlagen.bench import families

    problem, package = _family_problem(kind, cache_dtype)
    contenders = (
        families.COMPRESSED_CONTENDERS if kind.startswith("compressed") else families.SPARSE_CONTENDERS
    )
    right = contenders[0]
    env = Env(package, torch.device("cpu"), True)
    record = run_contender(
        right, _OneProblem(problem), env, "fp32", describe(env.device), 0.0, atol_scale=1e-5
    )
    assert record["status"] == "ok", record

    out_index = problem.output_names.index("out")

    def off(outputs):
        outputs = list(outputs)
        outputs[out_index] = outputs[out_index] + 0.01 * outputs[out_index].abs().max()
        return tuple(outputs)

    def unmasked(outputs):
        outputs = list(outputs)
        outputs[1] = outputs[1].clone()
        outputs[1].view(-1)[outputs[1].view(-1).argmax()] = 0.0  # a hidden key shown
        return tuple(outputs)

    for wrong in [off] + ([unmasked] if kind.startswith("sparse") else []):

        def prepare(problem, env, wrong=wrong):
            prepared = right.prepare(problem, env)
            return Prepared(prepared.step, lambda: wrong(prepared.check()))

        bad = Contender("wrong", right.problem, "a wrong kernel", prepare)
        record = run_contender(
            bad, _OneProblem(problem), env, "fp32", describe(env.device), 0.0, atol_scale=1e-5
        )
        assert record["status"] == "wrong" and record["time_ms"] is None, record
