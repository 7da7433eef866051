"""`mlagen bench --suite gpu`: everything side by side in one process on one GPU.

    run_suite(SuiteRequest())            # a GPU: bf16, at most DEFAULT_BUDGET_S seconds
    run_suite(SuiteRequest(smoke=True))  # CPU, interpreter, fp32, tiny shapes: the same code path

The order of work, so that a run cut short still says something true:
1. plan: the grid of points, each contender's estimated seconds, the total against the
   budget, printed before anything runs; the lowest tiers are trimmed until it fits;
2. correctness: every generated kernel (forward, backward, decode) at a small shape that
   leaves partial tiles, against the fp64 golden, by the error-ratio rule; a kernel that
   fails keeps its timings, but they are marked "invalid";
3. timing, tier by tier (the points that matter most first): every contender is checked at
   the point's own shape before it is timed (runner.run_contender), FlexAttention is compiled
   once per shape family, and every first call (compiles, autotuning) is recorded apart
   from the timed runs. A contender whose estimate no longer fits the time left is skipped
   with that reason; the JSON file is rewritten after every point.

Outputs: gpu_suite_<device>.json (schema SCHEMA), gpu_suite_<device>_roofline.png when
matplotlib is there, and the GPU-suite section of BENCHMARKS.md (suite_report).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from mlagen.bench.contenders import SUITE_ATTENTION_CONTENDERS, SUITE_DECODE_CONTENDERS, Contender, Env
from mlagen.bench.hardware import DeviceInfo, GpuPeak, describe, known_gpu
from mlagen.bench.problems import (
    AbsorbedDecodeProblem,
    AttentionDims,
    AttentionProblem,
    DecodeInputs,
    absorbed_decode_work,
    attention_work,
    filled_cache,
)
from mlagen.bench.runner import (
    CHECK_PREFIX,
    CHECK_ROWS,
    DTYPES,
    ERROR_RATIO,
    _choose_device,
    _free_memory,
    _reason,
    _synchronize,
    _versions,
    compare,
    empty_record,
    run_contender,
)
from mlagen.bench.timing import SUITE_SMOKE_TIMING, SUITE_TIMING, TimingMethod
from mlagen.errors import MlagenError

SCHEMA = "mlagen-gpu-suite/1"
# The whole suite, checks included, in seconds: with imports, the plot and the report it stays
# within the 8 minutes one device call may spend on it.
DEFAULT_BUDGET_S = 420.0
SMOKE_BUDGET_S = 300.0
RESERVE_S = 5.0  # kept back for the last JSON file, the plot and the report
SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
SECTIONS = (
    "prefill",
    "train",
    "decode",
    "sparse-prefill",
    "sparse-train",
    "sparse-decode",
    "compressed-prefill",
    "compressed-train",
    "compressed-decode",
)
SECTION_TITLES = {
    "prefill": "prefill forward",
    "train": "training (forward + backward)",
    "decode": "MLA absorbed decode",
    "sparse-prefill": "DeepSeek Sparse Attention prefill (indexer + top-k + sparse MLA)",
    "sparse-train": "DeepSeek Sparse Attention training (indexer + top-k + sparse MLA forward + backward)",
    "sparse-decode": "DeepSeek Sparse Attention decode over the paged latent cache",
    "compressed-prefill": "DeepSeek-V4 compressed attention prefill (the whole layer)",
    "compressed-train": "DeepSeek-V4 compressed attention training (the whole layer, forward + backward)",
    "compressed-decode": "DeepSeek-V4 compressed attention decode over its compressed cache (the whole layer)",
}
DECODE_SECTIONS = ("decode", "sparse-decode", "compressed-decode")


def family_of(section: str) -> str:
    """dense, sparse or compressed: which problems and contenders a section has."""
    return section.split("-")[0] if "-" in section else "dense"


def is_decode(section: str) -> bool:
    return section in DECODE_SECTIONS


# --- what is measured --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A kernel at one model's head counts: the shipped spec whose generated package and head
    dims it uses, and the test-sized stand-in of a smoke run (with head counts that differ
    between targets, so the smoke run covers the same cases)."""

    label: str
    spec: str
    smoke_spec: str
    smoke_heads: tuple[int, int] | None = None  # (query heads, kv heads) of the stand-in; None: its own
    check_window: int | None = None  # a window short enough to bite at the check's length (GPU runs)
    cache_dtype: str = "model"  # sparse decode: "fp8" reads FlashMLA's FP8 cache layout
    dense: Target | None = None  # sparse prefill: the dense MLA target of the same shape
    rank: int = 1  # DSA and V4 targets: 2 for the secondary ones, measured a tier later
    heads: int | None = None  # decode: query heads other than the spec's (a tensor-parallel rank)


GQA = Target("gqa-d128", "llama3_8b", "tiny_gqa")
MHA = Target("mha-d128", "llama2_7b", "tiny_gqa", smoke_heads=(4, 4))
SWA = Target("swa-d128", "mistral_7b", "tiny_swa", check_window=128)
MLA_16 = Target("mla-192/128-h16", "deepseek_v2_lite", "tiny_mla", smoke_heads=(2, 2))
MLA_128 = Target("mla-192/128-h128", "deepseek_v3", "tiny_mla", smoke_heads=(4, 4))
DECODE_16 = Target("mla-decode-h16", "deepseek_v2_lite", "tiny_mla", smoke_heads=(2, 1))
DECODE_64 = Target("mla-decode-h64", "kimi_k2", "tiny_mla", smoke_heads=(3, 1))
DECODE_128 = Target("mla-decode-h128", "deepseek_v3", "tiny_mla", smoke_heads=(4, 1))

PREFILL_TARGETS = (GQA, MHA, MLA_16, MLA_128)
DECODE_TARGETS = (DECODE_16, DECODE_128)
# Checked, not timed: the sliding-window path and a third head count (a tensor-parallel rank).
CHECK_TARGETS = (GQA, MHA, SWA, MLA_16, MLA_128)
DECODE_CHECK_TARGETS = (DECODE_16, DECODE_64, DECODE_128)

# DeepSeek Sparse Attention (DeepSeek-V3.2's spec: 128 heads, top 2048) and DeepSeek-V4's layer types.
DSA = Target("dsa-h128", "deepseek_v32", "tiny_dsa", dense=MLA_128)
# The FP8 cache is the deployed layout (FlashMLA's): tier 1; the bf16 cache a tier later.
DSA_DECODE_128 = Target("dsa-decode-h128", "deepseek_v32", "tiny_dsa", smoke_heads=(4, 1), rank=2)
DSA_DECODE_128_FP8 = Target(
    "dsa-decode-h128-fp8", "deepseek_v32", "tiny_dsa", smoke_heads=(4, 1), cache_dtype="fp8"
)
# 16 heads: a tensor-parallel rank of 8 (FlashMLA's sparse kernels would pad it to 64).
DSA_DECODE_16 = Target("dsa-decode-h16", "deepseek_v32", "tiny_dsa", smoke_heads=(2, 1), rank=2, heads=16)
DSA_DECODE_16_FP8 = Target(
    "dsa-decode-h16-fp8", "deepseek_v32", "tiny_dsa", smoke_heads=(2, 1), cache_dtype="fp8", rank=2, heads=16
)
# CSA first: the indexer, the top-k and the selected entries; HCA and sliding are its subsets.
V4_CSA = Target("v4-csa", "deepseek_v4_flash_csa", "tiny_compressed_csa")
V4_HCA = Target("v4-hca", "deepseek_v4_flash_hca", "tiny_compressed_hca", rank=2)
V4_SLIDING = Target("v4-sliding", "deepseek_v4_flash_sliding", "tiny_compressed_sliding", rank=2)

