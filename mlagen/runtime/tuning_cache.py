"""The per-user autotuning cache that `mlagen tune` writes and the generated launchers read.

One JSON file, $MLAGEN_CACHE_DIR/tuning.json (default ~/.cache/mlagen/tuning.json):

    {"format": 1, "entries": {KEY: {"kernel": ..., "config": {"block_m": ..., ...}, "ms": ..., ...}}}

KEY = kernel source hash | shape bucket | dtype | GPU | Triton version, so an entry
never outlives the kernel text, the Triton that compiled it or the GPU it was timed
on. Shapes are bucketed to powers of two (batch, sequence lengths, heads) and keep
the flags that change the compiled code (head group, causal, window, group mask).

The file is read once per process; a launch costs one dict lookup after its first
call. Every launcher on a GPU reads it, so nothing in it may break a launch: a file
that cannot be read as this format (unreadable, a directory, not UTF-8, not JSON,
nested too deeply, numbers too long to convert, another format) is reported in one
warning and ignored, and so are the entries whose config is out of shape (block
sizes and warps powers of two within what Triton compiles, stages and splits in
range, ms finite), while the well-formed entries beside them are used.

Writers (`mlagen tune`, `tune --static --write`) merge under a file lock and replace
the file atomically, so tuning processes that run at once lose nothing and a reader
never sees half a file. Over a corrupt file or corrupt entries a writer says so in
one line on stderr and writes the well-formed entries with its own, replacing the
rest; where the file cannot be replaced (a directory in its place, no permission)
it stops with one line that says what to change.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import reprlib
import sys
import tempfile
import textwrap
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import triton

from mlagen.errors import MlagenError
from mlagen.runtime.launch import BlockConfig, device_arch

FORMAT = 1
LOG_ENV = "MLAGEN_AUTOTUNE_LOG"

_entries: dict[str, BlockConfig] | None = None
_resolved: dict[tuple, BlockConfig | None] = {}
_hashes: dict[tuple, str] = {}
_gpus: dict[int, tuple[str, int]] = {}


def cache_path() -> Path:
    root = os.environ.get("MLAGEN_CACHE_DIR")
    if root:
        return Path(root) / "tuning.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlagen" / "tuning.json"


def bucket(n: int) -> int:
    """The power of two at or above n: shapes in one bucket share a tuned config."""
    return 1 << max(0, int(n) - 1).bit_length()


def attention_key(dims: Any, *, causal: bool, windowed: bool, mask_code: int) -> str:
    """Shape bucket of an attention (forward or backward) launch; `dims` is an AttentionDims."""
    return (
        f"b{bucket(dims.batch)}.q{bucket(dims.seqlen_q)}.k{bucket(dims.seqlen_k)}.h{bucket(dims.heads_q)}"
        f".g{dims.heads_q // dims.heads_k}.c{int(causal)}.w{int(windowed)}.m{mask_code}"
    )


def decode_key(batch: int, seqlen_q: int, heads: int, longest: int, *, causal: bool) -> str:
    """Shape bucket of an absorbed-decode launch: sequences, new tokens, heads, cached tokens."""
    return f"b{bucket(batch)}.q{bucket(seqlen_q)}.h{bucket(heads)}.t{bucket(longest)}.c{int(causal)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_hash(kernels: tuple) -> str:
    """Hash of the kernels' Python source (JIT or interpreted functions alike)."""
    if kernels not in _hashes:
        text = "\n".join(textwrap.dedent(inspect.getsource(kernel.fn)) for kernel in kernels)
        _hashes[kernels] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _hashes[kernels]


def entry_key(source: str, shape: str, dtype: str, gpu: str, triton_version: str | None = None) -> str:
    return "|".join((source, shape, dtype, gpu, triton_version or triton.__version__))


