"""Generated modules (generated/tiny_*) against independent plain-torch references.

The oracle is tests/reference_models.py, written from the math without mlagen's
runtime reference or generated code. Kernels run under the Triton interpreter
(tests/conftest.py), in fp32 and fp16 only (no bf16 on CPU).

Per-family error ratios (kernel error / eager error, both against the fp64 golden)
are printed at the end of the module (run with -s to see them).
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict

import pytest
import torch

from tests.helpers import TINY_SPECS, assert_close_to_golden, generated, max_error
from tests.reference_models import gqa_reference, reference_for

SHAPES = [(1, 5), (2, 37), (3, 64)]  # S not a multiple of 16; S spanning several 16-blocks
SHAPE_IDS = [f"B{b}xS{s}" for b, s in SHAPES]
ROPE_SPECS = [name for name in TINY_SPECS if generated(name).SPEC.get("rope") is not None]
NO_ROPE_SPECS = [name for name in TINY_SPECS if generated(name).SPEC.get("rope") is None]
CAUSAL_SPECS = [name for name in TINY_SPECS if generated(name).SPEC["causal"]]
NONCAUSAL_SPECS = [name for name in TINY_SPECS if not generated(name).SPEC["causal"]]
SDPA_SPECS = [name for name in TINY_SPECS if generated(name).SPEC["family"] in ("mha", "gqa", "mqa")]

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}

_ratios: dict[tuple[str, str], float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _print_error_ratios():
    yield
    if _ratios:
        print("\nmax kernel/eager error ratio vs fp64 golden:")
        for (family, dtype), ratio in sorted(_ratios.items()):
            print(f"  {family:7s} {dtype}: {ratio:.3f}")


def make_module(name: str) -> torch.nn.Module:
    """The spec's fp32 module with default init, plus random norm weights, biases, gates and
    latents large enough to matter (so a dropped weight or a wrong gate shows in the output)."""
    torch.manual_seed(1234)
    module = generated(name).Attention()
    with torch.no_grad():
        for pname, param in module.named_parameters():
            if pname.endswith("layernorm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif pname.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif pname == "global_gate":
                param.copy_(torch.randn_like(param))
            elif pname == "latents":
                param.copy_(0.5 * torch.randn_like(param))
    return module


def inputs(batch: int, seqlen: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seqlen, 64, generator=gen).to(dtype)


@functools.cache
def base_output(name: str, batch: int, seqlen: int) -> torch.Tensor:
    """The fp32 kernel-path output for `inputs(batch, seqlen)` and default positions (cached:
    several tests compare against it)."""
    with torch.no_grad():
        return make_module(name)(inputs(batch, seqlen))


def spaced_positions(name: str, batch: int, seqlen: int) -> torch.Tensor:
    """Sorted random positions, different per sequence, spread up to max_position - 1."""
    max_position = generated(name).SPEC["max_position"]
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randperm(max_position, generator=gen)[:seqlen].sort().values for _ in range(batch)]
    return torch.stack(rows)


def golden(name: str, module: torch.nn.Module, hidden_states: torch.Tensor,
           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The independent reference in fp64 on exactly the module's (possibly low-precision) values."""
    spec = generated(name).SPEC
    state = copy.deepcopy(module).double().state_dict()
    return reference_for(spec)(state, spec, hidden_states.double(), position_ids)


def eager(name: str, module: torch.nn.Module, hidden_states: torch.Tensor,
          position_ids: torch.Tensor | None = None) -> torch.Tensor:
    spec = generated(name).SPEC
    return reference_for(spec)(module.state_dict(), spec, hidden_states, position_ids)


def check_against_golden(name: str, module: torch.nn.Module, hidden_states: torch.Tensor,
                         position_ids: torch.Tensor | None = None, what: str = "") -> None:
    dtype = hidden_states.dtype
    with torch.no_grad():
        actual = module(hidden_states, position_ids)
        expected = eager(name, module, hidden_states, position_ids)
        gold = golden(name, module, hidden_states, position_ids)
    assert actual.dtype == dtype and actual.shape == hidden_states.shape
    assert torch.isfinite(actual).all()
    kernel_error, eager_error = assert_close_to_golden(actual, expected, gold, atol=ATOL[dtype],
                                                       what=f"{name} {DTYPE_IDS[dtype]} {what}")
    key = (generated(name).SPEC["family"], DTYPE_IDS[dtype])
    _ratios[key] = max(_ratios[key], kernel_error / max(eager_error, 1e-300))


# --------------------------------------------------------------------------------------------
# kernel path vs the fp64 golden, eager in the same dtype as the yardstick
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", TINY_SPECS)
def test_kernel_forward_matches_golden(name, shape, dtype):
    module = make_module(name)
    if dtype == torch.float16:
        module = module.half()
    check_against_golden(name, module, inputs(*shape, dtype), what=f"{shape}")


