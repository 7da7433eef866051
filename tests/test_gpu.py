"""bf16 on a GPU (the interpreter cannot run bf16 dots): the generated kernels forward,
backward and decode against the fp64 reference by the error-ratio rule. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from mlagen.runtime import reference
from tests.helpers import assert_close_to_golden, generated
from tests.test_attention_kernel import CASES, _operands

pytestmark = pytest.mark.gpu
ATOL = 2e-2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bf16_forward_and_backward_on_gpu(case):
    _, operands = _operands(case, torch.float32)
    entry = next(iter(generated(case.package).ATTENTION.values()))
    options = dict(scale=0.3, causal=case.causal, window=case.window, group_mask=case.group_mask)
    grad_out = torch.randn(*operands[0].shape[:3], operands[4].shape[-1], device="cuda")

    def run(fn, dtype):
        leaves = [None if t is None else t.detach().to("cuda", dtype).requires_grad_(True) for t in operands]
        out = fn(*leaves, **options)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves if t is not None]

    for k, e, g in zip(run(entry, torch.bfloat16), run(reference.attention, torch.bfloat16),
                       run(reference.attention, torch.float64), strict=True):
        assert_close_to_golden(k.cpu(), e.cpu(), g.cpu(), atol=ATOL, what=f"{case.id} bf16")


@pytest.mark.parametrize("name", ["tiny_mla", "deepseek_v3"])
def test_bf16_prefill_then_decode_on_gpu(name):
    torch.manual_seed(0)
    attn = generated(name).Attention(dtype=torch.bfloat16, device="cuda")
    d_model = attn.o_proj.out_features
    x = torch.randn(2, 24, d_model, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        golden = attn.double().reference_forward(x.double())
        attn = attn.bfloat16()
        eager = attn.reference_forward(x)
        cache = attn.new_cache(2, 32)
        steps = [attn(x[:, :16], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(16, 24)]
    assert_close_to_golden(torch.cat(steps, 1).cpu(), eager.cpu(), golden.cpu(), atol=ATOL, what=f"{name} decode")
