"""The kernels generated for every shipped spec, at their real head dims (MLA's 128 + 64
and 128, Llama's 128, the latent specs' 128), forward and backward against the fp64
reference with few heads and short sequences so the interpreter stays quick."""

from __future__ import annotations

import pytest
import torch

from mlagen.runtime import reference
from tests.helpers import SPECS, assert_close_to_golden, generated

SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml") if not p.stem.startswith("tiny_"))
# One spec per kernel name: a name fixes the kernel's template parameters.
UNIQUE = sorted({name: spec for spec in SHIPPED for name in generated(spec).kernels.HEAD_DIMS}.items())


@pytest.mark.parametrize("kernel, spec", UNIQUE, ids=[name for name, _ in UNIQUE])
def test_shipped_kernel_forward_and_backward_match_the_reference(kernel, spec):
    kernels = generated(spec).kernels
    d_a, d_b, d_v = kernels.HEAD_DIMS[kernel]
    entry = kernels.ATTENTION[kernel]
    torch.manual_seed(0)
    shapes = [(1, 20, 2, d_a), (1, 20, 2, d_b) if d_b else None, (1, 20, 2, d_a),
              (1, 20, 1, d_b) if d_b else None, (1, 20, 2, d_v)]
    operands = [None if s is None else torch.randn(s) for s in shapes]
    options = dict(scale=(d_a + d_b) ** -0.5, causal=True)
    grad_out = torch.randn(1, 20, 2, d_v)

    def run(fn, dtype):
        leaves = [None if t is None else t.detach().to(dtype).clone().requires_grad_(True) for t in operands]
        out = fn(*leaves, **options)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves if t is not None]

    kernel_results = run(entry, torch.float32)
    eager, golden = run(reference.attention, torch.float32), run(reference.attention, torch.float64)
    names = ["out", "dq_a", "dq_b", "dk_a", "dk_b", "dv"] if d_b else ["out", "dq", "dk", "dv"]
    for what, k, e, g in zip(names, kernel_results, eager, golden, strict=True):
        assert_close_to_golden(k, e, g, atol=1e-5, what=f"{kernel} {what}")
