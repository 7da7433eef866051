"""Hostile and mistaken input to the spec parser (issue 14) that the one-file-per-case corpus in
tests/malformed/ cannot hold: files that are too large, not files at all, and number forms that
must read the same as they would in any other YAML tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlagen.errors import SpecError
from mlagen.spec import load_spec, parse_spec
from mlagen.spec import parse as spec_parse

ROOT = Path(__file__).resolve().parent.parent

GQA = """\
name: case
family: gqa
d_model: 64
heads: {heads}
kv_heads: 2
head_dim: 16
rope:
  theta: {theta}
causal: true
dtype: fp32
"""
MLA = (ROOT / "specs" / "tiny_mla.yaml").read_text(encoding="utf-8")


def gqa(heads: str = "4", theta: str = "10000") -> str:
    return GQA.format(heads=heads, theta=theta)


def rejection(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "case.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("case.yaml"), message
    return message


# --- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads, theta, expected",
    [
        ("4", "10000", (4, 10000.0)),
        ("+4", "1e4", (4, 10000.0)),
        ("4", "1.0e+4", (4, 10000.0)),
        ("4", ".1e5", (4, 10000.0)),
        ("4", "10000.", (4, 10000.0)),
    ],
)
def test_plain_decimals_read_as_written(heads, theta, expected):
    spec = parse_spec(gqa(heads, theta))
    assert (spec.heads, spec.rope.theta) == expected


@pytest.mark.parametrize(
    "heads, expected",
    [
        ("010", "write 10 (or 8) without a leading zero"),  # YAML 1.1 (PyYAML) would read 8
        ("0x4", "0x4 is hexadecimal; write 4 in decimal"),
        ("0o4", "0o4 is octal; write 4 in decimal"),  # YAML 1.2's octal, text to YAML 1.1
        ("0b100", "0b100 is binary; write 4 in decimal"),
        ("1:04", "1:04 is base 60 in YAML 1.1 (it reads as 64)"),
        ("1_6", "write 16 without underscores"),
        ("!!int 8.5", "'8.5' is not an integer"),
        ("!!int", "'' is not an integer"),  # PyYAML's own constructor raises IndexError here
        ("1" + "0" * 5000, "5001-digit integer"),  # int() refuses over 4300 digits
        ("0" + "7" * 5000, "is not an integer"),
    ],
    ids=[
        "octal",
        "hex",
        "octal_0o",
        "binary",
        "base60",
        "underscore",
        "tag_fraction",
        "tag_empty",
        "5001_digits",
        "5001_octal_digits",
    ],
)
def test_integer_in_another_notation_is_refused_with_the_decimal_to_write(heads, expected):
    message = rejection(gqa(heads=heads))
    assert message.startswith("case.yaml:4: heads: "), message
    assert expected in message
    assert len(message) < 200, "the value is echoed in full"


@pytest.mark.parametrize(
    "theta, expected",
    [
        ("!!float abc", "'abc' is not a number"),
        ("!!float", "'' is not a number"),
        ("10_000.0", "write 10000.0 without underscores"),
        ("2:46:40", "it reads as 10000"),
        ("'1e4'", "write 1e4 without quotes"),
        (".nan", "got NaN"),
        (".inf", "must be at most 1e+12"),
    ],
)
def test_float_in_another_notation_is_refused(theta, expected):
    message = rejection(gqa(theta=theta))
    assert message.startswith("case.yaml:8: rope.theta: "), message
    assert expected in message


@pytest.mark.parametrize("text", ["!!bool maybe", "!!bool 1", "!!null false", "!!seq true", "!!map [true]"])
def test_explicit_tag_that_does_not_fit_is_one_line_at_its_field(text):
    message = rejection(gqa().replace("causal: true", f"causal: {text}"))
    assert message.startswith("case.yaml:9: causal: "), message


@pytest.mark.parametrize("word, value", [("true", True), ("false", False), ("yes", True), ("off", False)])
def test_yaml_booleans_still_read(word, value):
    assert parse_spec(gqa().replace("causal: true", f"causal: {word}")).causal is value


# --- values that would compute NaN ----------------------------------------------------------------


@pytest.mark.parametrize("eps", ["0", "0.0", "-1e-6", "1e-50"])
def test_norm_eps_that_is_zero_in_fp32_is_refused(eps):
    message = rejection(MLA.replace("norm_eps: 1e-6", f"norm_eps: {eps}"))
    assert "norm_eps" in message and "NaN" in message


def test_a_tiny_positive_norm_eps_is_accepted():
    assert parse_spec(MLA.replace("norm_eps: 1e-6", "norm_eps: 1e-12")).norm_eps == 1e-12


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["json", "typing", "random", "mlagen"])
def test_name_that_would_hide_a_module_is_refused(name):
    message = rejection(gqa().replace("name: case", f"name: {name}"))
    assert message.startswith("case.yaml:1: name: ") and f"{name}_attn" in message


def test_file_stem_that_would_hide_a_module_is_refused(tmp_path):
    path = tmp_path / "json.yaml"
    path.write_text(gqa().replace("name: case\n", ""), encoding="utf-8")
    with pytest.raises(SpecError, match="'json' from the file name .* standard-library module"):
        load_spec(path)


def test_every_shipped_spec_still_loads():
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    assert len(specs) >= 10
    for path in specs:
        assert load_spec(path).name == path.stem


# --- syntax errors point at the mistake -----------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, line, expected",
    [
        ("d_model: 64", "d_model 64", 3, "no ':' after its key"),
        ("  theta: 10000", "  theta 10000\n  layout: half", 8, "no ':' after its key"),
        ("heads: 4", "heads: [4,\n  8", 4, "the '[' on this line is not closed"),
        ("rope:\n  theta: 10000", "rope: {theta: 10000", 7, "the '{' on this line is not closed"),
        ("  theta: 10000", "\ttheta: 10000", 8, "indent with spaces, not tabs"),
    ],
    ids=["missing_colon", "missing_colon_nested", "unclosed_list", "unclosed_mapping", "tab"],
)
def test_syntax_error_names_the_line_of_the_mistake(old, new, line, expected):
    # PyYAML notices each of these a line later, where it gives up.
    message = rejection(gqa().replace(old, new))
    assert message.startswith(f"case.yaml:{line}: YAML syntax error: "), message
    assert expected in message


# --- files that are not specs ---------------------------------------------------------------------


def test_file_over_the_size_cap_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(gqa().encode() + b"#" * spec_parse.MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match=r"big.yaml: is larger than 64 KiB"):
        load_spec(path)
    with pytest.raises(SpecError, match="is larger than"):
        parse_spec(path.read_text(encoding="utf-8"), str(path))


def test_file_of_exactly_the_cap_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_parse, "MAX_SPEC_BYTES", 1024)
    text = gqa()
    path = tmp_path / "case.yaml"
    path.write_text(text + "#" * (1023 - len(text)) + "\n", encoding="utf-8")
    assert load_spec(path).name == "case"
    path.write_text(text + "#" * (1024 - len(text)) + "\n", encoding="utf-8")
    with pytest.raises(SpecError, match="larger than 1 KiB"):
        load_spec(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


_LOAD = "import sys; from mlagen.spec import load_spec; load_spec(sys.argv[1])"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_endless_or_blocking_file_is_refused_at_once(tmp_path, kind):
    # In a subprocess with a time limit: a regression would read forever or block in open().
    path = "/dev/zero"
    if kind == "fifo":
        path = str(tmp_path / "spec.yaml")
        os.mkfifo(path)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, path], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"SpecError: {path}: is not a regular file (a device, pipe or socket); give a .yaml spec file"
    )
