"""The command line: in-process through `mlagen.cli.main`, and as `python -m mlagen` for exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlagen.cli import main
from tests.helpers import ROOT

MALFORMED = ROOT / "tests" / "malformed"
PACKAGE_FILES = ("__init__.py", "kernels.py", "module.py")


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    # The CLI resolves specs/ relative to the working directory, as a user in the checkout would.
    monkeypatch.chdir(ROOT)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mlagen: error: ")
    assert "Traceback" not in err


# --- check ---------------------------------------------------------------------------------------


def test_check_deepseek_v3_prints_parameters_and_cache(capsys):
    code, out, err = run_cli(capsys, "check", "specs/deepseek_v3.yaml")
    assert (code, err) == (0, "")
    assert "187,107,328" in out  # parameters
    assert "576 values = 1152 bytes" in out
    assert "40,960 values = 81,920 bytes" in out and "71.1x" in out


def test_check_lists_every_node_with_its_shape(capsys):
    code, out, _ = run_cli(capsys, "check", "specs/tiny_mla.yaml")
    assert code == 0
    attn = next(line for line in out.splitlines() if line.startswith("attn "))
    assert "[B, S, 4, 24]" in attn and "attention_fwd_qk16_rope8_v24" in attn


@pytest.mark.parametrize("case", ["family_missing", "dtype_bfloat16", "duplicate_key_under_rope"])
def test_check_malformed_spec_is_one_error_line(capsys, case):
    code, out, err = run_cli(capsys, "check", str(MALFORMED / f"{case}.yaml"))
    assert code == 2
    assert out == ""
    assert_one_error_line(err)
    assert f"{case}.yaml:" in err


def test_check_missing_file_exits_2(capsys):
    code, _, err = run_cli(capsys, "check", "specs/no_such_spec.yaml")
    assert code == 2
    assert_one_error_line(err)
    assert "no_such_spec.yaml" in err


# --- graph ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lowered, expected", [(False, "attention_fwd_qk16_rope8_v24"), (True, '"key"')])
def test_graph_writes_dot(capsys, tmp_path, lowered, expected):
    dot = tmp_path / "tiny_mla.dot"
    code, out, err = run_cli(
        capsys, "graph", "specs/tiny_mla.yaml", "-o", str(dot), *(["--lowered"] * lowered)
    )
    assert (code, err) == (0, "")
    assert f"wrote {dot}" in out
    text = dot.read_text()
    assert text.startswith('digraph "tiny_mla prefill" {')
    assert '"attn" [label=' in text
    assert '"attn_merged" -> "out";' in text
    assert expected in text


def test_graph_into_missing_directory_is_one_error_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "graph", "specs/tiny_mla.yaml", "-o", str(tmp_path / "no" / "x.dot"))
    assert code == 2
    assert_one_error_line(err)


# --- generate ------------------------------------------------------------------------------------


def test_generate_writes_package_then_reports_unchanged(capsys, tmp_path):
    code, out, err = run_cli(capsys, "generate", "specs/tiny_mla.yaml", "--out", str(tmp_path))
    assert (code, err) == (0, "")
    package = tmp_path / "tiny_mla"
    assert out.strip() == f"{package}: wrote {', '.join(PACKAGE_FILES)}"
    assert sorted(p.name for p in package.iterdir()) == sorted(PACKAGE_FILES)
    assert (tmp_path / "__init__.py").is_file()

    code, out, _ = run_cli(capsys, "generate", "specs/tiny_mla.yaml", "--out", str(tmp_path))
    assert code == 0
    assert out.strip() == f"{package}: unchanged"


def test_generate_check_names_the_edited_file(capsys, tmp_path):
    assert run_cli(capsys, "generate", "specs/tiny_gqa.yaml", "--out", str(tmp_path))[0] == 0

    code, out, _ = run_cli(capsys, "generate", "--check", "specs/tiny_gqa.yaml", "--out", str(tmp_path))
    assert code == 0
    assert "1 packages up to date" in out

    kernels = tmp_path / "tiny_gqa" / "kernels.py"
    kernels.write_text(kernels.read_text() + "# edited by hand\n")
    before = kernels.read_bytes()
    code, out, _ = run_cli(capsys, "generate", "--check", "specs/tiny_gqa.yaml", "--out", str(tmp_path))
    assert code == 1
    assert f"stale: {tmp_path / 'tiny_gqa'}: kernels.py" in out
    assert kernels.read_bytes() == before, "--check must write nothing"


def test_generate_check_names_a_missing_package(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "generate", "--check", "specs/tiny_gqa.yaml", "--out", str(tmp_path))
    assert code == 1
    assert "__init__.py, kernels.py, module.py" in out
    assert not (tmp_path / "tiny_gqa").exists()


def test_generate_without_spec_exits_2(capsys):
    code, out, err = run_cli(capsys, "generate")
    assert (code, out) == (2, "")
    assert_one_error_line(err)
    assert "--all" in err


def test_generate_validates_every_spec_before_writing_any(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "generate",
        "specs/tiny_gqa.yaml",
        str(MALFORMED / "family_missing.yaml"),
        "--out",
        str(tmp_path),
    )
    assert code == 2
    assert_one_error_line(err)
    assert not (tmp_path / "tiny_gqa").exists()


# --- as a process --------------------------------------------------------------------------------


def mlagen_process(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlagen", *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def stale_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stale")
    assert main(["generate", str(ROOT / "specs" / "tiny_mqa.yaml"), "--out", str(out)]) == 0
    module = out / "tiny_mqa" / "module.py"
    module.write_text(module.read_text().replace("Attention", "Attn"))
    return out


@pytest.mark.parametrize("case", ["ok", "malformed", "missing_file", "no_spec", "stale"])
def test_process_exit_codes(case, stale_out):
    argv, expected = {
        "ok": (["check", "specs/deepseek_v3.yaml"], 0),
        "malformed": (["check", str(MALFORMED / "family_missing.yaml")], 2),
        "missing_file": (["check", "specs/no_such_spec.yaml"], 2),
        "no_spec": (["generate"], 2),
        "stale": (["generate", "--check", "specs/tiny_mqa.yaml", "--out", str(stale_out)], 1),
    }[case]
    result = mlagen_process(*argv)
    assert result.returncode == expected, result.stderr
    assert "Traceback" not in result.stderr
    if expected == 2:
        assert_one_error_line(result.stderr)
    if case == "ok":
        assert "1152 bytes" in result.stdout and "71.1x" in result.stdout
    if case == "stale":
        assert "module.py" in result.stdout
