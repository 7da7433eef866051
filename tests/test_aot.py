"""mlagen.aot: one specialisation path from a launcher call to the binary that is judged.

The AOT compile captures what the generated launchers launch on meta tensors under a
stand-in driver; the key Triton's binder computes there must be the key it computes for
real tensors of the launch's shapes (here CPU tensors, through the same binder), for every
kernel family. Then the SASS reading (loops, tensor-core and TMA instructions), the on-disk
cache of readings, and the line printed before a long compile."""

from __future__ import annotations

import json

import pytest

from mlagen import aot, autotune, family_calls
from mlagen.autotune import Shape
from mlagen.family_calls import Problem
from mlagen.runtime.launch import BlockConfig
from mlagen.spec import load_spec
from tests.helpers import ROOT, SPECS

# (spec, launcher role, shape): every kernel family the launchers start, masks included.
FAMILIES = [
    ("deepseek_v3", "forward", Shape(1, 256)),  # MLA: split score, shared rope key (head stride 0)
    ("deepseek_v3", "backward", Shape(1, 256)),  # dK/dV, dQ and delta
    ("deepseek_v3", "decode", Shape(1, 1000, 2)),  # decode, append, combine (2 splits); keys not % 16
    ("llama3_8b", "forward", Shape(1, 100)),  # GQA; a length that is not a multiple of 16
    ("mistral_7b", "backward", Shape(1, 256)),  # sliding window
    ("hybrid_latent_window", "forward", Shape(2, 512)),  # latent chunk masks ("same", "earlier"), window
    ("hybrid_latent_window", "backward", Shape(2, 512)),
    ("perceiver_latent", "forward", Shape(2, 256)),  # not causal
]


# (spec, problem): the sparse and compressed layers' passes (mlagen.family_calls): indexer, sparse
# MLA forward, backward and decode over a bf16 and an FP8 cache; compressors, entry indexer and
# compressed attention forward, backward and decode, over selected entries, all entries, none.
LAYERS = [
    ("deepseek_v32", Problem(1, 256, 1000, 2)),  # a cache of 1002 tokens: not % 16
    ("glm5", Problem(2, 100, 990, 1, cache_dtype="fp8")),
    ("deepseek_v4_flash_csa", Problem(1, 256, 1000, 2)),
    ("deepseek_v4_flash_hca", Problem(1, 512, 1000, 1, decode_batch=2)),
    ("deepseek_v4_flash_sliding", Problem(1, 100, 300, 4)),
]


def _calls(device: str) -> tuple[list, list]:
    calls, labels = [], []
    for name, role, shape in FAMILIES:
        spec = load_spec(SPECS / f"{name}.yaml")
        kernels_file = ROOT / "generated" / name / "kernels.py"
        for launcher in autotune.all_launchers(spec, "bf16"):
            if launcher.role == role:
                config = autotune.default_for(launcher, shape, 90)
                calls.append((autotune.launch_call(kernels_file, launcher, shape, config, device), 90))
                labels.append((name, launcher))
    return calls, labels


@pytest.fixture(scope="module")
def captured():
    """Per family: what the launcher launched on meta tensors and on CPU tensors."""
    meta, labels = _calls("meta")
    cpu, _ = _calls("cpu")
    with aot.Compiler(workers=2, use_cache=False) as compiler:
        launched = compiler.capture(meta + cpu)
    return list(zip(labels, launched[: len(meta)], launched[len(meta) :]))


def _layer_calls(device: str) -> tuple[list, list]:
    calls, labels = [], []
    for name, problem in LAYERS:
        (use,) = family_calls.family_uses(load_spec(SPECS / f"{name}.yaml"))
        kernels_file = ROOT / "generated" / name / "kernels.py"
        for part, call in family_calls.calls(kernels_file, use, problem, "bf16", device):
            calls.append((call, 90))
            labels.append((name, part))
    return calls, labels


@pytest.fixture(scope="module")
def captured_layers():
    """Per pass of each layer: what it launched on meta tensors and on CPU tensors."""
    meta, labels = _layer_calls("meta")
    cpu, _ = _layer_calls("cpu")
    with aot.Compiler(workers=2, use_cache=False) as compiler:
        launched = compiler.capture(meta + cpu)
    return list(zip(labels, launched[: len(meta)], launched[len(meta) :]))


def _kernels_of_every_family(captured) -> set[str]:
    return {
        autotune.kernel_role(launcher, launch.kernel) + ("_masks" if launcher.use.group_mask else "")
        for (_, launcher), on_meta, _ in captured
        for launch in autotune.own_launches(launcher, on_meta)
    }


def test_every_kernel_family_is_captured(captured):
    assert _kernels_of_every_family(captured) >= {
        "forward",
        "backward_dkdv",
        "backward_dq",
        "backward_delta",
        "decode",
        "decode_append",
        "decode_combine",
        "forward_masks",
        "backward_dkdv_masks",
        "backward_dq_masks",
    }


