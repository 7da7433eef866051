"""The malformed-spec corpus: every file in tests/malformed/ must be rejected with one clear SpecError.

Each case declares its expectation on its first line:

    # expect: <line> <field> <substring>

<line> is the line the message must name (`-`: not checked), <field> the field path it must
name (`-`: not checked), and <substring> a fragment the message must contain (case-insensitive).
Cases under tests/malformed/dos/ could hang or exhaust memory if the parser regresses, so they
run in a subprocess with a time limit.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
try:
    import mlagen.spec  # noqa: F401
except ModuleNotFoundError:  # running from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from mlagen.errors import SpecError  # noqa: E402
from mlagen.spec.parse import load_spec  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "malformed"
CASES = sorted(CORPUS.glob("*.yaml"))
DOS_CASES = sorted((CORPUS / "dos").glob("*.yaml"))
PWNED = Path("/tmp/mlagen_pwned")  # what the os.system tag cases would create if executed
DOS_TIMEOUT_S = 10


@dataclass(frozen=True)
class Expect:
    line: int | None
    field: str | None
    substring: str


def read_expect(path: Path) -> Expect:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    prefix = "# expect: "
    assert first.startswith(prefix), f"{path.name}: first line must be '{prefix}<line> <field> <substring>'"
    parts = first[len(prefix):].split(" ", 2)
    assert len(parts) == 3 and parts[2].strip(), f"{path.name}: bad expect line {first!r}"
    line, field, substring = parts
    return Expect(None if line == "-" else int(line), None if field == "-" else field, substring.strip().lower())


def rejection(path: Path) -> SpecError:
    """Load the case; return its SpecError, failing the test on success or on any other exception."""
    try:
        spec = load_spec(path)
    except SpecError as err:
        return err
    except BaseException as exc:  # noqa: BLE001 - any other exception type is the bug under test
        pytest.fail(f"{path.name}: {type(exc).__name__} escaped instead of SpecError: {exc!r}\n"
                    + "".join(traceback.format_exception(exc)[-6:]), pytrace=False)
    pytest.fail(f"{path.name}: accepted as a valid spec: {spec!r}", pytrace=False)


def check_message(path: Path, message: str, expect: Expect) -> None:
    assert "\n" not in message and "\r" not in message, f"message is not one line: {message!r}"
    assert message.startswith(f"{path}:"), f"message does not start with the file path: {message!r}"
    if expect.line is not None:
        assert message.startswith(f"{path}:{expect.line}: "), f"expected line {expect.line}: {message!r}"
    if expect.field is not None:
        assert f": {expect.field}: " in message, f"expected field {expect.field!r}: {message!r}"
    assert expect.substring in message.lower(), f"expected {expect.substring!r} in: {message!r}"


def test_corpus_is_large_enough():
    assert len(CASES) >= 45, f"only {len(CASES)} malformed cases"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_expect_line_is_well_formed(path):
    read_expect(path)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_spec_is_rejected(path):
    expect = read_expect(path)
    PWNED.unlink(missing_ok=True)
    try:
        err = rejection(path)
        check_message(path, str(err), expect)
    finally:
        executed = PWNED.exists()
        PWNED.unlink(missing_ok=True)
    assert not executed, f"{path.name}: loading the spec ran code (created {PWNED})"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_message_has_no_traceback(path):
    err = rejection(path)
    for text in (str(err), err.message):
        assert "traceback" not in text.lower(), f"traceback text in message: {text!r}"
        assert 'file "' not in text.lower(), f"python frame in message: {text!r}"


def test_tag_cases_exist_and_would_touch_the_marker():
    """The code-execution cases really try to create PWNED, so the check above is meaningful."""
    tagged = [p for p in CASES if "mlagen_pwned" in p.read_text(encoding="utf-8", errors="replace")]
    assert len(tagged) >= 3, [p.name for p in tagged]


_DOS_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from mlagen.errors import SpecError
from mlagen.spec.parse import load_spec
try:
    load_spec(sys.argv[1])
except SpecError as err:
    print("SPECERROR", str(err))
else:
    print("ACCEPTED")
"""


@pytest.mark.parametrize("path", DOS_CASES, ids=[p.stem for p in DOS_CASES])
def test_resource_exhaustion_case_is_rejected_quickly(path):
    expect = read_expect(path)
    try:
        proc = subprocess.run([sys.executable, "-c", _DOS_SCRIPT, str(path), str(ROOT)], capture_output=True,
                              text=True, timeout=DOS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name}: parser still running after {DOS_TIMEOUT_S}s (unbounded expansion)",
                    pytrace=False)
    out = proc.stdout.strip()
    assert proc.returncode == 0 and out.startswith("SPECERROR "), (
        f"{path.name}: rc={proc.returncode} stdout={out[-500:]!r} stderr={proc.stderr[-1500:]!r}")
    check_message(path, out[len("SPECERROR "):], expect)


def test_cli_rejects_the_whole_corpus_with_exit_2_and_writes_nothing(tmp_path, capsys):
    # `generate` validates every named spec before writing any package, so a bad spec
    # next to a good one leaves the output directory untouched.
    from mlagen.cli import main

    good = str(Path(__file__).resolve().parent.parent / "specs" / "tiny_gqa.yaml")
    out = tmp_path / "generated"
    for path in CASES:
        for command in (["check", str(path)], ["generate", good, str(path), "--out", str(out)]):
            assert main(command) == 2, f"{path.stem}: {command[0]}"
            err = capsys.readouterr().err.strip()
            assert err.startswith("mlagen: error: ") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()