@pytest.mark.parametrize("name", TINY_SPECS)
def test_kernel_forward_matches_golden_at_spaced_positions(name):
    module = make_module(name)
    check_against_golden(name, module, inputs(1, 37), spaced_positions(name, 1, 37), what="spaced positions")


# --------------------------------------------------------------------------------------------
# the generated glue code: reference_forward in fp64 == the independent reference
# --------------------------------------------------------------------------------------------

GLUE_CASES = [(shape, "default") for shape in SHAPES] + [((2, 37), "spaced")]


@pytest.mark.parametrize("shape, positions", GLUE_CASES, ids=[f"B{b}xS{s}-{p}" for (b, s), p in GLUE_CASES])
@pytest.mark.parametrize("name", TINY_SPECS)
def test_reference_forward_equals_independent_reference(name, shape, positions):
    module = make_module(name).double()
    hidden_states = inputs(*shape, torch.float64)
    position_ids = None if positions == "default" else spaced_positions(name, *shape)
    with torch.no_grad():
        glue = module.reference_forward(hidden_states, position_ids)
        gold = golden(name, module, hidden_states, position_ids)
    error = max_error(glue, gold)
    assert error <= 1e-10, f"{name}: reference_forward differs from the independent reference by {error:.3g}"


# --------------------------------------------------------------------------------------------
# mha / gqa / mqa: the kernel path against torch SDPA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repeat_kv", [False, True], ids=["enable_gqa", "repeat_interleave"])
@pytest.mark.parametrize("name", SDPA_SPECS)
def test_gqa_kernel_matches_sdpa(name, repeat_kv):
    module = make_module(name)
    spec = generated(name).SPEC
    hidden_states = inputs(2, 37)
    actual = base_output(name, 2, 37)
    with torch.no_grad():
        expected = gqa_reference(module.state_dict(), spec, hidden_states, repeat_kv=repeat_kv)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# causality: the future never reaches the past (kernel path)
# --------------------------------------------------------------------------------------------

def _perturbed_after(hidden_states: torch.Tensor, t: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    changed = hidden_states.clone()
    changed[:, t:] += 3.0 * torch.randn(changed[:, t:].shape, generator=gen)
    return changed


def _check_causal(name: str, shape: tuple[int, int], t: int) -> None:
    base = base_output(name, *shape)
    with torch.no_grad():
        after = make_module(name)(_perturbed_after(inputs(*shape), t))
    leak = max_error(after[:, :t], base[:, :t])
    assert leak == 0.0, f"changing tokens >= {t} changed outputs before {t} by {leak:.3g}"
    assert max_error(after[:, t], base[:, t]) > 1e-3, "the perturbation did not reach position t itself"


# tiny_hybrid: chunk_size 8, window 6; t on, before and after chunk boundaries and window edges.
@pytest.mark.parametrize("t", [1, 6, 7, 8, 9, 16, 17, 25, 33])
def test_hybrid_is_causal(t):
    assert generated("tiny_hybrid").SPEC["chunk_size"] == 8
    _check_causal("tiny_hybrid", (1, 37), t)


@pytest.mark.parametrize("t", [5, 17])
@pytest.mark.parametrize("name", [n for n in CAUSAL_SPECS if n != "tiny_hybrid"])
def test_causal_specs_are_causal(name, t):
    _check_causal(name, (1, 37), t)


@pytest.mark.parametrize("name", NONCAUSAL_SPECS)
def test_bidirectional_specs_see_the_future(name):
    """The causality check can see a leak: non-causal specs must change everywhere."""
    base = base_output(name, 1, 37)
    with torch.no_grad():
        after = make_module(name)(_perturbed_after(inputs(1, 37), 30))
    assert (after[:, :30] - base[:, :30]).abs().amax(-1).min() > 1e-4


# --------------------------------------------------------------------------------------------
# position ids
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_SPECS)
def test_explicit_arange_positions_equal_default(name):
    module = make_module(name)
    hidden_states = inputs(2, 21)
    default = base_output(name, 2, 21)
    with torch.no_grad():
        explicit = module(hidden_states, torch.arange(21).expand(2, 21))
        # 1-d int32 positions broadcast over the batch (checked on the cheap reference path)
        one_dim = module.reference_forward(hidden_states, torch.arange(21, dtype=torch.int32))
        reference_default = module.reference_forward(hidden_states)
    assert torch.equal(explicit, default)
    assert torch.equal(one_dim, reference_default)


@pytest.mark.parametrize("name", ROPE_SPECS)
def test_rope_positions_matter(name):
    """RoPE scores depend on position differences: a uniform shift keeps the output (up to
    rounding), moving part of the sequence further away changes it."""
    module = make_module(name)
    hidden_states = inputs(2, 21)
    positions = torch.arange(21).expand(2, 21)
    gap = positions + (positions >= 10) * 40
    base = base_output(name, 2, 21)  # == explicit arange positions (tested above)
    with torch.no_grad():
        shifted = module(hidden_states, positions + 100)
        spread = module(hidden_states, gap)
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    assert max_error(spread, base) > 1e-3, "moving tokens 10.. by 40 positions did not change the output"
    assert max_error(spread[:, :10], base[:, :10]) == 0.0 or not generated(name).SPEC["causal"]


