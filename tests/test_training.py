"""Training through the generated modules: gradients of every parameter against the
plain-torch reference, gradcheck in fp64, torch.compile(fullgraph=True), torch.export,
and the README's training example.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from tests.helpers import ROOT, TINY_SPECS, assert_close_to_golden, generated, max_error

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _randomized(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A module with every parameter random (norm weights, gates and latents included)."""
    torch.manual_seed(0)
    module = generated(name).Attention(dtype=torch.float64)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param.dim() == 1 else 1.0 / param.shape[-1] ** 0.5))
            if param.dim() == 1:
                param.add_(1.0)
    return module.to(dtype)


def _parameter_grads(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, reference: bool):
    module.zero_grad()
    out = module.reference_forward(x) if reference else module(x)
    out.backward(grad_out.to(out.dtype))
    grads = {}
    for name, param in module.named_parameters():
        if name.startswith("indexer."):  # sparse attention's selection takes no gradient
            assert param.grad is None, f"{name} got a gradient"
            continue
        grads[name] = param.grad.detach().clone()
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", TINY_SPECS)
def test_parameter_gradients_match_the_fp64_reference(name, dtype):
    golden_module = _randomized(name, torch.float64)
    module = copy.deepcopy(golden_module).to(dtype)
    x = torch.randn(2, 21, golden_module.o_proj.out_features, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    golden = _parameter_grads(golden_module, x, grad_out, reference=True)
    eager = _parameter_grads(module, x.to(dtype), grad_out, reference=True)
    kernel = _parameter_grads(module, x.to(dtype), grad_out, reference=False)
    assert golden.keys() == kernel.keys()
    for param in golden:
        assert kernel[param].isfinite().all(), param
        scale = golden[param].abs().max().item()
        assert_close_to_golden(kernel[param] / scale, eager[param] / scale, golden[param] / scale,
                               atol=ATOL[dtype], what=f"{name} {dtype} d{param}")


@pytest.mark.parametrize("name", TINY_SPECS)
def test_fp64_kernel_path_equals_reference_gradients(name):
    # The interpreter runs the kernels in fp64: forward and backward must match the
    # reference to rounding, which checks the backward kernels' math exactly.
    module = _randomized(name, torch.float64)
    x = torch.randn(2, 19, module.o_proj.out_features, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    reference = _parameter_grads(module, x, grad_out, reference=True)
    kernel = _parameter_grads(module, x, grad_out, reference=False)
    for param in reference:
        assert max_error(kernel[param], reference[param]) < 1e-9, param


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_mla", "tiny_gqa", "tiny_hybrid"])
def test_gradcheck_whole_module_in_fp64(name):
    # Norms, rope, projections and the kernels together, in fp64 under the interpreter, in
    # gradcheck's fast mode (random projections of the Jacobian): the full Jacobian of tiny_mla
    # took 78 s of CI's 30 minutes, and test_fp64_kernel_path_equals_reference_gradients
    # already matches every parameter's gradient to the reference's within 1e-9.
    module = _randomized(name, torch.float64)
    x = torch.randn(1, 2, module.o_proj.out_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), fast_mode=True)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_compile_fullgraph_and_export_without_graph_breaks(name):
    torch._dynamo.reset()
    module = _randomized(name, torch.float32)
    x = torch.randn(2, 18, module.o_proj.out_features)
    positions = torch.arange(5, 23).expand(2, -1)
    eager_out = module(x, positions)
    eager_grads = _parameter_grads(module, x, torch.ones_like(x), reference=False)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    assert max_error(compiled(x, positions), eager_out) < 1e-6
    compiled_out = compiled(x, positions)
    module.zero_grad()
    compiled_out.backward(torch.ones_like(x))
    for param_name, param in module.named_parameters():
        if param_name not in eager_grads:
            continue  # the indexer's: no gradient
        scale = eager_grads[param_name].abs().max().item()
        # compiled graphs may reorder fp32 sums: agree to ~100 ulps of the largest gradient
        assert max_error(param.grad, eager_grads[param_name]) <= 1e-5 * scale, param_name
    exported = torch.export.export(module, (x, positions))
    assert max_error(exported.module()(x, positions), eager_out) < 1e-6
    assert any("mlagen." in str(node.target) for node in exported.graph.nodes), "the kernel is one custom op"


@pytest.mark.slow
def test_compile_with_inductor():
    torch._dynamo.reset()
    module = _randomized("tiny_mla", torch.float32)
    x = torch.randn(2, 18, 64)
    compiled = torch.compile(module, fullgraph=True)
    assert max_error(compiled(x), module(x)) < 1e-5


def test_training_example_reduces_the_loss():
    spec = importlib.util.spec_from_file_location("train_tiny_mla", ROOT / "examples" / "train_tiny_mla.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train(steps=20, spec=str(ROOT / "specs" / "tiny_mla.yaml"), log_every=100)
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4, losses