SPARSE_TARGETS = (DSA,)
SPARSE_DECODE_TARGETS = (DSA_DECODE_128, DSA_DECODE_128_FP8, DSA_DECODE_16, DSA_DECODE_16_FP8)
COMPRESSED_TARGETS = (V4_CSA, V4_HCA, V4_SLIDING)


@dataclass(frozen=True, slots=True)
class Grid:
    """The shapes of a run. Tier 1 is measured first and never trimmed before tier 2."""

    lengths: tuple[int, ...]  # prefill and training sequence lengths
    tokens_per_batch: int  # batch = tokens / length, as FlashAttention's benchmarks
    decode_batches: tuple[int, ...]
    decode_cache_lens: tuple[int, ...]
    new_tokens: tuple[int, ...]  # decode: 1, or 2 with a speculative token
    core_lengths: tuple[int, ...]  # tier 1 of prefill; of training only the first
    core_batches: tuple[int, ...]  # tier 1 of decode with core_cache_lens and one new token
    core_cache_lens: tuple[int, ...]
    # Correctness phase: lengths that leave partial tiles (not multiples of 64 or 128) but are
    # multiples of 16, so the kernels specialise as at the timed lengths and compile once for both.
    check_len: int
    check_batch: int
    decode_check_len: int
    decode_check_batch: int
    decode_checked_sequences: int  # timing phase: sequences compared with the golden
    # DeepSeek Sparse Attention and DeepSeek-V4 compressed attention.
    family_lengths: tuple[int, ...] = ()  # prefill and training
    family_tokens_per_batch: int = 16384
    sparse_core_length: int = 0  # tier 1 of DSA prefill (2 of training): long prompts are its case
    compressed_core_length: int = 0  # of V4's: where its eager reference still fits in memory
    family_decode_batches: tuple[int, ...] = ()
    family_decode_cache_lens: tuple[int, ...] = ()
    family_core_batch: int = 0  # with the longest cache, one new token: tier 1 of decode
    # Checks: longer than the selections (top-k keys, top-k entries) so that they drop keys.
    family_check_len: int = 0
    # V4's layer checks run the whole layer; on a GPU, in bf16, a CSA selection that the bf16
    # projections reorder at the k-th entry (kernel and eager differently: their compressors round
    # differently) would fail a check with no bug, so the GPU checks stop short of the top-k
    # (1040 tokens: 260 of 512 entries); the fp32 smoke and tests/test_compressed.py check it biting.
    compressed_check_len: int = 0
    family_check_batch: int = 1
    family_check_rows: int = 0

    def tier(self, section: str, length: int, batch: int, seq_q: int, target: Target | None = None) -> int:
        if family_of(section) != "dense":
            return self.family_tier(section, length, batch, seq_q, target)
        if section == "prefill":
            return 1 if length in self.core_lengths else 3
        if section == "train":
            return 1 if length == self.core_lengths[0] else 2 if length in self.core_lengths else 3
        core = batch in self.core_batches and length in self.core_cache_lens
        return 1 if core and seq_q == 1 else 2 if core else 3

    def family_tier(self, section: str, length: int, batch: int, seq_q: int, target: Target | None) -> int:
        """Tier 1: the point a family is deployed for, on its main target (DSA: 128 heads, a 16k
        prompt, a batch of 64 over 32k-token FP8 caches, one new token; V4: the CSA layer at 4k
        tokens and that decode batch). One tier later: the secondary targets (the bf16 cache, 16
        heads; HCA and sliding layers), other lengths, two new tokens, training; tier 3 at most."""
        core = length == (
            self.sparse_core_length if section.startswith("sparse") else self.compressed_core_length
        )
        if section.endswith("prefill"):
            tier = 1 if core else 2
        elif section.endswith("train"):
            tier = 2 if core else 3
        elif batch == self.family_core_batch:
            tier = 1 if length == max(self.family_decode_cache_lens) and seq_q == 1 else 2
        else:
            tier = 3
        return min(3, tier + (target.rank - 1 if target else 0))


GPU_GRID = Grid(
    lengths=(1024, 4096, 16384),
    tokens_per_batch=16384,
    decode_batches=(1, 16, 64, 128),
    decode_cache_lens=(1024, 4096, 32768),
    new_tokens=(1, 2),
    core_lengths=(4096, 16384),
    core_batches=(64, 128),
    core_cache_lens=(4096, 32768),
    check_len=400,
    check_batch=2,
    decode_check_len=1008,
    decode_check_batch=3,
    decode_checked_sequences=2,
    family_lengths=(4096, 16384),
    sparse_core_length=16384,
    compressed_core_length=4096,
    family_decode_batches=(1, 16, 64),
    family_decode_cache_lens=(4096, 32768),
    family_core_batch=64,
    family_check_len=2112,  # > DeepSeek-V3.2's top 2048 keys (the indexer and attention judged apart)
    compressed_check_len=1040,  # 8 HCA windows, 260 CSA entries, the 128-token window many times
    family_check_batch=1,
    family_check_rows=128,
)
SMOKE_GRID = Grid(
    lengths=(40,),
    tokens_per_batch=80,
    decode_batches=(2,),
    decode_cache_lens=(24, 70),
    new_tokens=(1, 2),
    core_lengths=(40,),
    core_batches=(2,),
    core_cache_lens=(24, 70),
    check_len=21,
    check_batch=2,
    decode_check_len=37,
    decode_check_batch=3,
    decode_checked_sequences=2,
    family_lengths=(24,),
    family_tokens_per_batch=24,  # one sequence: the interpreter runs the layers' backward slowly
    sparse_core_length=24,
    compressed_core_length=24,
    family_decode_batches=(2,),
    family_decode_cache_lens=(30,),
    family_core_batch=2,
    family_check_len=29,  # > tiny_dsa's top 8 keys, tiny_compressed_csa's 3 entries (+ 4 open), 3 HCA windows of 8
    compressed_check_len=29,
    family_check_batch=1,
    family_check_rows=29,
)


@dataclass(frozen=True, slots=True)
class Point:
    section: str  # prefill, train or decode
    target: Target
    batch: int
    length: int  # sequence length, or cache length per sequence for decode
    seq_q: int  # decode: new tokens per sequence
    tier: int

    @property
    def label(self) -> str:
        text = f"{self.section} {self.target.label} B={self.batch} "
        if is_decode(self.section):
            return text + f"cache={self.length} new={self.seq_q}"
        return text + f"S={self.length}"


@dataclass(frozen=True, slots=True)
class Check:
    target: Target
    role: str  # forward, backward or decode
    seq_q: int = 1

    @property
    def name(self) -> str:
        if self.role.endswith("decode"):
            return f"{self.target.label} {self.role}, {self.seq_q} new token{'s' * (self.seq_q > 1)}"
        return f"{self.target.label} {self.role}"


