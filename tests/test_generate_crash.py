"""A generate killed at any step of its package swap: `import` still finds the old or the new
package (never none, where the atomic exchange exists), and the next generate clears up.

Each case runs the writer in a subprocess that dies with os._exit at one step, as a kill
would stop it: no finally blocks, no lock released by hand.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlagen.codegen import emit
from mlagen.errors import GenerateError
from tests.test_generate import leftovers, snapshot

ROOT = Path(__file__).resolve().parent.parent
CRASHED = 17  # the writer's exit status when it died where the case asked
OLD = {"__init__.py": "from .version import VERSION\n", "version.py": "VERSION = 'old'\n"}
NEW = {"__init__.py": "from .version import VERSION\n", "version.py": "VERSION = 'new'\n", "extra.py": "\n"}

WRITER = """
import json, os, shutil, sys
from pathlib import Path
from mlagen.codegen import emit

package, step, files, crashed = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
real_rename, real_exchange = os.rename, emit._exchange


def die():
    os._exit(crashed)


def rename_then_die_after(name_part):
    def rename(src, dst):
        real_rename(src, dst)
        if name_part in Path(src).name + Path(dst).name:
            die()
    return rename


def remove_one_file_then_die(path, ignore_errors=False):
    next(p for p in Path(path).iterdir() if p.is_file()).unlink()
    die()


def exchange_then_die(first, second):
    assert real_exchange(first, second), "no atomic exchange here"
    die()


if step.startswith("fallback"):
    emit._exchange = lambda first, second: False
if step == "staged":
    emit._swap_in = lambda staging, package_dir: die()
elif step == "exchanged":
    emit._exchange = exchange_then_die
elif step in ("removing-old", "fallback-removing-old"):
    shutil.rmtree = remove_one_file_then_die
elif step == "fallback-retired-old":
    os.rename = rename_then_die_after(".old-")  # the old package renamed away, the new one not yet in
elif step == "fallback-moved-new-in":
    os.rename = rename_then_die_after(".new-")
emit.write_package(files, package)
"""

# step -> what `import` finds after a writer died there (None: no package).
STEPS = {
    "staged": "old",
    "exchanged": "new",
    "removing-old": "new",
    "fallback-moved-new-in": "new",
    "fallback-removing-old": "new",
    # Without an atomic exchange there is one window with no package; the next generate
    # puts the old one back before it writes.
    "fallback-retired-old": None,
}


def imported_version(root: Path) -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import pkg; print(pkg.VERSION)"], cwd=root, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.fixture
def exchange_works(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    if not emit._exchange(first, second):
        pytest.skip("no atomic directory exchange on this system or filesystem")


@pytest.mark.parametrize("step", STEPS)
def test_a_writer_killed_at_each_step_leaves_a_package_and_the_next_generate_clears_up(
    tmp_path, step, request
):
    if not step.startswith("fallback"):
        request.getfixturevalue("exchange_works")
    root = tmp_path / "out"
    package = root / "pkg"
    emit.write_package(OLD, package)
    assert imported_version(root) == "old"

    writer = subprocess.run(
        [sys.executable, "-c", WRITER, str(package), step, json.dumps(NEW), str(CRASHED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert writer.returncode == CRASHED, writer.stderr

    found = STEPS[step]
    assert imported_version(root) == found
    if found is not None:
        assert snapshot(package) == {
            name: text.encode() for name, text in (OLD if found == "old" else NEW).items()
        }
    assert leftovers(root, "pkg"), "the crash should have left a staged or retired directory"

    emit.write_package(NEW, package)
    assert leftovers(root, "pkg") == []
    assert snapshot(package) == {name: text.encode() for name, text in NEW.items()}
    assert imported_version(root) == "new"


def test_an_existing_package_is_replaced_by_one_exchange(tmp_path, monkeypatch, exchange_works):
    """No rename, so no instant without a package: the exchange alone moves the new one in."""
    package = tmp_path / "out" / "pkg"
    emit.write_package(OLD, package)

    def rename(src, dst):
        raise AssertionError(f"renamed {src} -> {dst}: the package would be missing in between")

    monkeypatch.setattr(os, "rename", rename)
    assert emit.write_package(NEW, package) == ["extra.py", "version.py"]
    assert snapshot(package) == {name: text.encode() for name, text in NEW.items()}
    assert leftovers(package.parent, "pkg") == []


@pytest.mark.parametrize("error", ["EINVAL", "ENOSYS"])
def test_an_unsupported_exchange_falls_back_to_two_renames(tmp_path, monkeypatch, error):
    """EINVAL (a filesystem without RENAME_EXCHANGE) or ENOSYS (a kernel without renameat2)
    is not an error: the swap takes two renames instead."""
    package = tmp_path / "out" / "pkg"
    emit.write_package(OLD, package)

    def renameat2(*args):
        ctypes.set_errno(getattr(errno, error))
        return -1

    monkeypatch.setattr(emit, "_RENAMEAT2", renameat2)
    assert emit.write_package(NEW, package) == ["extra.py", "version.py"]
    assert snapshot(package) == {name: text.encode() for name, text in NEW.items()}
    assert leftovers(package.parent, "pkg") == []


def test_another_exchange_error_is_reported(tmp_path, monkeypatch):
    package = tmp_path / "out" / "pkg"
    emit.write_package(OLD, package)

    def renameat2(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(emit, "_RENAMEAT2", renameat2)
    with pytest.raises(GenerateError, match="Permission denied"):
        emit.write_package(NEW, package)
    assert snapshot(package) == {name: text.encode() for name, text in OLD.items()}
    assert leftovers(package.parent, "pkg") == []
