"""Property test of the paged latent cache: random sequences of cache operations on tiny_mla
(causal, and the same spec non-causal) against recomputation without a cache.

A scenario is a cache (1-3 sequences, pages of 1-4 tokens, a pool often smaller than
batch x pages per sequence) and up to 7 operations: steps that append 0-3 new tokens per
row (ragged, right-padded, sometimes no token at all; an empty cache takes the prefill path,
a filled one the decode path) and free() of some rows, whose pages later steps reuse. After
every step, each row's new outputs must equal the newest outputs of its whole token history
run through the module's plain forward, and padding must give zeros, on the kernels (Triton
interpreter) and on the reference path, each with its own cache. A step that overflows
max_tokens or the pool must raise ValueError and change nothing. Derandomized: the same
examples every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.test_decode import randomized, tiny_mla_package

D_MODEL = 64
TOLERANCE = 2e-5


@dataclass(frozen=True)
class Step:
    counts: tuple[int, ...]  # new tokens per row
    padding: int  # extra columns beyond the longest row


@dataclass(frozen=True)
class Free:
    rows: tuple[int, ...]


@dataclass(frozen=True)
class Scenario:
    batch: int
    max_tokens: int
    page_size: int
    num_pages: int
    operations: tuple[Step | Free, ...]
    seed: int


@st.composite
def scenarios(draw) -> Scenario:
    batch = draw(st.integers(1, 3))
    page_size = draw(st.integers(1, 4))
    max_tokens = draw(st.integers(2, 10))
    pages_per_sequence = -(-max_tokens // page_size)
    num_pages = draw(st.integers(1, batch * pages_per_sequence))
    rows = st.integers(0, batch - 1)
    step = st.builds(Step, counts=st.tuples(*[st.integers(0, 3)] * batch), padding=st.integers(0, 1))
    free = st.builds(Free, rows=st.lists(rows, min_size=1, max_size=batch, unique=True).map(tuple))
    operations = draw(st.lists(st.one_of(step, step, step, free), min_size=4, max_size=8))
    return Scenario(batch, max_tokens, page_size, num_pages, tuple(operations), draw(st.integers(0, 2**16)))


@dataclass
class Model:
    """What the cache should hold: each row's token history, and the pages it needs."""

    scenario: Scenario
    histories: list[torch.Tensor]

    def pages(self, lengths: list[int]) -> int:
        return sum(-(-length // self.scenario.page_size) for length in lengths)

    def fits(self, counts: tuple[int, ...]) -> bool:
        now = [len(history) for history in self.histories]
        after = [length + count for length, count in zip(now, counts)]
        spare = self.scenario.num_pages - self.pages(now)
        return max(after) <= self.scenario.max_tokens and self.pages(after) - self.pages(now) <= spare


def check_pages(cache, model: Model) -> None:
    lengths = [len(history) for history in model.histories]
    assert cache.host_lengths() == lengths
    assert cache.lengths.tolist() == lengths
    owned = [
        int(page)
        for row, length in enumerate(lengths)
        for page in cache.page_table[row, : -(-length // cache.page_size)]
    ]
    free = list(cache._free)  # (the pool's free list has no public view)
    assert len(set(owned)) == len(owned), f"a page is owned twice: {owned}"
    assert len(owned) == model.pages(lengths), "pages are not counted as the lengths need"
    assert not set(owned) & set(free) and len(owned) + len(free) == cache.buffer.shape[0], "the pool leaks"


def run_scenario(module: torch.nn.Module, scenario: Scenario) -> None:
    torch.manual_seed(scenario.seed)
    paths = {"kernels": module.forward, "reference": module.reference_forward}
    caches = {
        path: module.new_cache(
            scenario.batch, scenario.max_tokens, page_size=scenario.page_size, num_pages=scenario.num_pages
        )
        for path in paths
    }
    model = Model(scenario, [torch.zeros(0, D_MODEL) for _ in range(scenario.batch)])
    for operation in scenario.operations:
        if isinstance(operation, Free):
            event("free")
            for cache in caches.values():
                cache.free(list(operation.rows))
            for row in operation.rows:
                model.histories[row] = torch.zeros(0, D_MODEL)
        else:
            width = max(operation.counts) + operation.padding
            hidden = torch.randn(scenario.batch, width, D_MODEL)
            if not model.fits(operation.counts):
                event("step refused (max_tokens or pool)")
                for path, run in paths.items():
                    before = caches[path].buffer.clone()
                    with pytest.raises(ValueError, match="max_tokens|pages"):
                        run(hidden, cache=caches[path], new_tokens=list(operation.counts))
                    assert torch.equal(caches[path].buffer, before), f"{path}: a refused step wrote"
            else:
                event("prefill" if not any(len(h) for h in model.histories) else "decode")
                if operation.padding or len(set(operation.counts)) > 1:
                    event("right padding")
                outs = {
                    path: run(hidden, cache=caches[path], new_tokens=list(operation.counts))
                    for path, run in paths.items()
                }
                for row, count in enumerate(operation.counts):
                    model.histories[row] = torch.cat([model.histories[row], hidden[row, :count]])
                    if count:
                        recomputed = module(model.histories[row][None])[0, -count:]
                    for path, out in outs.items():
                        assert not out[row, count:].any(), f"{path}: padding of row {row} is not zero"
                        if count:
                            error = (out[row, :count] - recomputed).abs().max().item()
                            assert error < TOLERANCE, f"{path}: row {row} differs by {error:.3g}"
        for cache in caches.values():
            check_pages(cache, model)


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "non-causal"])
def module(request, tmp_path_factory) -> torch.nn.Module:
    package: ModuleType = tiny_mla_package(request.param, tmp_path_factory.mktemp("specs"))
    return randomized(package.Attention())


# Every kind of operation at least once: a ragged prefill with an empty row, a multi-token
# decode step refused for want of pages, a step in which each row crosses a page boundary,
# freed pages reused by a new sequence on the decode path, a step without tokens, and a
# second prefill once every sequence is freed.
EVERYTHING = Scenario(
    batch=3, max_tokens=7, page_size=2, num_pages=5, seed=0,
    operations=(
        Step((3, 0, 2), padding=1), Step((2, 1, 3), padding=0), Step((1, 1, 1), padding=0), Free((0,)),
        Step((2, 0, 1), padding=0), Step((0, 3, 0), padding=0), Step((0, 0, 0), padding=0),
        Free((0, 1, 2)), Step((3, 1, 0), padding=1),
    ),
)


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
@example(scenario=EVERYTHING)
def test_cache_operations_equal_recomputation_without_a_cache(module, scenario):
    with torch.no_grad():
        run_scenario(module, scenario)
