"""`mlagen run`: generate a spec, run its module on random input, and compare it
with the fp64 plain-torch reference, the way a user would check a new spec.

Without a GPU the kernels run under the Triton interpreter, which this sets
up before the generated module is imported (Triton decides at import time).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlagen.errors import MlagenError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class RunReport:
    spec_name: str
    device: str
    dtype: str
    batch: int
    seqlen: int
    kernel_path: bool
    kernel_error: float
    eager_error: float
    seconds: float


def _choose_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MlagenError("--device cuda given but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def run_spec(
    spec_path: str | Path,
    *,
    batch: int = 1,
    seqlen: int = 32,
    dtype: str | None = None,
    device: str | None = None,
    out_root: str | Path = "generated",
    seed: int = 0,
) -> RunReport:
    import mlagen
    from mlagen.spec import load_spec

    spec = load_spec(spec_path)
    target = _choose_device(device)
    if target.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = dtype or ("fp32" if target.type == "cpu" else spec.dtype)
    if target.type == "cpu" and dtype == "bf16":
        raise MlagenError(
            "bf16 kernels cannot run under the Triton interpreter (it multiplies raw bf16 bits); "
            "use --dtype fp32 or fp16 on CPU"
        )
    if batch < 1 or seqlen < 1 or seqlen > spec.max_position:
        raise MlagenError(f"need batch >= 1 and 1 <= seq <= max_position ({spec.max_position})")

    package = mlagen.load(spec_path, out_root)
    torch.manual_seed(seed)
    module = package.Attention(dtype=torch.float64, device=target)
    hidden = torch.randn(batch, seqlen, spec.d_model, dtype=torch.float64, device=target)
    with torch.no_grad():
        golden = module.reference_forward(hidden)
        module = module.to(DTYPES[dtype])
        low = hidden.to(DTYPES[dtype])
        eager = module.reference_forward(low)
        start = time.perf_counter()
        out = module(low)
        seconds = time.perf_counter() - start
    kernel_path = target.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return RunReport(
        spec.name,
        str(target),
        dtype,
        batch,
        seqlen,
        kernel_path,
        (out.double() - golden).abs().max().item(),
        (eager.double() - golden).abs().max().item(),
        seconds,
    )