def gpu_identity(device: torch.device) -> tuple[str, int] | None:
    """(GPU name, arch such as 90) of a CUDA device, None for other devices (which never
    look the cache up: the interpreter keeps its small config)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpus:
        _gpus[index] = (torch.cuda.get_device_name(index), device_arch(torch.device("cuda", index)))
    return _gpus[index]


def log_enabled() -> bool:
    return os.environ.get(LOG_ENV, "") not in ("", "0")


def describe(config: BlockConfig) -> str:
    text = f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"
    text += f" dq {config.block_n}x{config.dq_block_n}" if config.dq_block_n else ""
    return text + (f" splits {config.num_splits}" if config.num_splits else "")


# --- reading --------------------------------------------------------------------------------------


def read_file(path: Path) -> tuple[dict[str, dict], str | None]:
    """(entries, problem): the well-formed entries and a one-line problem, or None. A missing
    file has no entries and no problem; one that cannot be read as this format has no entries."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot read it ({exc.strerror})"
    except UnicodeDecodeError as exc:
        return {}, f"corrupt: not UTF-8 text (byte {exc.start})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, f"corrupt JSON at line {exc.lineno}"
    except RecursionError:
        return {}, "corrupt JSON: nested too deeply to read"
    except ValueError:  # the only other one json.loads raises: an integer past sys.get_int_max_str_digits()
        return {}, "corrupt JSON: a number with too many digits to read"
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, "corrupt: no 'entries' table"
    if data.get("format") != FORMAT:
        return {}, f"stale: format {reprlib.repr(data.get('format'))}, this mlagen reads format {FORMAT}"
    entries, dropped = {}, []
    for key, entry in data["entries"].items():
        try:
            _config(entry)
        except ValueError as exc:
            dropped.append(f"{reprlib.repr(key)}: {exc}")
        else:
            entries[key] = entry
    if not dropped:
        return entries, None
    count = f"{len(dropped)} corrupt entr{'y' if len(dropped) == 1 else 'ies'}"
    return entries, f"{count} ({dropped[0]}{', ...' if len(dropped) > 1 else ''})"


def _powers_of_two(low: int, high: int) -> frozenset[int]:
    return frozenset(1 << p for p in range(low.bit_length() - 1, high.bit_length()))


# What a config read from the file may hold, so that a launch never hands Triton a tile it
# cannot build: tiles from the tensor-core step (tl.dot needs 16) to 256, at most 32 warps
# (1024 threads). Wider than any config `mlagen tune` proposes, for hand-edited entries.
CONFIG_RULES: dict[str, tuple[frozenset[int] | range, str]] = {
    "block_m": (_powers_of_two(16, 256), "a power of two from 16 to 256"),
    "block_n": (_powers_of_two(16, 256), "a power of two from 16 to 256"),
    "num_warps": (_powers_of_two(1, 32), "a power of two from 1 to 32"),
    "num_stages": (range(1, 9), "from 1 to 8"),
    "num_splits": (range(1, 257), "from 1 to 256, or null"),
    "dq_block_n": (_powers_of_two(16, 256), "a power of two from 16 to 256, or null"),
}
OPTIONAL_FIELDS = ("num_splits", "dq_block_n")  # null or absent: the launcher chooses
TEXT_FIELDS = ("kernel", "source_hash", "shape", "dtype", "gpu", "triton", "method")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config(entry: Any) -> BlockConfig:
    """The config of a cache entry; ValueError (one line naming the field) when the entry
    is out of shape."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError("no 'config' table")
    fields = entry["config"]
    for name, (allowed, rule) in CONFIG_RULES.items():
        value = fields.get(name)
        if name in OPTIONAL_FIELDS and value is None:
            continue
        if not (_is_int(value) and value in allowed):
            raise ValueError(f"{name}={reprlib.repr(value)} is not {rule}")
    ms = entry.get("ms")
    # Comparing, not math.isfinite: that would overflow on a huge integer.
    if ms is not None and not ((_is_int(ms) or isinstance(ms, float)) and 0 <= ms < math.inf):
        raise ValueError(f"ms={reprlib.repr(ms)} is not a finite time")
    for name in TEXT_FIELDS:
        if not isinstance(entry.get(name, ""), str):
            raise ValueError(f"{name}={reprlib.repr(entry[name])} is not a string")
    return BlockConfig(
        **{name: fields[name] for name in ("block_m", "block_n", "num_warps", "num_stages")},
        num_splits=fields.get("num_splits"),
        dq_block_n=fields.get("dq_block_n"),
    )


def entries() -> dict[str, BlockConfig]:
    """The cache's well-formed configs by key, read once per process."""
    global _entries
    if _entries is None:
        path = cache_path()
        raw, problem = read_file(path)
        # Kept before warning, so that a warning turned into an error fails one call, not every launch.
        _entries = {key: _config(entry) for key, entry in raw.items()}
        if problem:
            part = "part of " if raw else ""
            warnings.warn(f"mlagen: ignoring {part}the tuning cache {path}: {problem}", stacklevel=2)
    return _entries


