"""Hostile input at run time (issue 14): every public entry point of a generated module and
its paged cache either works (an empty batch gives an empty output, like torch ops) or raises
a one-line ValueError that names the argument, before anything is written; never an
AttributeError, TypeError or IndexError from inside, never a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY_SPECS, generated

MLA = "tiny_mla"


def _attention(name: str = MLA) -> torch.nn.Module:
    return generated(name).Attention()


def _raises_naming(argument: str, call, *args, **kwargs) -> str:
    """call(*args, **kwargs) raises a one-line ValueError that names `argument`; returns the message."""
    with pytest.raises(ValueError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message.splitlines()) == 1, f"not one line: {message!r}"
    assert argument in message, f"{argument!r} not named in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# 1. empty batches and empty sequences


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)], ids=["batch0", "seqlen0", "both0"])
@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("name", TINY_SPECS)
def test_empty_input_gives_an_empty_output_with_a_graph(name, path, shape):
    attn = _attention(name)
    hidden = torch.randn(*shape, 64, requires_grad=True)
    out = (attn.forward if path == "kernels" else attn.reference_forward)(hidden)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    out.sum().backward()  # the empty output is part of the graph, like any torch op's
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("filled", [False, True], ids=["empty-cache", "filled-cache"])
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_a_step_without_tokens_gives_an_empty_output_and_leaves_the_cache(path, filled):
    attn = _attention()
    run = attn.forward if path == "kernels" else attn.reference_forward
    cache = attn.new_cache(2, 8, page_size=2)
    with torch.no_grad():
        if filled:
            run(torch.randn(2, 3, 64), cache=cache, new_tokens=[3, 1])
        before = (cache.host_lengths(), cache.buffer.clone(), cache.page_table.clone())
        out = run(torch.randn(2, 0, 64), cache=cache)
    assert out.shape == (2, 0, 64)
    assert cache.host_lengths() == before[0]
    assert torch.equal(cache.buffer, before[1]) and torch.equal(cache.page_table, before[2])


def test_an_empty_batch_cannot_match_a_cache():
    # A cache holds at least one sequence (batch_size >= 1), so batch 0 is a batch mismatch.
    attn = _attention()
    with torch.no_grad():
        _raises_naming("batch", attn, torch.randn(0, 3, 64), cache=attn.new_cache(1, 8))


# ---------------------------------------------------------------------------------------------
# 2. hidden_states, position_ids and cache checked before use on the cache path

BAD_HIDDEN_STATES = {
    "list": [[0.0] * 64],
    "1d-tensor": torch.randn(64),
    "2d-tensor": torch.randn(3, 64),
    "wrong-width": torch.randn(1, 3, 63),
    "fp64": torch.randn(1, 3, 64, dtype=torch.float64),
    "integers": torch.ones(1, 3, 64, dtype=torch.int64),
}


@pytest.mark.parametrize("case", list(BAD_HIDDEN_STATES))
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_bad_hidden_states_on_the_cache_path_are_named(path, case):
    attn = _attention()
    cache = attn.new_cache(1, 8)
    with torch.no_grad():
        _raises_naming(
            "hidden_states", attn.forward if path == "kernels" else attn.reference_forward,
            BAD_HIDDEN_STATES[case], cache=cache,
        )
    assert cache.host_lengths() == [0]


@pytest.mark.parametrize("cache", [{}, "cache", torch.zeros(1, 8, 40)], ids=["dict", "string", "tensor"])
def test_something_else_than_a_paged_cache_is_named(cache):
    with torch.no_grad():
        _raises_naming("cache", _attention(), torch.randn(1, 3, 64), cache=cache)


@pytest.mark.parametrize(
    "position_ids",
    [[[0, 1, 2]], torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0, 1]]), torch.tensor([[0, -1, 2]])],
    ids=["list", "floats", "wrong-shape", "negative"],
)
def test_bad_position_ids_on_the_cache_path_are_named(position_ids):
    attn = _attention()
    cache = attn.new_cache(1, 8)
    with torch.no_grad():
        _raises_naming("position_ids", attn, torch.randn(1, 3, 64), position_ids, cache=cache)
    assert cache.host_lengths() == [0]


# ---------------------------------------------------------------------------------------------
# 3. new_cache arguments

BAD_CACHE_ARGUMENTS = {
    "batch_size=0": ("batch_size", dict(batch_size=0)),
    "batch_size=-1": ("batch_size", dict(batch_size=-1)),
    "batch_size=2.5": ("batch_size", dict(batch_size=2.5)),
    "batch_size=2.0": ("batch_size", dict(batch_size=2.0)),
    "batch_size=True": ("batch_size", dict(batch_size=True)),
    "batch_size='2'": ("batch_size", dict(batch_size="2")),
    "max_tokens=0": ("max_tokens", dict(max_tokens=0)),
    "max_tokens=8.0": ("max_tokens", dict(max_tokens=8.0)),
    "max_tokens=None": ("max_tokens", dict(max_tokens=None)),
    "page_size=0": ("page_size", dict(page_size=0)),
    "page_size=1.5": ("page_size", dict(page_size=1.5)),
    "page_size=False": ("page_size", dict(page_size=False)),
    "num_pages=0": ("num_pages", dict(num_pages=0)),
    "num_pages=-1": ("num_pages", dict(num_pages=-1)),
    "num_pages=2.5": ("num_pages", dict(num_pages=2.5)),
    "num_pages=tensor": ("num_pages", dict(num_pages=torch.ones(2, 2, dtype=torch.int64))),
}


@pytest.mark.parametrize("case", list(BAD_CACHE_ARGUMENTS))
def test_bad_new_cache_arguments_are_named(case):
    argument, overrides = BAD_CACHE_ARGUMENTS[case]
    _raises_naming(argument, _attention().new_cache, **{"batch_size": 2, "max_tokens": 8, **overrides})


def test_integer_scalars_of_numpy_and_torch_are_sizes():
    cache = _attention().new_cache(np.int64(2), torch.tensor(8), page_size=np.int32(4), num_pages=torch.tensor(3))
    assert (cache.batch_size, cache.max_tokens, cache.page_size, cache.buffer.shape[0]) == (2, 8, 4, 3)
    assert all(type(n) is int for n in (cache.batch_size, cache.max_tokens, cache.page_size))


def test_a_pool_smaller_than_one_full_sequence_is_allowed_and_runs_out_clearly():
    attn = _attention()
    cache = attn.new_cache(2, 8, page_size=2, num_pages=1)
    with torch.no_grad():
        attn(torch.randn(2, 1, 64), cache=cache, new_tokens=[1, 0])
        _raises_naming("num_pages", attn, torch.randn(2, 2, 64), cache=cache, new_tokens=[2, 0])
    assert cache.host_lengths() == [1, 0]


# ---------------------------------------------------------------------------------------------
# 4. free() rows and new_tokens


def _filled_cache(attn) -> object:
    cache = attn.new_cache(2, 8, page_size=2)
    with torch.no_grad():
        attn(torch.randn(2, 3, 64), cache=cache, new_tokens=[3, 2])
    return cache


@pytest.mark.parametrize(
    "rows",
    [[-1], [2], [5], [0, 0], [0.0], ["0"], [True], 1, "01", torch.tensor([[0]]), torch.tensor([0.0])],
    ids=["negative", "batch-size", "past-the-end", "duplicate", "float", "string-row", "bool", "bare-int",
         "string", "2d-tensor", "float-tensor"],
)
def test_free_refuses_bad_rows_and_frees_nothing(rows):
    cache = _filled_cache(_attention())
    free_before = repr(cache)
    _raises_naming("rows", cache.free, rows)
    assert cache.host_lengths() == [3, 2] and repr(cache) == free_before


@pytest.mark.parametrize("rows", [[1], (1,), torch.tensor([1]), [np.int64(1)]], ids=["list", "tuple", "tensor", "numpy"])
def test_free_takes_integer_rows(rows):
    cache = _filled_cache(_attention())
    cache.free(rows)
    assert cache.host_lengths() == [3, 0]


@pytest.mark.parametrize(
    "new_tokens",
    [[1.7, 2.2], [2.0, 1], "12", b"12", torch.tensor([1.0, 2.0]), torch.tensor([True, False]), [True, 1],
     [[1], [2]], torch.tensor([[1, 2]]), [3], [3, 1, 1], [-1, 2], [4, 1], {0: 1, 1: 2}, 3],
    ids=["floats", "integral-float", "string", "bytes", "float-tensor", "bool-tensor", "bool", "nested",
         "2d-tensor", "too-few", "too-many", "negative", "more-than-seqlen", "dict", "bare-int"],
)
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_bad_new_tokens_are_named_and_nothing_is_written(path, new_tokens):
    attn = _attention()
    cache = attn.new_cache(2, 8, page_size=2)
    with torch.no_grad():
        _raises_naming(
            "new_tokens", attn.forward if path == "kernels" else attn.reference_forward,
            torch.randn(2, 3, 64), cache=cache, new_tokens=new_tokens,
        )
    assert cache.host_lengths() == [0, 0] and not cache.buffer.any()


@pytest.mark.parametrize("new_tokens", [(3, 1), torch.tensor([3, 1]), torch.tensor([3, 1], dtype=torch.int32),
                                        [np.int64(3), 1]], ids=["tuple", "int64-tensor", "int32-tensor", "numpy"])
def test_new_tokens_take_integer_sequences_and_tensors(new_tokens):
    attn = _attention()
    cache = attn.new_cache(2, 8, page_size=2)
    with torch.no_grad():
        attn(torch.randn(2, 3, 64), cache=cache, new_tokens=new_tokens)
    assert cache.host_lengths() == [3, 1]


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_new_tokens_without_a_cache_are_refused_not_ignored(path):
    # Ignored, they would let a non-causal layer's real tokens attend to the padding.
    attn = _attention()
    with torch.no_grad():
        _raises_naming("new_tokens", attn.forward if path == "kernels" else attn.reference_forward,
                       torch.randn(2, 3, 64), new_tokens=[3, 1])


# ---------------------------------------------------------------------------------------------
# 6. the cache path is for inference


@pytest.mark.parametrize("filled", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("needs_grad", ["parameters", "input"])
def test_the_cache_path_refuses_to_record_a_graph(needs_grad, path, filled):
    attn = _attention()
    run = attn.forward if path == "kernels" else attn.reference_forward
    cache = attn.new_cache(1, 8, page_size=2)
    if filled:
        with torch.no_grad():
            run(torch.randn(1, 3, 64), cache=cache)
    hidden = torch.randn(1, 2, 64)
    if needs_grad == "input":
        attn.requires_grad_(False)
        hidden.requires_grad_(True)
    before = cache.host_lengths()
    message = _raises_naming("cache=", run, hidden, cache=cache)
    assert "torch.no_grad()" in message and "inference" in message
    assert cache.host_lengths() == before and not cache.buffer.requires_grad


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_the_cache_path_runs_under_no_grad_inference_mode_and_without_anything_to_record(path):
    attn = _attention()
    run = attn.forward if path == "kernels" else attn.reference_forward
    hidden = torch.randn(1, 4, 64, requires_grad=True)
    expected = attn.reference_forward(hidden.detach())
    with torch.inference_mode():
        cache = attn.new_cache(1, 8, page_size=2)  # made in inference mode, used outside it too
        outs = [run(hidden[:, :2], cache=cache)]
    with torch.no_grad():
        outs.append(run(hidden[:, 2:3], cache=cache))
    attn.requires_grad_(False)
    outs.append(run(hidden[:, 3:].detach(), cache=cache))  # grad enabled, but nothing requires it
    assert not cache.buffer.requires_grad and not any(out.requires_grad for out in outs)
    torch.testing.assert_close(torch.cat(outs, 1), expected.detach(), atol=2e-5, rtol=0)
