"""The arch matrix: every kernel of every shipped spec, compiled as launched (mlagen.aot: the
generated launchers called on meta tensors, Triton's own specialisation, the runtime's
default config for that arch and dtype; `mlagen inspect`'s rows, sparse and compressed
layers included) for sm_80, sm_89, sm_90, sm_100 and sm_120, in bf16,
fp16 and fp32 (tf32 dots; the sparse and compressed layers in bf16 and fp16). No GPU needed: Triton compiles for a GPUTarget and cuobjdump reads
the cubin.

Every kernel must compile without spilling, within the arch's shared memory, and the matmul
kernels must run on that arch's tensor cores (HMMA on sm_80/89/120, HGMMA on sm_90, tcgen05
UTC*MMA on sm_100). What today's kernels miss is listed in GAPS, each with the reason: the
test fails both on a new miss and on a listed one that no longer happens (then delete it).

One compile session for the whole matrix: a kernel several specs launch alike is compiled
once, and readings persist in pytest's cache directory between runs (cold: about 8 minutes
on 2 cores, warm: seconds)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from mlagen import aot, autotune, family_calls
from mlagen.autotune import Shape
from mlagen.inspect_kernels import inspect_specs
from mlagen.runtime.launch import BlockConfig
from mlagen.spec import load_spec
from tests.helpers import SPECS

SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml") if not p.stem.startswith("tiny_"))
ARCHS = list(aot.ARCHS)
DTYPES = ("bf16", "fp16", "fp32")
FAMILY_DTYPES = ("bf16", "fp16")
SHAPE = Shape(1, 4096)  # prefill 4096 tokens; decode one new token over 4096 cached
MATMUL_ROLES = ("forward", "backward_dkdv", "backward_dq", "decode")

# The roles of the sparse and compressed kernels (mlagen.family_calls) that run dots. Whether
# those are all on the arch's own tensor-core instruction is tests/test_sparse_compile.py's and
# tests/test_compressed_compile.py's to say (with their own GAPS); here they need tensor cores.
FAMILY_MATMUL_ROLES = ("forward", "backward", "decode", "indexer", "decode_indexer")

# (kernel role, dtypes, archs) -> why. Today's kernel bodies (issue 15, items 4 and 5, rewrite them):
GAPS = {
    # MLA's fp32 dK/dV (192 + 128 wide accumulators) spills at the 64 held keys wgmma and
    # tcgen05 need, so fp32 MLA keeps 32-row tiles: mma.sync there
    ("backward_dkdv", "fp32", "sm_90 sm_100"): "mma.sync: MLA's fp32 backward holds 32 rows",
    ("backward_dq", "fp32", "sm_90 sm_100"): "mma.sync: MLA's fp32 backward holds 32 rows",
    # fp32: 64-row decode tiles spill (Q and the latent tile are twice as wide); 32 rows fit
    ("decode", "fp32", "sm_90 sm_100"): "mma.sync: 32 (token, head) rows per program in fp32",
}


def _gap_table() -> dict[tuple[str, str, str], str]:
    return {
        (role, dtype, arch): why
        for (role, dtypes, archs), why in GAPS.items()
        for dtype in dtypes.split()
        for arch in archs.split()
    }


@pytest.fixture(scope="module")
def matrix(compile_cache):
    """Every launched kernel's reading: KernelRows of inspect_specs over the whole matrix. The
    sparse and compressed layers in bf16 and fp16: tests/test_sparse_compile.py and
    test_compressed_compile.py launch the same calls among theirs, so with the readings shared
    (compile_cache) each compiles once. fp32 would add about 140 kernels no test compiles yet
    (3 to 4 minutes on CI's 2 cores), and not all fit today: fp32 sparse MLA takes 172 KB of
    shared memory, more than a 99 KB part (sm_89, sm_120) has (`mlagen inspect SPEC --dtype
    fp32`)."""
    specs = [load_spec(SPECS / f"{name}.yaml") for name in SHIPPED]
    dense = [spec for spec in specs if not family_calls.family_uses(spec)]
    layers = [spec for spec in specs if family_calls.family_uses(spec)]
    return inspect_specs(dense, ARCHS, SHAPE, dtypes=list(DTYPES), workers=2) + inspect_specs(
        layers, ARCHS, SHAPE, dtypes=list(FAMILY_DTYPES), workers=2
    )


def _problems(row) -> list[str]:
    c, limit = row.compiled, aot.ARCHS[row.arch].smem_per_block
    if c.error:
        return [f"compile failed: {c.error}"]
    found = []
    if c.spill_bytes:
        found.append(f"spills {c.spill_bytes} B")
    if c.shared_bytes > limit:
        found.append(f"over {limit // 1024} KB of shared memory ({c.shared_bytes / 1024:.0f} KB)")
    if not 0 < c.registers <= 255:
        found.append(f"{c.registers} registers")
    if row.use is None:  # a sparse or compressed kernel
        if row.role in FAMILY_MATMUL_ROLES and not c.tensor_core_ops:
            found.append("no tensor-core instructions")
    elif row.role in MATMUL_ROLES:
        family = aot.ARCHS[row.arch].tensor_core
        if not c.tensor_core_ops:
            found.append("no tensor-core instructions")
        elif not aot.mma_count(c, family) or (family != "HMMA" and aot.mma_count(c, "HMMA")):
            # every dot on the arch's own MMA: a dot of fewer than 64 rows falls back to mma.sync
            found.append(f"not all {family}: {autotune.mma_text(c)}")
    return found


def _where(row) -> tuple[str, str, str]:
    """GAPS' key: the dense kernels' role; a sparse or compressed kernel's name and role, which
    no dense gap covers."""
    role = row.role if row.use is not None else f"{row.kernel} {row.role}"
    return role, row.dtype, f"sm_{row.arch}"


@pytest.mark.slow
def test_every_shipped_kernel_compiles_on_every_arch_within_its_limits_on_its_tensor_cores(matrix):
    gaps, found, seen = _gap_table(), defaultdict(set), set()
    for row in matrix:
        seen.add(_where(row))
        for problem in _problems(row):
            found[_where(row)].add(f"{row.spec} {row.kernel} {row.settings}: {problem}")
    unexpected = {where: sorted(what) for where, what in found.items() if where not in gaps}
    assert not unexpected, "\n".join(f"{where}: {what}" for where, what in sorted(unexpected.items()))
    fixed = sorted(where for where in gaps if where in seen and where not in found)
    assert not fixed, f"no longer missing, delete from GAPS: {fixed}"
    assert {arch for _, _, arch in seen} == {f"sm_{a}" for a in ARCHS} and {d for _, d, _ in seen} == set(
        DTYPES
    )


@pytest.mark.slow
def test_the_matrix_reaches_every_kernel_of_every_shipped_spec(matrix):
    """Every @triton.jit kernel a shipped spec generates is launched in the matrix."""
    import tempfile
    from pathlib import Path

    # A kernel's name fixes its template parameters; the specs launch it with their own flags.
    launched = {row.kernel for row in matrix}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHIPPED:
            source = autotune.render_kernels(load_spec(SPECS / f"{name}.yaml"), Path(tmp)).read_text()
            kernels = {k for k in autotune.jit_constexprs(source) if _is_kernel(k, source)}
            missed = sorted(kernels - launched)
            assert not missed, f"{name}: kernels the arch matrix never launches: {missed}"


def _is_kernel(name: str, source: str) -> bool:
    """A @triton.jit function some launcher starts (name[grid](...)), not a helper it calls."""
    return f"{name}[" in source


@pytest.mark.slow
def test_the_shared_memory_estimate_is_a_lower_bound(matrix):
    """autotune prunes candidates by shared_estimate before compiling: it must never exceed
    what a compiled config takes, or pruning would drop configs that fit."""
    by_launch = defaultdict(list)
    for row in matrix:
        if row.use is not None and not row.compiled.error and row.role in MATMUL_ROLES:
            by_launch[(row.spec, row.node, row.dtype, row.arch, row.role.split("_")[0])].append(row)
    assert by_launch
    for (spec, node, dtype, arch, role), rows in by_launch.items():
        (launcher,) = [launcher for launcher in autotune.launchers(rows[0].use) if launcher.role == role]
        tile = rows[0].launch.constant
        config = BlockConfig(
            tile.get("BLOCK_M", tile.get("BLOCK_H")),
            tile["BLOCK_N"],
            rows[0].launch.num_warps,
            rows[0].launch.num_stages,
        )
        shared = max(row.compiled.shared_bytes for row in rows)
        assert autotune.shared_estimate(launcher, config) <= shared, (spec, node, dtype, arch, role, config)


@pytest.mark.slow
def test_dense_decode_packs_query_heads_and_splits_keys_where_it_should(matrix):
    """One new token over 4096 cached keys (the matrix's decode shape): the dense forward packs a
    key head's query heads into its rows on sm_80/90/100 (not on sm_89/120, where the packed tile
    spills: mlagen.runtime.launch.packs_gqa), and splits the keys everywhere (8 or 32 programs
    do not fill a GPU), merged by the combine kernel."""
    decode = [row for row in matrix if row.spec == "llama3_8b" and row.role == "decode" and row.dtype == "bf16"]
    assert {row.arch for row in decode} == set(ARCHS)
    for row in decode:
        constants = row.launch.constant
        assert constants["SPLIT_KV"], row.settings
        assert constants["PACK_GQA"] == (row.arch in (80, 90, 100)), (row.arch, row.settings)
    combines = {row.arch for row in matrix if row.spec == "llama3_8b" and row.role == "decode_combine"}
    assert combines == set(ARCHS)
