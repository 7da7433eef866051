"""The command line: in-process through `mlagen.cli.main`, and as `python -m mlagen` for exit codes."""

from __future__ import annotations

import os
import shlex
import shutil
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


# --- hostile input (issue 14) --------------------------------------------------------------------

# Runs the CLI as `python -m mlagen` would, then reports which heavy modules it imported.
_IMPORTS = """
import runpy, sys
sys.argv = ["mlagen", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("mlagen", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print("EXIT", code, "HEAVY", sorted(m for m in ("torch", "triton") if m in sys.modules))
"""


@pytest.mark.parametrize("command", ["check", "generate", "generate_check", "graph", "from_hf"])
def test_compiler_commands_do_not_import_torch(tmp_path, command):
    argv = {
        "check": ["check", "specs/deepseek_v3.yaml"],
        "generate": ["generate", "specs/tiny_mla.yaml", "specs/tiny_gqa.yaml", "--out", str(tmp_path)],
        # renders every file to compare; exits 1 because tmp_path holds no package yet
        "generate_check": ["generate", "--check", "specs/tiny_mla.yaml", "--out", str(tmp_path)],
        "graph": ["graph", "specs/tiny_mla.yaml", "-o", str(tmp_path / "tiny_mla.dot")],
        "from_hf": ["from-hf", "tests/hf_configs/llama3_8b.json", "-o", str(tmp_path / "llama.yaml")],
    }[command]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    code = 1 if command == "generate_check" else 0
    assert result.stdout.strip().splitlines()[-1] == f"EXIT {code} HEAVY []", result.stdout + result.stderr


def test_closed_stdout_ends_quietly():
    # The reader is gone before mlagen writes (what `| head -1` does to a long output): no traceback.
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mlagen", "check", "specs/deepseek_v3.yaml"],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_piped_into_head_prints_the_first_line_only():
    result = subprocess.run(
        f"{shlex.quote(sys.executable)} -m mlagen check specs/deepseek_v3.yaml | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("deepseek_v3: family mla") and result.stdout.count("\n") == 1
    assert result.stderr == ""


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["check"], "the following arguments are required: spec (see `mlagen check --help`)"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (
            ["inspect", "specs/tiny_mla.yaml", "--batch", "0"],
            "argument --batch: '0': give a whole number >= 1",
        ),
        (["tune", "specs/tiny_mla.yaml", "--workers", "two"], "'two': give a whole number >= 1"),
        (["run", "specs/tiny_mla.yaml", "--device", "tpu"], "'tpu': use cpu, cuda or cuda:N"),
        (["check", "a.yaml", "extra\nline"], "unrecognized arguments: extra\\nline"),
    ],
    ids=["missing_spec", "unknown_command", "batch_zero", "workers_word", "device_tpu", "newline_argument"],
)
def test_usage_mistake_is_one_error_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    captured = capsys.readouterr()
    assert (exit.value.code, captured.out) == (2, "")
    assert_one_error_line(captured.err)
    assert expected in captured.err


def test_path_with_a_line_break_is_one_error_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "check", str(tmp_path / "two\nlines.yaml"))
    assert code == 2
    assert_one_error_line(err)
    assert "two\\nlines.yaml: no such file" in err


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_check_dev_zero_returns_at_once():
    result = mlagen_process("check", "/dev/zero")
    assert result.returncode == 2
    assert_one_error_line(result.stderr)
    assert "/dev/zero: is not a regular file" in result.stderr


SHADOWING_SPEC = (
    "name: {name}\nfamily: mqa\nd_model: 32\nheads: 2\nhead_dim: 16\nrope:\n  theta: 10000\ndtype: fp32\n"
)


def test_generate_into_an_import_root_refuses_an_installed_module_name(capsys, tmp_path, monkeypatch):
    # `yaml` (PyYAML, a dependency) is installed: ./yaml/ would hide it from `import yaml` here.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yaml_spec.yaml").write_text(SHADOWING_SPEC.format(name="yaml"), encoding="utf-8")
    code, _, err = run_cli(capsys, "generate", "yaml_spec.yaml", "--out", ".")
    assert code == 2
    assert_one_error_line(err)
    assert "yaml_spec.yaml:1: name: 'yaml' is also an installed module" in err and "--out generated" in err
    assert not (tmp_path / "yaml").exists()

    # In a subfolder it is only generated.yaml, which hides nothing.
    assert run_cli(capsys, "generate", "yaml_spec.yaml", "--out", "generated")[0] == 0
    assert (tmp_path / "generated" / "yaml" / "module.py").is_file()


def test_generate_into_an_import_root_accepts_its_own_earlier_package(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SHADOWING_SPEC.format(name="my_attention"), encoding="utf-8")
    assert run_cli(capsys, "generate", "spec.yaml", "--out", ".")[0] == 0
    code, out, _ = run_cli(capsys, "generate", "spec.yaml", "--out", ".")
    assert code == 0 and out.strip() == "my_attention: unchanged"


def test_graphviz_failure_is_one_error_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "false")  # a `dot` that always fails
    code, out, err = run_cli(capsys, "graph", "specs/tiny_mla.yaml", "-o", str(tmp_path / "g.dot"))
    assert code == 2
    assert_one_error_line(err)
    assert "graphviz could not write" in err and (tmp_path / "g.dot").is_file()
