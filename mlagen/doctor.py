"""`mlagen doctor`: the facts a bug report needs, in a few lines."""

from __future__ import annotations

import os
import platform

import torch
import triton

import mlagen
from mlagen.aot import CUOBJDUMP
from mlagen.runtime import tuning_cache


def _gpus() -> list[tuple[str, str]]:
    """(name, "sm_XY") of each visible CUDA device."""
    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        found.append((torch.cuda.get_device_name(index), f"sm_{major}{minor}"))
    return found


def report() -> list[str]:
    gpus = _gpus()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    lines = [
        f"mlagen {mlagen.__version__}, python {platform.python_version()}",
        f"torch {torch.__version__} ({build}), triton {triton.__version__}",
    ]
    if gpus:
        lines += [f"GPU {i}: {name} ({arch})" for i, (name, arch) in enumerate(gpus)]
    else:
        lines.append(
            "GPU: no GPU (kernels run on CPU under the Triton interpreter, or the plain-torch reference)"
        )
    interpret = os.environ.get("TRITON_INTERPRET", "")
    lines.append(
        f"interpreter: TRITON_INTERPRET={interpret or '(unset)'}: "
        + (
            "on, kernels run on CPU tensors"
            if interpret not in ("", "0")
            else "off, kernels need CUDA tensors"
        )
    )
    lines.append(f"tuning cache: {_cache_state(gpus)}")
    aot = "found" if CUOBJDUMP.exists() else "missing (mlagen inspect needs triton's bundled cuobjdump)"
    lines.append(f"AOT compile (sm_80 to sm_120, no GPU needed): cuobjdump {aot}")
    return lines


def _cache_state(gpus: list[tuple[str, str]]) -> str:
    """One line on the tuning cache. read_file never raises on what the file holds, so a
    corrupt cache is a finding of the report, not a crash of it."""
    path = tuning_cache.cache_path()
    entries, problem = tuning_cache.read_file(path)
    if not path.exists():
        return f"{path}: none yet (`mlagen tune` writes it)"
    if problem and not entries:
        remedy = (
            "the next `mlagen tune` replaces it"
            if path.is_file()
            else "remove it: `mlagen tune` cannot write there"
        )
        return f"{path}: {problem} (ignored; {remedy})"
    targets = {name for name, _ in gpus} | {arch for _, arch in gpus}
    usable = sum(
        1 for e in entries.values() if e.get("triton") == triton.__version__ and e.get("gpu") in targets
    )
    where = "this GPU" if gpus else "a GPU here"
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    state = f"{path}: {count}, {usable} for {where} and triton {triton.__version__}"
    return (
        f"{state}; {problem} (ignored until the next `mlagen tune` rewrites the file)" if problem else state
    )
