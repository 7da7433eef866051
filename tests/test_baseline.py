"""The Triton-tutorial-style baseline (mlagen.bench.baseline) computes attention: forward and
backward under the interpreter in fp16 against the fp64 golden, by the error-ratio rule.
Its static reading (ANCHORS.md's 65 / 261) is checked in tests/test_inspect.py."""

from __future__ import annotations

import pytest
import torch

from mlagen.bench.baseline import baseline_attention
from tests.helpers import assert_close_to_golden


def _sdpa(q, k, v, causal, sm_scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_baseline_forward_and_backward_match_the_golden_in_fp16(causal):
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))  # two 128-row blocks: diagonal and off it
    grad_out = torch.randn(1, 2, 256, 64)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, causal, 0.125)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves]

    golden, eager = run(_sdpa, torch.float64), run(_sdpa, torch.float16)
    for what, kernel, e, g in zip(
        ("out", "dq", "dk", "dv"), run(baseline_attention, torch.float16), eager, golden, strict=True
    ):
        assert_close_to_golden(kernel, e, g, atol=1e-3, what=f"baseline {what}")


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((1, 2, 200, 64), torch.float16, "seq_len=200 must be a multiple of 128"),
        ((1, 2, 128, 64), torch.float32, "the baseline runs float16 or bfloat16"),
    ],
    ids=["ragged-length", "fp32"],
)
def test_baseline_refuses_what_it_does_not_run_in_one_line(shape, dtype, message):
    q = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=message) as caught:
        baseline_attention(q, q, q, True, 0.125)
    assert "\n" not in str(caught.value)