def grid_points(grid: Grid) -> list[Point]:
    """Every point, tier 1 first; within a tier prefill, decode, then training (the costliest:
    backward compiles), each in grid order."""
    points = []
    for target in PREFILL_TARGETS:
        for length in grid.lengths:
            batch = max(1, grid.tokens_per_batch // length)
            points.append(Point("prefill", target, batch, length, 1, grid.tier("prefill", length, batch, 1)))
    for target in DECODE_TARGETS:
        for batch in grid.decode_batches:
            for length in grid.decode_cache_lens:
                for seq_q in grid.new_tokens:
                    tier = grid.tier("decode", length, batch, seq_q)
                    points.append(Point("decode", target, batch, length, seq_q, tier))
    for target in PREFILL_TARGETS:
        for length in grid.lengths:
            batch = max(1, grid.tokens_per_batch // length)
            points.append(Point("train", target, batch, length, 1, grid.tier("train", length, batch, 1)))
    points += family_points(grid)
    # Stable: grid order within a tier, training (backward compiles, the costliest) last.
    return sorted(points, key=lambda p: (p.tier, p.section.endswith("train")))


def family_points(grid: Grid) -> list[Point]:
    """DeepSeek Sparse Attention, then DeepSeek-V4: prefill, decode, training of each."""
    points = []
    for family, prefill_targets, decode_targets in (
        ("sparse", SPARSE_TARGETS, SPARSE_DECODE_TARGETS),
        ("compressed", COMPRESSED_TARGETS, COMPRESSED_TARGETS),
    ):
        for section, targets in (
            (f"{family}-prefill", prefill_targets),
            (f"{family}-decode", decode_targets),
            (f"{family}-train", prefill_targets),
        ):
            for target in targets:
                if is_decode(section):
                    for batch in grid.family_decode_batches:
                        for length in grid.family_decode_cache_lens:
                            for seq_q in grid.new_tokens:
                                tier = grid.tier(section, length, batch, seq_q, target)
                                points.append(Point(section, target, batch, length, seq_q, tier))
                    continue
                for length in grid.family_lengths:
                    batch = max(1, grid.family_tokens_per_batch // length)
                    points.append(
                        Point(section, target, batch, length, 1, grid.tier(section, length, batch, 1, target))
                    )
    return points


def grid_checks(grid: Grid) -> list[Check]:
    checks = [Check(t, role) for t in CHECK_TARGETS for role in ("forward", "backward")]
    checks += [Check(t, "decode", seq_q) for t in DECODE_CHECK_TARGETS for seq_q in grid.new_tokens]
    checks += [Check(t, role) for t in SPARSE_TARGETS for role in ("sparse-forward", "sparse-backward")]
    checks += [Check(t, "sparse-decode", seq_q) for t in SPARSE_DECODE_TARGETS for seq_q in grid.new_tokens]
    for target in COMPRESSED_TARGETS:
        checks += [Check(target, role) for role in ("compressed-forward", "compressed-backward")]
        checks += [Check(target, "compressed-decode", seq_q) for seq_q in grid.new_tokens]
    return checks


def required_checks(point: Point) -> tuple[Check, ...]:
    """The correctness checks that mlagen's timing at this point relies on."""
    family = family_of(point.section)
    role = "" if family == "dense" else f"{family}-"
    if is_decode(point.section):
        return (Check(point.target, f"{role}decode", point.seq_q),)
    if point.section.endswith("train"):
        return (Check(point.target, f"{role}forward"), Check(point.target, f"{role}backward"))
    return (Check(point.target, f"{role}forward"),)


# --- the generated packages and shapes of a target ------------------------------------------------------


class Targets:
    """Specs and generated packages, loaded once per spec; a target's dims for this run."""

    def __init__(self, smoke: bool, generated: str | Path):
        self.smoke, self.generated = smoke, generated
        self._specs: dict[str, object] = {}
        self._packages: dict[str, object] = {}

    def spec_name(self, target: Target) -> str:
        return target.smoke_spec if self.smoke else target.spec

    def spec(self, target: Target):
        from mlagen.spec import load_spec

        name = self.spec_name(target)
        if name not in self._specs:
            path = SPECS_DIR / f"{name}.yaml"
            if not path.is_file():
                raise MlagenError(f"the GPU suite needs {path}; run it from an mlagen checkout")
            self._specs[name] = load_spec(path)
        return self._specs[name]

    def package(self, target: Target):
        import mlagen

        name = self.spec_name(target)
        if name not in self._packages:
            self._packages[name] = mlagen.load(SPECS_DIR / f"{name}.yaml", self.generated)
        return self._packages[name]

    def dims(self, target: Target, *, check: bool = False) -> AttentionDims:
        dims = AttentionDims.from_spec(self.spec(target))
        if self.smoke and target.smoke_heads:
            dims = replace(dims, heads_q=target.smoke_heads[0], heads_k=target.smoke_heads[1])
        if check and not self.smoke and target.check_window:
            dims = replace(dims, window=target.check_window)
        return dims

    def decode_heads(self, target: Target) -> int:
        if self.smoke and target.smoke_heads:
            return target.smoke_heads[0]
        return target.heads or self.spec(target).heads


class SuiteCase:
    """One point's problems, built on first use and shared by its contenders; it answers
    what runner.run_contender asks of a case (batch, length, dtype, device, problem(kind))."""

    def __init__(self, point: Point, targets: Targets, grid: Grid, dtype, device, caches: dict):
        self.point, self.targets, self.grid = point, targets, grid
        self.batch, self.length, self.dtype, self.device = point.batch, point.length, dtype, device
        self._caches = caches
        self._built: dict[str, object] = {}

    def problem(self, kind: str):
        if kind not in self._built:
            self._built[kind] = self._build(kind)
        return self._built[kind]

    def _build(self, kind: str):
        p, t = self.point, self.targets
        if kind in ("sparse", "dense", "compressed") or p.section == "sparse-decode":
            return self._build_family(kind)
        if kind == "attention":
            return AttentionProblem(
                t.dims(p.target),
                p.batch,
                p.length,
                self.dtype,
                self.device,
                train=p.section == "train",
                check_rows=CHECK_ROWS[self.device.type],
            )
        assert kind == "absorbed", kind
        spec = t.spec(p.target)
        # Decode points differ in heads and new tokens over the same caches: build each once.
        key = (spec.kv_lora_rank, spec.qk_rope_head_dim, spec.page_size, p.batch, p.length)
        if key not in self._caches:
            self._caches[key] = filled_cache(spec, p.batch, p.length, self.dtype, self.device)
        inputs = DecodeInputs(
            spec,
            p.batch,
            p.length,
            self.dtype,
            self.device,
            p.seq_q,
            heads=t.decode_heads(p.target),
            cache=self._caches[key],
            check_batch=self.grid.decode_checked_sequences,
        )
        return AbsorbedDecodeProblem(inputs)

    def _build_family(self, kind: str):
        from mlagen.bench import families

        p, t = self.point, self.targets
        spec, package = t.spec(p.target), t.package(p.target)
        train = p.section.endswith("train")
        rows = CHECK_ROWS[self.device.type]
        if kind == "compressed":
            if is_decode(p.section):
                return families.CompressedDecodeProblem(
                    spec,
                    package,
                    p.batch,
                    p.length,
                    p.seq_q,
                    self.dtype,
                    self.device,
                    self.grid.decode_checked_sequences,
                )
            return families.CompressedPrefillProblem(
                spec,
                package,
                p.batch,
                p.length,
                self.dtype,
                self.device,
                train=train,
                check_len=CHECK_PREFIX[self.device.type],
            )
        if not is_decode(p.section):
            if kind == "sparse":
                return families.SparsePrefillProblem(
                    spec, package, p.batch, p.length, self.dtype, self.device, train=train, check_rows=rows
                )
            dense = p.target.dense
            problem = AttentionProblem(
                t.dims(dense), p.batch, p.length, self.dtype, self.device, train=train, check_rows=rows
            )
            problem.package = t.package(dense)  # the dense contender runs that spec's kernel
            return problem
        # Sparse decode: one cache per (batch, length, cache dtype), shared by heads and new tokens.
        key = ("sparse", spec.name, p.batch, p.length, p.target.cache_dtype)
        if key not in self._caches:
            self._caches[key] = families.filled_sparse_cache(
                spec, p.batch, p.length, self.dtype, self.device, p.target.cache_dtype
            )
        cache = self._caches[key]
        heads = t.decode_heads(p.target)
        if kind == "sparse":
            return families.SparseDecodeProblem(
                spec,
                package,
                cache,
                p.seq_q,
                heads,
                self.dtype,
                self.device,
                self.grid.decode_checked_sequences,
            )
        inputs = DecodeInputs(
            spec,
            p.batch,
            p.length,
            self.dtype,
            self.device,
            p.seq_q,
            heads=heads,
            cache=cache,
            check_batch=self.grid.decode_checked_sequences,
        )
        return AbsorbedDecodeProblem(inputs)


# --- estimates ---------------------------------------------------------------------------------------

# Seconds of a contender's first call in a shape family (compiles, autotuning, cuDNN plans), and
# the fraction of the roofline it is assumed to reach: rough figures for an H100, there to plan
# and trim the grid, never reported as results. Measured first calls replace them as the run goes.
# mlagen's kernels are compiled by the correctness checks, which specialise like the timed shapes.
FIRST_CALL_S = {
    ("mlagen", "prefill"): 1.0,
    ("mlagen", "train"): 2.0,
    ("mlagen", "decode"): 2.0,
    ("flex", "prefill"): 12.0,
    ("flex", "train"): 30.0,
    ("baseline", "prefill"): 5.0,
    ("baseline", "train"): 12.0,
    ("sdpa-cudnn", "prefill"): 1.0,
    ("sdpa-cudnn", "train"): 2.0,
    # The families' checks compile their kernels at a shape that specialises like the timed ones;
    # what is left is the pipeline's torch ops and, for decode, the cache-reading variants.
    ("mlagen", "sparse-prefill"): 1.0,
    ("mlagen", "sparse-train"): 2.0,
    ("mlagen", "sparse-decode"): 1.0,
    ("dense-mlagen", "sparse-prefill"): 1.0,
    ("dense-mlagen", "sparse-train"): 2.0,
    ("dense-mlagen", "sparse-decode"): 2.0,
    ("mlagen", "compressed-prefill"): 2.0,
    ("mlagen", "compressed-train"): 3.0,
    ("mlagen", "compressed-decode"): 2.0,
    ("reference", "compressed-prefill"): 1.0,
    ("reference", "compressed-train"): 2.0,
    ("reference", "compressed-decode"): 1.0,
}
OTHER_FIRST_CALL_S = 0.3
ROOFLINE_GUESS = {
    "mlagen": 0.3,
    "sdpa-flash": 0.45,
    "sdpa-cudnn": 0.55,
    "sdpa-efficient": 0.25,
    "flex": 0.35,
    "baseline": 0.4,
    "sdpa-latent": 0.05,
    "flashmla": 0.6,
    "flashinfer": 0.6,
    "dense-mlagen": 0.3,
    "reference": 0.03,  # eager torch: materialised scores, a Python loop over the sequences in decode
    "flashmla-sparse": 0.5,
    "flashmla-model1": 0.5,
}
TRAIN_SLOWDOWN = 1.5  # backward kernels reach less of the roofline than forward ones
CALLS_PER_MEASUREMENT = 11  # check, do_bench's 5-call estimate, warmup and timed runs of a slow kernel
OVERHEAD_S = 0.15  # per record: allocations, the check's comparison, launches
GOLDEN_S = {
    "prefill": 0.2,
    "train": 0.6,
    "decode": 0.1,
    "sparse-prefill": 0.3,
    "sparse-train": 0.8,
    "sparse-decode": 0.2,
    "compressed-prefill": 1.0,  # an fp64 copy of the layer (about 0.15 billion weights) and its reference
    "compressed-train": 2.0,
    "compressed-decode": 1.0,
}
PAGE_WRITE_S = 20e-6  # building a decode cache writes its page table one page at a time
# The first call of each kernel: its compile (the families compile several kernels per check:
# indexer, top-k, sparse attention; compressors, indexer, attention), and their fp64 goldens.
CHECK_S = {
    "forward": 4.0,
    "backward": 10.0,
    "decode": 4.0,
    "sparse-forward": 8.0,
    "sparse-backward": 10.0,
    "sparse-decode": 6.0,
    "compressed-forward": 12.0,  # four kernels: two compressors, the indexer, the attention
    "compressed-backward": 20.0,
    "compressed-decode": 8.0,  # their cache-reading variants
}
RECHECK_S = 1.5  # a decode check with more new tokens: its kernels are compiled already
REFUSAL_S = 0.05  # a contender that already refused a family refuses again at once
SMOKE_RECORD_S = {"mlagen": 0.5}  # under the interpreter only the Triton kernels are slow
SMOKE_OTHER_S = 0.05
SMOKE_CHECK_S = 0.5


def _optional_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def probe_contenders() -> dict[str, str | None]:
    """Contenders known not to run before anything is tried (None: may run); the reason is
    recorded at every point anyway, by the contender itself."""
    return {
        "baseline": None if _optional_module("mlagen.bench.baseline") else "not in this checkout",
        "flashmla": None if _optional_module("flash_mla") else "not installed",
        "flashmla-sparse": None if _optional_module("flash_mla") else "not installed",
        "flashmla-model1": None if _optional_module("flash_mla") else "not installed",
        "flashinfer": None if _optional_module("flashinfer") else "not installed",
    }


def family_work(point: Point, targets: Targets, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) of mlagen's contender at a family point, as its problem counts them."""
    from mlagen.bench import families

    spec = targets.spec(point.target)
    if point.section.startswith("sparse"):
        if is_decode(point.section):
            return families.sparse_decode_work(
                spec,
                targets.decode_heads(point.target),
                point.batch,
                point.length,
                point.seq_q,
                elem,
                point.target.cache_dtype == "fp8",
            )
        return families.sparse_prefill_work(
            spec, point.batch, point.length, elem, point.section.endswith("train")
        )
    start, count = (
        (point.length - point.seq_q, point.seq_q) if is_decode(point.section) else (0, point.length)
    )
    attention, indexer = families.compressed_attention_work(spec, point.batch, start, count)
    weights = families.compressed_weights(spec)
    linears = 2.0 * point.batch * count * weights
    if point.section.endswith("train"):
        return attention * 3.5 + 3 * linears + indexer, 3.0 * elem * (
            weights + 2 * point.batch * count * spec.d_model
        )
    return attention + indexer + linears, float(elem * (weights + 2 * point.batch * count * spec.d_model))


@dataclass(slots=True)
class Estimator:
    smoke: bool
    gpu: GpuPeak
    dtype_name: str
    elem: int
    timing: TimingMethod
    absent: set[str]  # contenders that will only record why not
    learned: dict[tuple[str, str], float] = field(default_factory=dict)  # measured first calls
    families: set[tuple] = field(default_factory=set)  # (contender, section, family) seen
    refused: set[tuple] = field(default_factory=set)  # families a contender said it cannot run
    caches: set[tuple] = field(default_factory=set)  # decode caches planned as built

    def work(self, point: Point, targets: Targets) -> tuple[float, float]:
        if family_of(point.section) != "dense":
            return family_work(point, targets, self.elem)
        if point.section == "decode":
            heads = targets.decode_heads(point.target)
            spec = targets.spec(point.target)
            return absorbed_decode_work(spec, heads, point.batch, point.length, point.seq_q, self.elem)
        dims = targets.dims(point.target)
        return attention_work(dims, point.batch, point.length, self.elem, point.section == "train")

    def family(self, name: str, point: Point, targets: Targets) -> tuple:
        if family_of(point.section) != "dense":  # each target (and cache dtype) compiles its own kernels
            return (name, point.section, point.target.label)
        if point.section == "decode":
            return (name, "decode", targets.decode_heads(point.target) * point.seq_q)
        d = targets.dims(point.target)
        return (name, point.section, d.dim_qk, d.dim_v, d.heads_q != d.heads_k)

    def record_seconds(self, name: str, point: Point, targets: Targets) -> float:
        if name in self.absent:
            return 0.0
        if self.smoke:
            return SMOKE_RECORD_S.get(name, SMOKE_OTHER_S)
        family = self.family(name, point, targets)
        if family in self.refused:
            return REFUSAL_S
        seconds = OVERHEAD_S
        if family not in self.families:
            seconds += self.learned.get(
                (name, point.section), FIRST_CALL_S.get((name, point.section), OTHER_FIRST_CALL_S)
            )
        flops, nbytes = self.work(point, targets)
        fraction = ROOFLINE_GUESS.get(name, 0.3) / (
            TRAIN_SLOWDOWN if point.section.endswith("train") else 1.0
        )
        ideal = self.gpu.ideal_seconds(flops, nbytes, self.dtype_name)
        if ideal is None:  # a dtype without a listed peak (fp32): plan with a tenth of bf16's
            ideal = max(nbytes / self.gpu.bandwidth, flops / (0.1 * self.gpu.flops["bf16"]))
        kernel = ideal / fraction
        window = (self.timing.warmup + self.timing.rep) / 1e3
        return seconds + max(1.5 * window, CALLS_PER_MEASUREMENT * kernel)

    def point_seconds(self, point: Point, targets: Targets, contenders: tuple[Contender, ...]) -> float:
        if self.smoke:
            return sum(self.record_seconds(c.name, point, targets) for c in contenders)
        seconds = GOLDEN_S[point.section]
        cache_key = (point.section, point.target.cache_dtype, point.batch, point.length)
        if is_decode(point.section) and cache_key not in self.caches:
            seconds += point.batch * -(-point.length // 64) * PAGE_WRITE_S
        return seconds + sum(self.record_seconds(c.name, point, targets) for c in contenders)

    def check_seconds(self, check: Check) -> float:
        if self.smoke:
            return SMOKE_CHECK_S
        return RECHECK_S if check.role.endswith("decode") and check.seq_q > 1 else CHECK_S[check.role]

    def plan(self, point: Point, targets: Targets, contenders: tuple[Contender, ...]) -> float:
        """The point's estimate, then count its compiles and caches as done (for the next points)."""
        seconds = self.point_seconds(point, targets, contenders)
        self.seen(point, targets, contenders)
        return seconds

    def seen(self, point: Point, targets: Targets, contenders: tuple[Contender, ...]) -> None:
        self.families.update(self.family(c.name, point, targets) for c in contenders)
        if is_decode(point.section):
            self.caches.add((point.section, point.target.cache_dtype, point.batch, point.length))

    def learn(self, record: dict, point: Point, targets: Targets) -> None:
        """Measured first calls replace the guesses; a refusal makes the family cheap to ask again."""
        first = record.get("first_call_s")
        key = (record["contender"], point.section)
        if first is not None and first > self.learned.get(key, 0.0):
            self.learned[key] = first
        if record["status"] == "unavailable":
            self.refused.add(self.family(record["contender"], point, targets))


# --- the correctness phase -------------------------------------------------------------------------

# The suite's "small atol" scales with each output: two rounding steps of the dtype at the
# output's largest value. An absolute atol either swamps small outputs (attention over 16k keys
# averages to about 0.02) or fails large gradients; a broken kernel's error is of the order of
# the values themselves, far above either.
ATOL_SCALE = {"bf16": 2.0**-6, "fp16": 2.0**-9, "fp32": 1e-5}


def _mlagen(contenders: tuple[Contender, ...]) -> Contender:
    return next(c for c in contenders if c.name == "mlagen")


def run_check(
    check: Check, targets: Targets, grid: Grid, dtype_name: str, device: torch.device, smoke: bool
) -> dict:
    """One kernel at the check shape against the fp64 golden: its JSON record."""
    dtype = DTYPES[dtype_name]
    record: dict = dict(
        name=check.name,
        target=check.target.label,
        role=check.role,
        seq_q=check.seq_q,
        spec=targets.spec_name(check.target),
        status="error",
        reason=None,
        shape=None,
        worst_output=None,
        max_error=None,
        eager_error=None,
        tolerance=None,
        relative_error=None,
        seconds=None,
    )
    started = time.perf_counter()
    try:
        torch.manual_seed(1)
        env = Env(targets.package(check.target), device, smoke)
        if family_of(check.role) != "dense":
            problem, contender, judged = _family_check(check, targets, grid, dtype, device)
            names = problem.output_names
            record["shape"] = problem.shape()
            outputs = contender.prepare(problem, env).check()
            golden, eager = problem.expected(torch.float64), problem.expected(dtype)
            outputs, golden, eager, names = outputs[judged], golden[judged], eager[judged], names[judged]
            verdict = compare(outputs, golden, eager, names, atol_scale=ATOL_SCALE[dtype_name])
            return _verdict(record, verdict, device, started)
        if check.role == "decode":
            spec = targets.spec(check.target)
            inputs = DecodeInputs(
                spec,
                grid.decode_check_batch,
                grid.decode_check_len,
                dtype,
                device,
                check.seq_q,
                heads=targets.decode_heads(check.target),
            )
            problem = AbsorbedDecodeProblem(inputs)
            contender = _mlagen(SUITE_DECODE_CONTENDERS)
        else:
            problem = AttentionProblem(
                targets.dims(check.target, check=True),
                grid.check_batch,
                grid.check_len,
                dtype,
                device,
                train=check.role == "backward",
                check_rows=grid.check_len,
            )
            contender = _mlagen(SUITE_ATTENTION_CONTENDERS)
        names = problem.output_names
        record["shape"] = problem.shape()
        outputs = contender.prepare(problem, env).check()
        golden, eager = problem.expected(torch.float64), problem.expected(dtype)
        if check.role == "backward":  # the forward output has its own check
            outputs, golden, eager, names = outputs[1:], golden[1:], eager[1:], names[1:]
        verdict = compare(outputs, golden, eager, names, atol_scale=ATOL_SCALE[dtype_name])
        return _verdict(record, verdict, device, started)
    except Exception as exc:
        record["reason"] = _reason(exc, [])
    record["seconds"] = time.perf_counter() - started
    _free_memory(device)
    return record


def _verdict(record: dict, verdict: dict, device: torch.device, started: float) -> dict:
    passed = verdict.pop("passed")
    record.update(verdict, status="pass" if passed else "fail")
    if not passed:
        if record["max_error"] is None:
            record["reason"] = f"{record['worst_output'] or 'outputs'}: NaN/inf or the wrong shape"
        else:
            record["reason"] = (
                f"{record['worst_output']}: max error {record['max_error']:.3g} > tolerance "
                f"{record['tolerance']:.3g}"
            )
    _synchronize(device)
    record["seconds"] = time.perf_counter() - started
    _free_memory(device)
    return record


def _family_check(
    check: Check, targets: Targets, grid: Grid, dtype, device
) -> tuple[object, Contender, slice]:
    """A family's kernel check: its problem at the check shape (longer than its selections), the
    mlagen contender, and which outputs it judges (a backward check: the gradients only)."""
    from mlagen.bench import families

    spec, package = targets.spec(check.target), targets.package(check.target)
    length, batch = grid.family_check_len, grid.family_check_batch
    if check.role.startswith("sparse"):
        contender = _mlagen(families.SPARSE_CONTENDERS)
        if check.role == "sparse-decode":
            cache = families.filled_sparse_cache(spec, 3, length, dtype, device, check.target.cache_dtype)
            problem = families.SparseDecodeProblem(
                spec, package, cache, check.seq_q, targets.decode_heads(check.target), dtype, device, 3
            )
            return problem, contender, slice(None)
        train = check.role == "sparse-backward"
        problem = families.SparsePrefillProblem(
            spec, package, batch, length, dtype, device, train=train, check_rows=grid.family_check_rows
        )
        return problem, contender, slice(3, None) if train else slice(None)
    contender = _mlagen(families.COMPRESSED_CONTENDERS)
    length = grid.compressed_check_len
    if check.role == "compressed-decode":
        problem = families.CompressedDecodeProblem(spec, package, 3, length, check.seq_q, dtype, device, 3)
        return problem, contender, slice(None)
    train = check.role == "compressed-backward"
    problem = families.CompressedPrefillProblem(
        spec, package, batch, length, dtype, device, train=train, check_len=length
    )
    return problem, contender, slice(1, None) if train else slice(None)


# --- the run -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuiteRequest:
    smoke: bool = False
    out: str | Path = "benchmarks"
    budget_s: float | None = None  # default: DEFAULT_BUDGET_S, or SMOKE_BUDGET_S with smoke
    device: str | None = None
    dtype: str | None = None
    generated: str | Path = "generated"
    report_file: str | Path | None = None  # where the BENCHMARKS.md section goes; None: nowhere

    @property
    def budget(self) -> float:
        if self.budget_s is not None:
            return self.budget_s
        return SMOKE_BUDGET_S if self.smoke else DEFAULT_BUDGET_S

    @property
    def command(self) -> str:
        words = ["mlagen", "bench", "--suite", "gpu"]
        if self.smoke:
            words.append("--smoke")
        if self.budget_s is not None:
            words += ["--budget-s", f"{self.budget_s:g}"]
        for flag, value in (("--device", self.device), ("--dtype", self.dtype)):
            if value is not None:
                words += [flag, value]
        if Path(self.out) != Path("benchmarks"):
            words += ["--out", str(self.out)]
        if Path(self.generated) != Path("generated"):
            words += ["--generated", str(self.generated)]
        return shlex.join(words)


@dataclass(frozen=True, slots=True)
class SuiteRun:
    path: Path
    data: dict


class Clock:
    """Seconds since the suite started, and the deadline of its budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def left(self) -> float:
        return self.budget - RESERVE_S - self.elapsed

    def stamp(self) -> str:
        return f"[{self.elapsed:6.1f}s {datetime.now().strftime('%H:%M:%S')}]"


def _write_json(path: Path, data: dict) -> None:
    """Atomically, so a run killed from outside leaves the last complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _contenders(section: str) -> tuple[Contender, ...]:
    from mlagen.bench import families

    family = family_of(section)
    if family == "sparse":
        return families.SPARSE_CONTENDERS
    if family == "compressed":
        return families.COMPRESSED_CONTENDERS
    return SUITE_DECODE_CONTENDERS if section == "decode" else SUITE_ATTENTION_CONTENDERS


def _cell(record: dict, section: str) -> str:
    """One contender at one point, for the progress line."""
    name = record["contender"]
    if record["status"] in ("ok", "invalid"):
        rate = f"{record['gbps']:.0f} GB/s" if is_decode(section) else f"{record['tflops']:.1f} TF/s"
        roof = record["roofline_fraction"]
        text = f"{name} {record['time_ms']:.3f} ms {rate}" + (f" {100 * roof:.0f}%" if roof else "")
        return text + (" INVALID" if record["status"] == "invalid" else "")
    return f"{name} {record['status']}"


def _plan_lines(
    plan: list[tuple[Point, float]], checks_s: float, budget: float, trimmed: set[Point]
) -> Iterator[str]:
    by_section: dict[str, float] = {}
    for point, seconds in plan:
        by_section[point.section] = by_section.get(point.section, 0.0) + seconds
    total = checks_s + sum(by_section.values())
    parts = [f"checks {checks_s:.0f} s"] + [f"{s} {by_section[s]:.0f} s" for s in SECTIONS if s in by_section]
    yield f"estimate: {', '.join(parts)}: {total:.0f} s of a {budget:.0f} s budget"
    if trimmed:
        tiers = sorted({p.tier for p in trimmed})
        yield (
            f"trimmed before the run to fit the budget: {len(trimmed)} points of tier {', '.join(map(str, tiers))} "
            "(measured last if time is left, else recorded as skipped)"
        )


def _skipped(contender: str, point: Point, reason: str) -> dict:
    record = empty_record(contender, point.batch, point.length)
    record.update(status="skipped", reason=reason)
    return record


@dataclass(slots=True)
class Session:
    """What one run carries from point to point."""

    request: SuiteRequest
    clock: Clock
    device: torch.device
    info: DeviceInfo
    dtype_name: str
    grid: Grid
    timing: TimingMethod
    targets: Targets
    estimator: Estimator
    failed_checks: dict[str, str] = field(default_factory=dict)  # check name -> why
    caches: dict = field(default_factory=dict)  # decode caches by (dims, batch, length)
    stopped: str | None = None


def _measure_point(session: Session, point: Point) -> list[dict]:
    """Every contender at one point: checked, then timed, unless the time left is too short."""
    s = session
    contenders = _contenders(point.section)
    try:
        env = Env(s.targets.package(point.target), s.device, s.request.smoke)
    except Exception as exc:  # a package that does not generate or import fails its point, not the run
        return [
            _skipped(c.name, point, "the generated package did not load: " + _reason(exc, []))
            for c in contenders
        ]
    case = SuiteCase(point, s.targets, s.grid, DTYPES[s.dtype_name], s.device, s.caches)
    torch.manual_seed(0)
    records = []
    for contender in contenders:
        needed = s.estimator.record_seconds(contender.name, point, s.targets)
        if needed > s.clock.left:
            left = max(s.clock.left, 0.0)
            records.append(
                _skipped(
                    contender.name,
                    point,
                    f"the time budget ran out (estimated {needed:.1f} s, {left:.1f} s left)",
                )
            )
            s.stopped = "the time budget ran out"
            continue
        record = run_contender(
            contender, case, env, s.dtype_name, s.info, 0.0, s.timing, atol_scale=ATOL_SCALE[s.dtype_name]
        )
        s.estimator.learn(record, point, s.targets)
        broken = [c.name for c in required_checks(point) if c.name in s.failed_checks]
        if contender.name == "mlagen" and record["status"] == "ok" and broken:
            why = "; ".join(f"{name}: {s.failed_checks[name]}" for name in broken)
            record.update(
                status="invalid", reason="timed, but the kernel failed its correctness check: " + why
            )
        records.append(record)
    s.estimator.seen(point, s.targets, contenders)
    del case
    _free_memory(s.device)
    return records


def make_plan(grid: Grid, targets: Targets, estimator: Estimator, seconds: float):
    """(the checks run before any timing, their seconds, every point's estimate in run order, the
    points kept, the points trimmed): the lowest tiers are dropped, last points first, until the
    checks and the points fit `seconds`. A check runs before the timing when a kept point relies on
    it or when no point does (checked, not timed); one that only trimmed points rely on runs
    before such a point if time is left for it, or at the end (runner: run_suite)."""
    checks = grid_checks(grid)
    estimates = {p: estimator.plan(p, targets, _contenders(p.section)) for p in grid_points(grid)}
    estimator.families.clear()
    estimator.caches.clear()
    relied_on = {c for p in estimates for c in required_checks(p)}

    def upfront(points: list[Point]) -> list[Check]:
        wanted = {c for p in points for c in required_checks(p)}
        return [c for c in checks if c in wanted or c not in relied_on]

    def total(points: list[Point]) -> float:
        return sum(estimator.check_seconds(c) for c in upfront(points)) + sum(estimates[p] for p in points)

    kept = list(estimates)
    while kept and total(kept) > seconds and kept[-1].tier > 1:
        kept.pop()  # points are in tier order: the lowest tier goes first
    first = upfront(kept)
    return first, sum(estimator.check_seconds(c) for c in first), estimates, kept, set(estimates) - set(kept)


def plan_for(gpu_name: str, budget_s: float | None = None, dtype_name: str = "bf16") -> list[str]:
    """The plan a GPU run would print on `gpu_name` (a known GPU, e.g. "NVIDIA H200"), made on
    any machine: per section and tier the points kept and their estimated seconds."""
    gpu = known_gpu(gpu_name)
    if gpu is None:
        raise MlagenError(f"--plan-for {gpu_name!r}: not a GPU the roofline table knows (e.g. 'NVIDIA H200')")
    budget = DEFAULT_BUDGET_S if budget_s is None else budget_s
    targets = Targets(False, "generated")
    absent = {name for name, reason in probe_contenders().items() if reason}
    estimator = Estimator(False, gpu, dtype_name, DTYPES[dtype_name].itemsize, SUITE_TIMING, absent)
    checks, checks_s, estimates, kept, trimmed = make_plan(GPU_GRID, targets, estimator, budget - RESERVE_S)
    lines = [
        f"plan for {gpu.name} ({gpu_name}), {dtype_name}, budget {budget:.0f} s; "
        f"contenders recorded as absent here: {', '.join(sorted(absent)) or 'none'}"
    ]
    lines += list(_plan_lines([(p, estimates[p]) for p in kept], checks_s, budget, trimmed))
    lines.append(
        f"{len(checks)} of {len(grid_checks(GPU_GRID))} kernel checks before the timing, {checks_s:.0f} s "
        "(the others only if time is left for the trimmed points that rely on them)"
    )
    lines.append("| section | tier | points kept | estimated s | points trimmed |")
    lines.append("|---|---:|---:|---:|---:|")
    for section in SECTIONS:
        for tier in (1, 2, 3):
            points = [p for p in estimates if p.section == section and p.tier == tier]
            if points:
                kept_here = [p for p in points if p not in trimmed]
                seconds = sum(estimates[p] for p in kept_here)
                lines.append(
                    f"| {section} | {tier} | {len(kept_here)} | {seconds:.1f} | {len(points) - len(kept_here)} |"
                )
    return lines


def run_suite(request: SuiteRequest, echo: Callable[[str], None] = print) -> SuiteRun:
    """Check, then time, everything side by side; write the JSON file (after every point), the
    roofline plot and, if asked, the BENCHMARKS.md section."""
    clock = Clock(request.budget)
    device = _choose_device(request.device, request.smoke)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any generated kernel is imported
    dtype_name = request.dtype or ("fp32" if device.type == "cpu" else "bf16")
    if device.type == "cpu" and dtype_name == "bf16":
        raise MlagenError(
            "bf16 kernels cannot run under the Triton interpreter; use --dtype fp32 or fp16 on CPU"
        )
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise MlagenError("TRITON_INTERPRET=1 is set: unset it to time the kernels on the GPU")
    grid = SMOKE_GRID if request.smoke else GPU_GRID
    timing = SUITE_SMOKE_TIMING if device.type == "cpu" else SUITE_TIMING
    info = describe(device)
    targets = Targets(request.smoke, request.generated)
    availability = probe_contenders()
    absent = {name for name, reason in availability.items() if reason}
    # An unknown GPU is planned as an H100 SXM: the estimate only orders and trims the work.
    planned_as = info.gpu or known_gpu("NVIDIA H100 80GB HBM3")
    estimator = Estimator(request.smoke, planned_as, dtype_name, DTYPES[dtype_name].itemsize, timing, absent)
    session = Session(request, clock, device, info, dtype_name, grid, timing, targets, estimator)

    # 1. The plan: estimates in run order (each family's compile counted once), trimmed to fit.
    checks, checks_s, estimates, kept, trimmed = make_plan(grid, targets, estimator, clock.left)

    out_dir = Path(request.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_suite_{info.slug}" + ("_smoke" if request.smoke else "")
    path = out_dir / f"{stem}.json"
    note = None
    if request.smoke:
        note = (
            "smoke run: test-sized stand-ins of every target on CPU under the Triton interpreter, in fp32; "
            "it checks the suite end to end and its times are NOT performance numbers"
        )
    data: dict = {
        "schema": SCHEMA,
        "smoke": request.smoke,
        "note": note,
        "state": "running",  # until the end: a file still saying so was cut off from outside
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": request.command,
        "device": info.to_json(),
        "versions": _versions(),
        "dtype": dtype_name,
        "timing": timing.to_json(),
        "correctness": {
            "rule": "for every output and gradient: max |kernel - fp64 golden| <= ratio x eager's error "
            "(the reference in the same dtype) + atol_scale x max |golden|",
            "ratio": ERROR_RATIO,
            "atol_scale": ATOL_SCALE[dtype_name],
        },
        "budget_s": request.budget,
        "estimated_s": checks_s + sum(estimates[p] for p in kept),
        "trimmed_points": len(trimmed),  # by the plan; those still skipped at the end, once done
        "elapsed_s": None,
        "contenders": {
            section: {c.name: c.description for c in _contenders(section)} for section in SECTIONS
        },
        "unavailable_before_running": {name: reason for name, reason in availability.items() if reason},
        "grid": {
            "prefill_targets": {t.label: targets.spec_name(t) for t in PREFILL_TARGETS},
            "decode_targets": {t.label: targets.spec_name(t) for t in DECODE_TARGETS},
            "lengths": list(grid.lengths),
            "tokens_per_batch": grid.tokens_per_batch,
            "decode_batches": list(grid.decode_batches),
            "decode_cache_lens": list(grid.decode_cache_lens),
            "new_tokens": list(grid.new_tokens),
            "sparse_targets": {t.label: targets.spec_name(t) for t in SPARSE_TARGETS + SPARSE_DECODE_TARGETS},
            "compressed_targets": {t.label: targets.spec_name(t) for t in COMPRESSED_TARGETS},
            "family_lengths": list(grid.family_lengths),
            "family_decode_batches": list(grid.family_decode_batches),
            "family_decode_cache_lens": list(grid.family_decode_cache_lens),
            "top_k": {
                "sparse": targets.spec(DSA).sparse.top_k,
                "compressed": targets.spec(V4_CSA).compression.indexer.top_k,
            },
        },
        "checks": [],
        "results": [],
        "plot": {"file": None, "note": "not drawn yet"},
    }

    where = info.name + (f" (sm_{info.capability.replace('.', '')})" if info.capability else "")
    echo(f"{clock.stamp()} GPU suite on {where}, {dtype_name}, budget {request.budget:.0f} s -> {path}")
    if note:
        echo(note)
    count = {section: sum(1 for p in kept if p.section == section) for section in SECTIONS}
    echo(
        f"plan: {len(checks)} kernel checks; {count['prefill']} prefill and {count['train']} training points x "
        f"{len(SUITE_ATTENTION_CONTENDERS)} contenders; {count['decode']} decode points x "
        f"{len(SUITE_DECODE_CONTENDERS)} contenders; DSA {count['sparse-prefill']} prefill, "
        f"{count['sparse-train']} training, {count['sparse-decode']} decode and DeepSeek-V4 "
        f"{count['compressed-prefill']} prefill, {count['compressed-train']} training, "
        f"{count['compressed-decode']} decode points x 3 contenders"
    )
    if absent:
        echo("will record why not: " + ", ".join(f"{n} ({availability[n]})" for n in sorted(absent)))
    for line in _plan_lines([(p, estimates[p]) for p in kept], checks_s, request.budget, trimmed):
        echo(line)
    _write_json(path, data)

    done: set[Check] = set()

    def check_now(check: Check, why_not: str = "the time budget ran out before this check") -> None:
        if clock.left < estimator.check_seconds(check):
            record = dict(name=check.name, target=check.target.label, role=check.role, seq_q=check.seq_q)
            record.update(status="skipped", reason=why_not)
            session.stopped = "the time budget ran out"
        else:
            record = run_check(check, targets, grid, dtype_name, device, request.smoke)
        done.add(check)
        data["checks"].append(record)
        if record["status"] != "pass":
            session.failed_checks[check.name] = record["reason"] or record["status"]
        shown = ""
        if record.get("max_error") is not None:
            shown = f", {record['worst_output']} max error {record['max_error']:.3g} (tolerance {record['tolerance']:.3g})"
        why = f" ({record['reason']})" if record["reason"] else ""
        echo(f"{clock.stamp()} check {check.name}: {record['status'].upper()}{shown}{why}")

    # 2. Correctness, before any timing: every check a kept point relies on.
    for check in checks:
        check_now(check)
    _write_json(path, data)

    # 3. Timing, tier by tier (the trimmed points last: they run, after the checks they rely on,
    # if the plan was pessimistic and time is left); the file is rewritten after every point.
    skipped_trimmed = 0
    for point in estimates:
        contenders = _contenders(point.section)
        pending = [c for c in required_checks(point) if c not in done]
        needed = estimator.point_seconds(point, targets, contenders) + sum(
            estimator.check_seconds(c) for c in pending
        )
        if point in trimmed and needed > clock.left:
            reason = f"trimmed before the run to fit the {request.budget:.0f} s budget (tier {point.tier})"
            records = [_skipped(c.name, point, reason) for c in contenders]
            skipped_trimmed += 1
        else:
            for check in pending:
                check_now(check)
            records = _measure_point(session, point)
            echo(f"{clock.stamp()} {point.label}: " + " | ".join(_cell(r, point.section) for r in records))
        for record in records:
            record.update(
                section=point.section, target=point.target.label, seq_q=point.seq_q, tier=point.tier
            )
        data["results"].extend(records)
        data["elapsed_s"] = clock.elapsed
        _write_json(path, data)

    session.caches.clear()
    _free_memory(device)
    # Every kernel is checked if time is left, those of trimmed points too.
    for check in grid_checks(grid):
        if check not in done:
            check_now(
                check, "the time budget ran out before this check (the points relying on it were trimmed)"
            )
    data["state"] = f"stopped early: {session.stopped}" if session.stopped else "finished"
    data["trimmed_points"] = skipped_trimmed
    data["elapsed_s"] = clock.elapsed
    data["plot"] = _plot(data, out_dir / f"{stem}_roofline.png")
    _write_json(path, data)
    statuses: dict[str, int] = {}
    for record in data["results"]:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    passed = sum(1 for c in data["checks"] if c["status"] == "pass")
    echo(
        f"{clock.stamp()} {data['state']}: checks {passed}/{len(data['checks'])} pass; records "
        + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    )
    echo(f"wrote {path}")
    if data["plot"]["file"]:
        echo(f"wrote {out_dir / data['plot']['file']}")
    else:
        echo(f"no roofline plot: {data['plot']['note']}")
    if request.report_file is not None:
        from mlagen.bench.report import write_report

        echo(f"wrote {write_report(out_dir, request.report_file)}")
    return SuiteRun(path, data)


def _plot(data: dict, path: Path) -> dict:
    """The roofline PNG, or why there is none (matplotlib is optional on the GPU machine)."""
    from mlagen.bench.plot import write_suite_roofline

    try:
        write_suite_roofline(data, path)
    except MlagenError as exc:
        return {"file": None, "note": str(exc)}
    return {"file": path.name, "note": None}