@pytest.mark.parametrize("name", NO_ROPE_SPECS)
def test_positions_ignored_without_rope(name):
    module = make_module(name)
    hidden_states = inputs(2, 21)
    with torch.no_grad():
        assert torch.equal(module(hidden_states, spaced_positions(name, 2, 21)), base_output(name, 2, 21))


# --------------------------------------------------------------------------------------------
# fp16: converting with .half() must not change what the module computes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ROPE_SPECS)
def test_half_conversion_equals_fp16_construction(name):
    """`module.half()` (or `.to(torch.float16)`, which the dtype error message recommends) must
    give the same layer as building it with dtype=torch.float16 and loading the weights."""
    converted = make_module(name).half()
    built = generated(name).Attention(dtype=torch.float16)
    built.load_state_dict(converted.state_dict())
    hidden_states = inputs(2, 37, torch.float16)
    position_ids = spaced_positions(name, 2, 37)
    with torch.no_grad():
        a = converted(hidden_states, position_ids)
        b = built(hidden_states, position_ids)
    assert torch.equal(a, b), f"{name}: .half() module differs from an fp16-built one by {max_error(a, b):.3g}"


# --------------------------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------------------------

def _max_position(name: str) -> int:
    return generated(name).SPEC["max_position"]


ERROR_CASES = {
    "wrong-last-dim": (lambda n: (torch.randn(2, 5, 63), None), "hidden_states must be [batch, seq, 64]"),
    "fp64-input": (lambda n: (torch.randn(2, 5, 64, dtype=torch.float64), None),
                   "has dtype torch.float64 but the module runs in torch.float32"),
    "2d-input": (lambda n: (torch.randn(5, 64), None), "hidden_states must have 3 dims"),
    "not-a-tensor": (lambda n: ([[0.0] * 64], None), "hidden_states must be a torch.Tensor"),
    "position-too-large": (lambda n: (torch.randn(2, 5, 64), torch.full((2, 5), _max_position(n))),
                           "position_ids must lie in [0, "),
    "position-negative": (lambda n: (torch.randn(2, 5, 64), torch.tensor([[0, 1, 2, 3, -1]] * 2)),
                          "position_ids must lie in [0, "),
    "position-wrong-shape": (lambda n: (torch.randn(2, 5, 64), torch.arange(6).expand(2, 6)),
                             "position_ids must have shape [2, 5]"),
    "position-float": (lambda n: (torch.randn(2, 5, 64), torch.arange(5.0).expand(2, 5)),
                       "position_ids must be int64 or int32"),
    "sequence-longer-than-max-position": (lambda n: (torch.randn(1, _max_position(n) + 1, 64), None),
                                          "exceeds max_position"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
@pytest.mark.parametrize("name", TINY_SPECS)
def test_input_errors(name, case):
    make_args, fragment = ERROR_CASES[case]
    module = make_module(name)
    hidden_states, position_ids = make_args(name)
    for call in (module.forward, module.reference_forward):
        with pytest.raises(ValueError) as info:
            call(hidden_states, position_ids)
        assert fragment in str(info.value), str(info.value)
    if case == "position-too-large":
        assert str(_max_position(name)) in str(info.value)


# --------------------------------------------------------------------------------------------
# gradients through the kernel path
# --------------------------------------------------------------------------------------------

def _grads(module: torch.nn.Module, hidden_states: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x = hidden_states.clone().requires_grad_(True)
    out = forward(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    grads = {}
    for name, param in module.named_parameters():
        if name.startswith("indexer."):  # sparse attention's selection takes no gradient
            assert param.grad is None, f"{name} got a gradient"
            continue
        grads[name] = param.grad.clone()
    grads["hidden_states"] = x.grad.clone()
    return grads


@pytest.mark.parametrize("name", TINY_SPECS)
def test_gradients_match_reference(name):
    module = make_module(name)
    spec = generated(name).SPEC
    hidden_states = inputs(1, 21)
    kernel = _grads(module, hidden_states, module)
    glue = _grads(module, hidden_states, module.reference_forward)
    independent = _grads(module, hidden_states,
                         lambda x: reference_for(spec)(module.state_dict(keep_vars=True), spec, x))
    assert kernel.keys() == glue.keys() == independent.keys()
    for pname, grad in kernel.items():
        assert grad.abs().max() > 0, f"{pname} got no gradient"
        torch.testing.assert_close(grad, glue[pname], atol=1e-4, rtol=1e-4, msg=lambda m, pname=pname: f"{pname}: {m}")
        torch.testing.assert_close(grad, independent[pname], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, pname=pname: f"{pname} (independent): {m}")