def test_the_aot_key_is_the_key_triton_computes_for_real_tensors(captured):
    for (name, launcher), on_meta, on_cpu in captured:
        # (a backward call also runs the forward for its inputs, with the tiles of its device)
        on_meta, on_cpu = autotune.own_launches(launcher, on_meta), autotune.own_launches(launcher, on_cpu)
        assert [launch.kernel for launch in on_meta] == [launch.kernel for launch in on_cpu], name
        for meta, cpu in zip(on_meta, on_cpu, strict=True):
            assert meta.key == cpu.key, f"{name} {launcher.role} {meta.kernel}"
            assert meta.cache_key == cpu.cache_key


def test_the_aot_key_of_the_sparse_and_compressed_kernels_is_the_key_for_real_tensors(captured_layers):
    roles = set()
    for (name, part), on_meta, on_cpu in captured_layers:
        assert [launch.kernel for launch in on_meta] == [launch.kernel for launch in on_cpu], (name, part)
        for meta, cpu in zip(on_meta, on_cpu, strict=True):
            assert meta.key == cpu.key, f"{name} {part} {meta.kernel}"
            assert meta.cache_key == cpu.cache_key
            roles.add(family_calls.role(part, meta.kernel))
    assert roles == {
        "indexer", "forward", "backward", "backward_delta", "decode", "decode_append", "decode_indexer",
        "decode_combine", "compressor", "compressor_backward", "decode_compressor",
    }


def test_the_specialisation_is_the_launchs(captured):
    """What an AOT compile without the launch's specialisation got wrong (issue 15): pointers and
    strides divisible by 16, integers equal to 1 as constants, the launch's options."""
    (_, launcher), on_meta, _ = next(
        c for c in captured if c[0][1].role == "forward" and c[0][0] == "deepseek_v3"
    )
    (forward,) = autotune.own_launches(launcher, on_meta)
    signature = json.loads(forward.specialization)["signature"]
    assert signature["Q_A"] == "*bf16" and signature["LSE"] == "*fp32"
    assert "('*bf16', 'D')" in forward.key and "('i32', 'D')" in forward.key
    assert signature["q_group_size"] == signature["k_group_size"] == "constexpr"  # both 1 here
    assert (forward.num_warps, forward.num_stages) == (8, 2) and forward.constant["BLOCK_M"] == 128
    # keys and values through tensor descriptors (TMA) on sm_90, queries through pointers
    assert all(signature[name].startswith("tensordesc") for name in ("K_A", "K_B", "V"))
    # a length that is not a multiple of 16 loses the divisibility hint, as on a GPU
    (_, llama), llama_meta, _ = next(c for c in captured if c[0][0] == "llama3_8b")
    (gqa,) = autotune.own_launches(llama, llama_meta)
    assert gqa.constant["HEAD_GROUP"] == 4 and "('i32', '')" in gqa.key


def test_one_kernel_rendered_into_two_specs_is_one_binary(captured):
    """The cache key hashes the kernel's source, not its file or line numbers."""
    spec = load_spec(SPECS / "kimi_k2.yaml")
    (forward,) = [launcher for launcher in autotune.all_launchers(spec, "bf16") if launcher.role == "forward"]
    call = autotune.launch_call(
        ROOT / "generated" / "kimi_k2" / "kernels.py",
        forward,
        Shape(1, 256),
        autotune.default_for(forward, Shape(1, 256), 90),
    )
    with aot.Compiler(workers=1, use_cache=False) as compiler:
        (kimi,) = autotune.own_launches(forward, compiler.capture([(call, 90)])[0])
    (_, launcher), on_meta, _ = next(
        c for c in captured if c[0][1].role == "forward" and c[0][0] == "deepseek_v3"
    )
    (deepseek,) = autotune.own_launches(launcher, on_meta)
    assert kimi.source_file != deepseek.source_file and kimi.cache_key == deepseek.cache_key


# --- reading SASS -----------------------------------------------------------------------------------


def _sass(lines: list[str]) -> aot.Sass:
    return aot.Sass.parse(
        "\n".join(f"        /*{16 * i:04x}*/  {line} ;  /* 0x0 */" for i, line in enumerate(lines))
    )


