"""The machine a benchmark runs on, and its roofline when the GPU is a known one.

Peaks are the vendors' spec-sheet numbers (dense tensor-core FLOPs, HBM bandwidth),
as in ANCHORS.md: roofline fraction = max(bytes / bandwidth, flops / peak) / time.
An unknown GPU, or a dtype without a listed peak, gets no fraction rather than a guess.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class GpuPeak:
    name: str
    needles: tuple[str, ...]  # all must appear in torch.cuda.get_device_name()
    excludes: tuple[str, ...]
    bandwidth: float  # bytes / s
    flops: dict[str, float]  # dtype -> dense tensor FLOP / s

    def matches(self, device_name: str) -> bool:
        return all(n in device_name for n in self.needles) and not any(
            x in device_name for x in self.excludes
        )

    def peak(self, dtype: str) -> float | None:
        return self.flops.get(dtype)

    def ideal_seconds(self, flops: float, nbytes: float, dtype: str) -> float | None:
        peak = self.peak(dtype)
        if peak is None:
            return None
        return max(nbytes / self.bandwidth, flops / peak)


_HOPPER = {"bf16": 989e12, "fp16": 989e12}
_AMPERE = {"bf16": 312e12, "fp16": 312e12}

# First match wins: the more specific names come first.
KNOWN_GPUS: tuple[GpuPeak, ...] = (
    GpuPeak("H200", ("H200",), (), 4.8e12, _HOPPER),
    GpuPeak("H100 PCIe", ("H100", "PCIe"), (), 2.0e12, {"bf16": 756e12, "fp16": 756e12}),
    GpuPeak("H100 SXM", ("H100",), ("NVL",), 3.35e12, _HOPPER),
    GpuPeak("A100 SXM 80GB", ("A100", "80GB"), ("PCIe",), 2.039e12, _AMPERE),
    GpuPeak("A100 SXM 40GB", ("A100", "40GB"), ("PCIe",), 1.555e12, _AMPERE),
)


def known_gpu(device_name: str) -> GpuPeak | None:
    return next((gpu for gpu in KNOWN_GPUS if gpu.matches(device_name)), None)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    name: str
    capability: str | None
    interpreter: bool  # kernels run under the Triton interpreter (CPU)
    gpu: GpuPeak | None

    @property
    def slug(self) -> str:
        """A file-name-safe device name: "cpu", "nvidia-h100-80gb-hbm3"."""
        return "cpu" if self.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def to_json(self) -> dict:
        roofline = None
        if self.gpu is not None:
            roofline = {
                "gpu": self.gpu.name,
                "bandwidth_gbps": self.gpu.bandwidth / 1e9,
                "peak_tflops": {dtype: peak / 1e12 for dtype, peak in self.gpu.flops.items()},
            }
        return {
            "type": self.type,
            "name": self.name,
            "slug": self.slug,
            "capability": self.capability,
            "interpreter": self.interpreter,
            "roofline": roofline,
        }


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        return DeviceInfo("cuda", name, f"{major}.{minor}", False, known_gpu(name))
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo("cpu", f"{name} (Triton interpreter)", None, True, None)