def reset() -> None:
    """Forget what this process read (after the cache file or MLAGEN_CACHE_DIR changed)."""
    global _entries
    _entries = None
    _resolved.clear()


def tuned_config(kernels: tuple, shape: str, like: torch.Tensor) -> BlockConfig | None:
    """The cached config for `kernels` at this shape bucket, like's dtype and GPU; None
    when there is none (the launcher then takes the static default)."""
    memo = (kernels, shape, like.dtype, like.device)
    if memo in _resolved:
        return _resolved[memo]
    gpu = gpu_identity(like.device)
    config = None
    if gpu is not None:
        name, arch = gpu
        source = source_hash(kernels)
        # A timed entry for this GPU first, then a static ranking (`tune --static --write`) for its arch.
        for where in (name, f"sm_{arch}"):
            config = entries().get(entry_key(source, shape, dtype_name(like.dtype), where))
            if config is not None:
                break
        if log_enabled():
            choice = (
                f"tuned {describe(config)} (from {where})" if config else "no tuned entry, static default"
            )
            print(
                f"mlagen autotune: {kernels[0].__name__} [{shape}, {dtype_name(like.dtype)}] on {name}: "
                f"{choice}",
                file=sys.stderr,
            )
    _resolved[memo] = config
    return config


# --- writing --------------------------------------------------------------------------------------


def new_entry(
    kernels: tuple,
    shape: str,
    dtype: torch.dtype,
    gpu: str,
    arch: int,
    config: BlockConfig,
    *,
    ms: float | None,
    method: str,
) -> tuple[str, dict]:
    """(key, entry) for store(); `gpu` is the device name, or "sm_90" for a static ranking."""
    source = source_hash(kernels)
    entry = {
        "kernel": kernels[0].__name__,
        "source_hash": source,
        "shape": shape,
        "dtype": dtype_name(dtype),
        "gpu": gpu,
        "arch": arch,
        "triton": triton.__version__,
        "config": asdict(config),
        "ms": ms,
        "method": method,
    }
    return entry_key(source, shape, dtype_name(dtype), gpu), entry


def check_writable(path: Path | None = None) -> Path:
    """The cache path, once it is clear a write could replace what is there (MlagenError
    otherwise), so that tuning stops before its work rather than after it."""
    path = path or cache_path()
    if path.exists() and not path.is_file():
        raise MlagenError(
            f"cannot write the tuning cache {path}: it is not a file; remove it or set MLAGEN_CACHE_DIR"
        )
    return path


def store(new: dict[str, dict], path: Path | None = None) -> Path:
    """Merge `new` into the cache file: under its lock, re-read what other processes wrote,
    then replace the file atomically (a temp file in the same directory + os.replace). What
    cannot be read is replaced, after one line on stderr; a file that cannot be replaced
    raises MlagenError."""
    from filelock import FileLock, Timeout

    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            current, problem = read_file(path)
            if problem:
                print(f"mlagen: replacing the tuning cache {path}: {problem}", file=sys.stderr)
            merged = {**current, **new}
            handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump({"format": FORMAT, "entries": merged}, out, indent=1, sort_keys=True)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise MlagenError(f"cannot write the tuning cache {path}: {exc.strerror or exc}") from None
    except Timeout:
        raise MlagenError(f"another process holds the lock of the tuning cache {path}; retry") from None
    reset()
    return path