def test_the_hot_loop_is_the_innermost_loop_with_the_most_mma():
    code = [
        "STL [R1+0x8], R2",
        "MOV R1, R2",
        "HMMA.16816.F32 R4, R8, R12, R4",  # 0-2: before any loop, one spill store
        # 3-9: the full-block loop, 7 instructions, one spill reload; at 6 it may wait on a
        # barrier out of line (20-22)
        "FADD R1, R1, R2",
        "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24",
        "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24",
        "@!P0 BRA 0x140",
        "LDL.64 R2, [R1+0x8]",
        "ISETP.GE.AND P1, PT, R1, R2, PT",
        "@P1 BRA 0x30",
        # 10-17: the masked tail loop, as many MMAs, 8 instructions, a uniform predicate (sm_100 style)
        "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24",
        "FSEL R5, R5, RZ, P2",
        "FSEL R5, R5, RZ, P2",
        "FSEL R5, R5, RZ, P2",
        "FMNMX R6, R6, R5, !PT",
        "FMNMX R6, R6, R5, !PT",
        "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24",
        "BRA.U !UP1, 0xa0",
        "EXIT",
        "BRA 0x130",  # 18, 19: the end and its trap
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR4], R0",
        "@!P3 BRA 0x140",
        "BRA 0x70",  # 20-22: the wait
    ]
    sass = _sass(code)
    assert sorted(sass.loops()) == [(1, 0, 0), (2, 0, 0), (7, 2, 1), (8, 2, 0)]
    assert sass.hot_loop() == (7, 2, 1)  # as many MMAs as the masked tail, fewer instructions
    assert sass.count(lambda op: op.endswith("MMA")) == {"HMMA": 1, "HGMMA": 4}


def test_a_return_jump_from_an_out_of_line_block_is_not_a_loop():
    code = [
        "MOV R1, R2",
        "@!P0 BRA 0x50",
        "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24",
        "FADD R1, R1, R1",
        "EXIT",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R0",
        "@!P0 BRA 0x50",
        "BRA 0x20",
    ]
    assert _sass(code).hot_loop() == (0, 0, 0)


# --- the cache of readings and the announcement ------------------------------------------------------


def _tiny_call():
    spec = load_spec(SPECS / "tiny_mha_bidirectional.yaml")
    (forward,) = [launcher for launcher in autotune.all_launchers(spec, "fp16") if launcher.role == "forward"]
    kernels_file = ROOT / "generated" / "tiny_mha_bidirectional" / "kernels.py"
    return forward, (autotune.launch_call(kernels_file, forward, Shape(1, 64), BlockConfig(16, 16, 4, 1)), 80)


def test_readings_are_cached_on_disk_and_a_corrupt_cache_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLAGEN_CACHE_DIR", str(tmp_path))
    forward, call = _tiny_call()
    first = autotune.compile_calls([call], workers=1)
    said = capsys.readouterr().err
    assert (
        "compiling: 1 launcher calls, 1 distinct kernels (0 in the compile cache, 1 to compile on 1 worker, about"
        in said
    )
    ((launch, reading),) = first[0]
    assert (
        launch.kernel == forward.kernels[0]
        and reading.arch == 80
        and not reading.error
        and reading.mma_kind() == "HMMA"
    )
    entries = json.loads((tmp_path / "compiled.json").read_text())["entries"]
    assert list(entries) == [launch.cache_key]
    again = autotune.compile_calls([call], workers=1)
    assert "(1 in the compile cache, 0 to compile" in capsys.readouterr().err and again[0][0][1] == reading
    (tmp_path / "compiled.json").write_text("{not json")
    third = autotune.compile_calls([call], workers=1)
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if "compile cache" in line and "ignoring" in line
    ]
    assert len(lines) == 1 and "unreadable" in lines[0] and third[0][0][1] == reading
    assert json.loads((tmp_path / "compiled.json").read_text())["format"] == aot.CACHE_FORMAT


def test_a_malformed_cache_entry_is_dropped_and_the_others_kept(tmp_path):
    good = aot.CompiledKernel("k", 90, 1024, 128, 0, 4, (("HGMMA", 8),), tile=(64, 64))
    aot.store_cache({"good": good}, tmp_path / "compiled.json")
    data = json.loads((tmp_path / "compiled.json").read_text())
    data["entries"]["bad"] = {**data["entries"]["good"], "registers": "many"}
    (tmp_path / "compiled.json").write_text(json.dumps(data))
    found, problem = aot.read_cache(tmp_path / "compiled.json")
    assert found == {"good": good} and problem.startswith("1 corrupt entry ('bad': registers=")


def test_issue_clocks_per_1k_scores_follow_anchors():
    # ANCHORS.md: the tutorial's 128x128 forward on 8 warps, 520 instructions in its loop: 65
    kernel = aot.CompiledKernel("k", 90, 0, 200, 0, 8, loop_instructions=520, loop_mma=16, tile=(128, 128))
    assert kernel.loop_clocks_per_1k_scores == 65.0
    assert aot.CompiledKernel("k", 90, 0, 200, 0, 8).loop_clocks_per_1k_scores is None


def test_arch_lists_parse():
    assert aot.parse_archs("all") == [80, 89, 90, 100, 120]
    assert aot.parse_archs("sm_90, 80") == [90, 80]
