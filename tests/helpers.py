"""Shared test helpers: loading generated modules and the error-ratio rule."""

from __future__ import annotations

import importlib

import torch

from tests.conftest import ROOT, SPECS  # noqa: F401

# The compressed family (DeepSeek-V4) counts its windows from each sequence's first token, so
# it refuses the arbitrary positions the generic module tests feed every tiny spec, and its
# indexer takes no gradient: tests/test_compressed*.py check the same properties for it.
TINY_SPECS = sorted(p.stem for p in SPECS.glob("tiny_*.yaml") if not p.stem.startswith("tiny_compressed_"))


def generated(name: str):
    """The committed generated package for a shipped spec."""
    return importlib.import_module(f"generated.{name}")


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_golden(actual: torch.Tensor, eager: torch.Tensor, golden: torch.Tensor, *,
                           atol: float, ratio: float = 2.0, what: str = "") -> tuple[float, float]:
    """DEVELOPERS.md rule: a low-precision result passes when its error against the fp64
    golden is at most `ratio` x eager's error in the same dtype, plus a small atol."""
    kernel_error = max_error(actual, golden)
    eager_error = max_error(eager, golden)
    assert kernel_error <= ratio * eager_error + atol, (
        f"{what}: error {kernel_error:.3g} vs golden exceeds {ratio} x eager's {eager_error:.3g} + {atol:g}")
    return kernel_error, eager_error
