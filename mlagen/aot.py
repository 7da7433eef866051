"""Ahead-of-time compilation of kernels exactly as a launch builds them, for a GPU
architecture, on a machine without a GPU.

    launcher call (meta tensors of the launch's shapes, dtypes and strides)
      --stand-in Triton driver for sm_<arch>, jit_cache_hook--> every kernel it launches,
        as Triton's own binder specialised it (pointer and integer divisibility by 16,
        integers equal to 1 as constants, the launch options): a Launch, nothing runs
      --unique by (kernel source, arch, Triton's specialisation key, options, Triton version)
      --on-disk cache ($MLAGEN_CACHE_DIR/compiled.json) or JITFunction.preload in a worker-->
        the cubin: registers, spills, shared memory (cuobjdump), tensor-core and TMA
        instructions and the hot loop (the SASS): a CompiledKernel

There is no second, simplified compile path (STYLE.md rule 11): `mlagen inspect`,
`tune --static`, the pruning and the CI checks all read the binary a launch builds.

Compilation runs in spawned worker processes with TRITON_INTERPRET=0: under the
interpreter `triton.jit` gives functions that cannot be compiled, and a process that
has run interpreted kernels has Triton's language ops patched.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from mlagen.errors import MlagenError

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# --- the hardware model -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arch:
    sm: int
    gpu: str  # the GPU whose numbers these are
    sms: int
    smem_per_block: int  # the most shared memory one CTA may use (opt-in maximum)
    smem_per_sm: int
    tensor_core: str  # the matrix instruction family this arch's kernels must use
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_ctas: int = 32


# CUDA C Programming Guide, "Technical Specifications per Compute Capability", and the
# GPUs' whitepapers. tensor_core: what Triton 3.9 emits there for 16-bit dots (SASS opcodes):
# mma.sync (HMMA) on 8.x and 12.0, warpgroup wgmma (HGMMA) on 9.0, tcgen05.mma (UTC*MMA) on 10.0.
ARCHS = {
    80: Arch(80, "A100", 108, 163 * 1024, 164 * 1024, "HMMA"),
    89: Arch(89, "L40S", 142, 99 * 1024, 100 * 1024, "HMMA", max_warps=48, max_ctas=24),
    90: Arch(90, "H100 SXM", 132, 227 * 1024, 228 * 1024, "HGMMA"),
    100: Arch(100, "B200", 148, 227 * 1024, 228 * 1024, "tcgen05"),
    120: Arch(120, "RTX 5090", 170, 99 * 1024, 128 * 1024, "HMMA", max_warps=48),
}


def parse_archs(text: str | int) -> list[int]:
    """`sm_90`, `90`, a comma-separated list of them, or `all`."""
    if str(text).strip() == "all":
        return list(ARCHS)
    archs = []
    for part in str(text).split(","):
        value = part.strip().removeprefix("sm_")
        if not value.isdigit() or int(value) not in ARCHS:
            raise MlagenError(f"--arch {text}: choose from {', '.join(f'sm_{a}' for a in ARCHS)} or all")
        archs.append(int(value))
    return archs


# --- what a launch builds ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    """One kernel launch a launcher made, as Triton specialised it for sm_<arch>."""

    kernel: str  # the @triton.jit function's name
    module: str  # its module's name, and the file it was loaded from (compile workers reload it)
    source_file: str
    arch: int
    source_hash: str  # the kernel's source and every @triton.jit function it calls, without line numbers
    key: str  # Triton's specialisation key: argument types and divisibility, constants, options
    specialization: str  # Triton's serialised specialisation, as JITFunction.preload reads it
    num_warps: int
    num_stages: int
    constants: tuple[tuple[str, Any], ...]  # the constexpr arguments by name

    @property
    def constant(self) -> dict[str, Any]:
        return dict(self.constants)

    @property
    def cache_key(self) -> str:
        """What makes two launches one binary: the source, not its file or line numbers."""
        options = json.loads(self.specialization)["options"]
        options.pop("extern_libs", None)  # a path of this machine's Triton install
        text = json.dumps(
            [self.source_hash, self.arch, self.key, options, triton.__version__, ANALYSIS_VERSION],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    name: str
    arch: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    num_warps: int = 0
    # Tensor-core instructions in the SASS by opcode, e.g. (("HGMMA", 16),).
    mma: tuple[tuple[str, int], ...] = ()
    # Why compilation failed (keep_going); the numbers above are then 0.
    error: str = ""
    num_stages: int = 0
    tma_loads: int = 0  # UTMALDG: tensor-memory-accelerator loads (sm_90+)
    # The hot loop: the backward branch of the SASS whose body holds the most MMAs (the
    # innermost such loop), its instruction count and MMAs; 0 without a loop of MMAs.
    loop_instructions: int = 0
    loop_mma: int = 0
    # Local-memory loads and stores (LDL, STL) in that loop: spilled bytes cost a trip to L1 per
    # iteration only when they show here; a spill outside it (an address kept over the loop,
    # reloaded after it) costs once per program.
    loop_local: int = 0
    # (query rows, keys) of the score tile one iteration of that loop covers: BLOCK_M (or
    # BLOCK_H, decode's (token, head) rows) x BLOCK_N of the launch; (0, 0) when unknown.
    tile: tuple[int, int] = (0, 0)

    @property
    def tensor_core_ops(self) -> int:
        return sum(count for _, count in self.mma)

    @property
    def loop_clocks_per_1k_scores(self) -> float | None:
        """Issue-clocks per 1K scores of one program's hot loop (ANCHORS.md "Static reading"): one
        instruction per warp per clock on each of the SM's 4 schedulers,
        instructions x warps / (tile scores / 1024) / 4."""
        scores = self.tile[0] * self.tile[1]
        if not (self.loop_instructions and scores and self.num_warps):
            return None
        return self.loop_instructions * self.num_warps / (scores / 1024) / 4

    def mma_kind(self) -> str:
        """The tensor-core family of the SASS: HGMMA, HMMA, tcgen05 (UTC*MMA), or "" without."""
        kinds = {_MMA_KINDS.get(opcode, opcode) for opcode, _ in self.mma}
        return "+".join(sorted(kinds))


_MMA_KINDS = {"UTCHMMA": "tcgen05", "UTCQMMA": "tcgen05", "UTCIMMA": "tcgen05", "UTCOMMA": "tcgen05"}


def mma_count(compiled: CompiledKernel, kind: str) -> int:
    """MMA instructions of one family: "HGMMA", "HMMA" or "tcgen05" (every UTC*MMA opcode)."""
    if kind == "tcgen05":
        return sum(n for opcode, n in compiled.mma if opcode.startswith("UTC"))
    return sum(n for opcode, n in compiled.mma if opcode == kind)


def problems(compiled: CompiledKernel, *, matmul: bool) -> list[str]:
    """What keeps a compiled kernel from the arch matrix's rule (issue 15 item 7), one line
    each, [] when none: it compiles, spills nothing, holds 1-255 registers and no more shared
    memory than its arch gives a block, and a matmul kernel's dots all run on its arch's own
    tensor cores (ARCHS[...].tensor_core: no HMMA left where that is HGMMA or tcgen05; a dot
    of fewer than 64 rows falls back to mma.sync there)."""
    if compiled.error:
        return [f"compile failed: {compiled.error}"]
    arch, found = ARCHS[compiled.arch], []
    if compiled.spill_bytes:
        found.append(f"spills {compiled.spill_bytes} B")
    if compiled.shared_bytes > arch.smem_per_block:
        found.append(
            f"over {arch.smem_per_block // 1024} KB of shared memory ({compiled.shared_bytes / 1024:.0f} KB)"
        )
    if not 0 < compiled.registers <= 255:
        found.append(f"{compiled.registers} registers")
    if matmul:
        family = arch.tensor_core
        if not compiled.tensor_core_ops:
            found.append("no tensor-core instructions")
        elif not mma_count(compiled, family) or (family != "HMMA" and mma_count(compiled, "HMMA")):
            found.append(f"not all {family}: " + " + ".join(f"{n} {opcode}" for opcode, n in compiled.mma))
    return found


# Bump when the reading of a cubin changes, so cached readings are not reused.
ANALYSIS_VERSION = 1


# --- the stand-in driver and the capture ----------------------------------------------------------


class StandInDriver(DriverBase):
    """What JITFunction.run asks the active driver before it compiles: the target, the current
    device (the arch number, so binders of different archs never mix) and stream. Launching
    is never reached: the jit_cache_hook stops every run before it. Compiles use a device of
    their own, so a kernel compiled in a worker is never found by a later capture there."""

    def __init__(self, arch: int, device: Any = None):
        super().__init__()
        self.arch = arch
        self.device = arch if device is None else device

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> Any:
        return self.device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise MlagenError("the stand-in driver of an AOT compile cannot launch kernels")

    def get_benchmarker(self):
        raise MlagenError("the stand-in driver of an AOT compile cannot time kernels")


def _knobs_runtime() -> Any:
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_cache_hook"):
        raise MlagenError(
            f"AOT compiles need triton.knobs.runtime.jit_cache_hook (Triton >= 3.4); this is {triton.__version__}"
        )
    return knobs.runtime


@contextmanager
def compiling_for(arch: int, device: Any = None) -> Iterator[None]:
    """Triton's active driver is the stand-in for sm_<arch>, and the launchers' own choices
    (tiles, split-KV count) follow that arch (mlagen.runtime.launch.LaunchTarget)."""
    from triton.runtime.driver import driver

    from mlagen.runtime.launch import LaunchTarget, launching_for

    # Restored as it was, lazy default included: asking for the default driver on a machine
    # without a GPU raises.
    previous = getattr(driver, "_active", None)
    driver.set_active(StandInDriver(arch, device))
    try:
        with launching_for(LaunchTarget(arch, ARCHS[arch].sms if arch in ARCHS else 1)):
            yield
    finally:
        driver._active = previous


def source_hash(fn: Any) -> str:
    """Hash of a @triton.jit function's source and of every @triton.jit function of its module
    it calls, directly or not, and the constexpr globals it reads: what Triton's cache_key
    covers, less the line numbers, so one kernel rendered into two specs' files is one compile."""
    from triton.runtime.jit import JITFunction

    known = {name: value for name, value in fn.__globals__.items() if isinstance(value, JITFunction)}
    seen, todo = {}, [fn]
    while todo:
        current = todo.pop()
        name = current.fn.__name__
        if name in seen:
            continue
        seen[name] = current
        todo += [known[called] for called in re.findall(r"\b(\w+)\s*\(", current.src) if called in known]
    fn.cache_key  # noqa: B018 - fills used_global_vals
    constants = sorted(
        (name, repr(value))
        for (name, _), (value, _) in getattr(fn, "used_global_vals", {}).items()
        if type(value).__name__ == "constexpr"
    )
    text = json.dumps([[name, seen[name].src] for name in sorted(seen)] + [constants])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def capture(call: Callable[[], Any], arch: int) -> tuple[Launch, ...]:
    """Every kernel `call` launches, specialised by Triton for sm_<arch>; none runs. Run it in
    a process with TRITON_INTERPRET=0 (a worker of Compiler)."""
    runtime = _knobs_runtime()
    launches: list[Launch] = []

    def hook(*, key: Any, fn: Any, compile: dict, **_: Any) -> bool:  # Triton's keyword names
        jit = fn.jit_function
        data = json.loads(compile["specialization_data"])
        names = list(data["signature"])
        constants = tuple(
            (names[path[0]], value.get("constexpr", value) if isinstance(value, dict) else value)
            for path, value in zip(data["constant_keys"], data["constant_vals"])
            if len(path) == 1
        )
        launches.append(
            Launch(
                jit.fn.__name__,
                jit.fn.__module__,
                str(Path(jit.fn.__code__.co_filename).resolve()),
                arch,
                source_hash(jit),
                str(key),
                compile["specialization_data"],
                int(compile["num_warps"]),
                int(compile["num_stages"]),
                constants,
            )
        )
        return True  # compiled elsewhere; nothing launches

    previous = runtime.jit_cache_hook
    runtime.jit_cache_hook = hook
    try:
        with warnings.catch_warnings(), compiling_for(arch):
            _quiet_triton_warnings()
            call()
    finally:
        runtime.jit_cache_hook = previous
    return tuple(launches)


def _quiet_triton_warnings() -> None:
    # Triton 3.9 warns that its fp-fusion default will change; a launch on the GPU takes the
    # same default, which the specialisation records, so the warning says nothing here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


# --- reading a cubin -----------------------------------------------------------------------------

# One SASS instruction of `cuobjdump -sass`: address, optional predicate, opcode, modifiers, operands.
_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?\s*([^;]*);"
)


@dataclass(frozen=True, slots=True)
class Instruction:
    address: int
    opcode: str
    operands: str
    predicated: bool

    @property
    def branch_target(self) -> int | None:
        if self.opcode != "BRA":
            return None
        targets = re.findall(r"0x([0-9a-f]+)", self.operands)
        return int(targets[-1], 16) if targets else None

    @property
    def ends_block(self) -> bool:
        return self.opcode in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX")

    @property
    def falls_through(self) -> bool:
        # A branch may also take its predicate as an operand (sm_100: `BRA.U !UP1, 0x2b40`).
        conditional = self.predicated or re.match(r"!?U?P[0-9]", self.operands) is not None
        return conditional or not self.ends_block


@dataclass(frozen=True, slots=True)
class Sass:
    """The instructions of a one-function cubin, and its loops."""

    instructions: tuple[Instruction, ...]

    @classmethod
    def parse(cls, text: str) -> Sass:
        return cls(
            tuple(
                Instruction(int(address, 16), opcode, operands, bool(predicate))
                for address, predicate, opcode, _, operands in _INSTRUCTION.findall(text)
            )
        )

    def count(self, predicate: Callable[[str], bool]) -> Counter:
        return Counter(i.opcode for i in self.instructions if predicate(i.opcode))

    def _blocks(self) -> tuple[list[tuple[int, int]], list[set[int]]]:
        """Basic blocks as [start, end) instruction index ranges, and each one's successors."""
        code = self.instructions
        index_of = {i.address: n for n, i in enumerate(code)}
        leaders = {0}
        for n, i in enumerate(code):
            if i.branch_target in index_of:
                leaders.add(index_of[i.branch_target])
            if i.ends_block and n + 1 < len(code):
                leaders.add(n + 1)
        starts = sorted(leaders)
        blocks = list(zip(starts, starts[1:] + [len(code)]))
        block_of = {start: b for b, (start, _) in enumerate(blocks)}
        successors = []
        for b, (_, end) in enumerate(blocks):
            last = code[end - 1]
            following = set()
            if last.branch_target in index_of:
                following.add(block_of[index_of[last.branch_target]])
            if last.falls_through and b + 1 < len(blocks):
                following.add(b + 1)
            successors.append(following)
        return blocks, successors

    def loops(self) -> list[tuple[int, int, int]]:
        """(instructions, MMAs, local-memory accesses) of every natural loop (a back edge to a
        block that dominates its source). Blocks of a loop that the compiler placed out of line,
        after the loop's last instruction (the slow paths of barrier waits), are not counted: they
        are not the steady state, and static readings of the same kind (ANCHORS.md) count the
        contiguous body."""
        blocks, successors = self._blocks()
        count = len(blocks)
        predecessors: list[set[int]] = [set() for _ in range(count)]
        for b, following in enumerate(successors):
            for s in following:
                predecessors[s].add(b)
        everything = set(range(count))
        dominators = [everything.copy() for _ in range(count)]
        dominators[0] = {0}
        changed = True
        while changed:
            changed = False
            for b in range(1, count):
                incoming = [dominators[p] for p in predecessors[b]]
                new = set.intersection(*incoming) | {b} if incoming else {b}
                if new != dominators[b]:
                    dominators[b], changed = new, True
        bodies: dict[int, set[int]] = {}
        for source, following in enumerate(successors):
            for header in following:
                if header in dominators[source]:
                    body = bodies.setdefault(header, {header})
                    todo = [source]
                    while todo:
                        b = todo.pop()
                        if b not in body:
                            body.add(b)
                            todo += predecessors[b]
        found = []
        for header, body in bodies.items():
            latch = max(b for b in body if header in successors[b])  # the loop's last back edge
            steady = [n for b in body if header <= b <= latch for n in range(*blocks[b])]
            opcodes = [self.instructions[n].opcode for n in steady]
            found.append((len(steady), sum(map(_is_mma, opcodes)), sum(map(_is_local, opcodes))))
        return found

    def hot_loop(self) -> tuple[int, int, int]:
        """(instructions, MMAs, local-memory accesses) of the loop whose body holds the most MMAs,
        the innermost of equals (the steady state: a masked tail loop beside a full-block loop has
        as many MMAs and more instructions); (0, 0, 0) without a loop of MMAs."""
        best = (0, 0, 0)
        for loop in self.loops():
            instructions, mma, _ = loop
            if mma and (mma > best[1] or (mma == best[1] and instructions < best[0])):
                best = loop
        return best


def _is_mma(opcode: str) -> bool:
    # HGMMA (sm_90 warpgroup), HMMA (mma.sync), UTCHMMA and kin (sm_100 tcgen05), IMMA, DMMA, ...
    return opcode.endswith("MMA")


def _is_local(opcode: str) -> bool:
    # the thread's local memory, where spilled registers live
    return opcode in ("LDL", "STL")


def _cuobjdump(*args: str) -> str:
    return subprocess.run([str(CUOBJDUMP), *args], capture_output=True, text=True, check=True).stdout


def read_cubin(
    cubin: bytes, name: str, arch: int, shared: int, num_warps: int, num_stages: int, tile: tuple[int, int]
) -> CompiledKernel:
    with tempfile.TemporaryDirectory(prefix="mlagen-aot-") as workdir:
        path = Path(workdir) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = _cuobjdump("--dump-resource-usage", str(path))
        sass = Sass.parse(_cuobjdump("-sass", str(path)))
    registers = re.search(r"REG:(\d+)", usage)
    # Spilled registers live in the thread's stack frame / local memory.
    spills = sum(int(s) for s in re.findall(r"\b(?:STACK|LOCAL):(\d+)", usage))
    loop_instructions, loop_mma, loop_local = sass.hot_loop()
    return CompiledKernel(
        name,
        arch,
        shared,
        int(registers.group(1)) if registers else 0,
        spills,
        num_warps,
        tuple(sorted(sass.count(_is_mma).items())),
        num_stages=num_stages,
        tma_loads=sass.count(lambda op: op == "UTMALDG").total(),
        loop_instructions=loop_instructions,
        loop_mma=loop_mma,
        loop_local=loop_local,
        tile=tile,
    )


def score_tile(constants: dict[str, Any]) -> tuple[int, int]:
    """(rows, keys) of a launch's score tile from its constexprs; (0, 0) when it has none."""
    rows = constants.get("BLOCK_M", constants.get("BLOCK_H", 0))
    keys = constants.get("BLOCK_N", 0)
    return (rows, keys) if isinstance(rows, int) and isinstance(keys, int) else (0, 0)


_GENERATED = "_mlagen_aot_"  # the module name prefix of generated kernels.py files loaded here


@cache
def _load_module(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_kernels_module(kernels_file: str | Path) -> ModuleType:
    """A generated kernels.py, imported under a name of its own (kernels of several specs
    live side by side in one worker)."""
    path = Path(kernels_file).resolve()
    return _load_module(str(path), f"{_GENERATED}{path.parent.name}")


def compile_launch(launch: Launch) -> CompiledKernel:
    """Compile a captured launch for its arch, as the launch itself would have (Triton's
    JITFunction.preload of the recorded specialisation), and read the cubin."""
    if launch.module.startswith(_GENERATED):
        module = _load_module(launch.source_file, launch.module)
    else:  # a module of the package (the baseline): import it as itself
        module = importlib.import_module(launch.module)
    fn = getattr(module, launch.kernel)
    device = ("aot-compile", launch.arch)
    try:
        with warnings.catch_warnings(), compiling_for(launch.arch, device):
            _quiet_triton_warnings()
            compiled = fn.preload(launch.specialization)
    finally:  # the JITFunction's in-memory cache would keep every binary a worker compiles
        fn.device_caches.pop(device, None)
    return read_cubin(
        compiled.asm["cubin"],
        launch.kernel,
        launch.arch,
        compiled.metadata.shared,
        compiled.metadata.num_warps,
        launch.num_stages,
        score_tile(launch.constant),
    )


def _compile_keep_going(launch: Launch) -> CompiledKernel:
    try:
        return compile_launch(launch)
    except Exception as exc:  # a config that cannot compile is a finding (pruned), not a crash
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        error = f"{type(exc).__name__}: {last_line}"[:300]
        return CompiledKernel(
            launch.kernel, launch.arch, 0, 0, 0, launch.num_warps, error=error, num_stages=launch.num_stages
        )


def _capture_job(job: tuple[Callable[[], Any], int]) -> tuple[Launch, ...]:
    return capture(*job)


# --- the on-disk cache of readings ------------------------------------------------------------

CACHE_FORMAT = 2  # 2: loop_local


def cache_path() -> Path:
    """$MLAGEN_CACHE_DIR/compiled.json, beside the tuning cache."""
    from mlagen.runtime.tuning_cache import cache_path as tuning_path

    return tuning_path().parent / "compiled.json"


def _from_json(entry: Any) -> CompiledKernel:
    """A cached reading; ValueError when the entry is out of shape."""
    if not isinstance(entry, dict):
        raise ValueError("not a table")
    values = {}
    for field in fields(CompiledKernel):
        value = entry.get(field.name)
        if field.name in ("name", "error"):
            ok = isinstance(value, str)
        elif field.name == "mma":
            ok = isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int
                for p in value
            )
            value = tuple(tuple(p) for p in value) if ok else value
        elif field.name == "tile":
            ok = isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            value = tuple(value) if ok else value
        else:
            ok = type(value) is int and value >= 0
        if not ok:
            raise ValueError(f"{field.name}={value!r:.40}")
        values[field.name] = value
    return CompiledKernel(**values)


def read_cache(path: Path) -> tuple[dict[str, CompiledKernel], str | None]:
    """(readings by Launch.cache_key, a one-line problem or None); never raises on content."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {}, f"unreadable ({type(exc).__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, "corrupt: no 'entries' table"
    if data.get("format") != CACHE_FORMAT:
        return {}, f"stale: format {data.get('format')!r:.20}, this mlagen reads {CACHE_FORMAT}"
    found, dropped = {}, []
    for key, entry in data["entries"].items():
        try:
            found[key] = _from_json(entry)
        except ValueError as exc:
            dropped.append(f"{key!r:.40}: {exc}")
    if dropped:
        return found, f"{len(dropped)} corrupt entr{'y' if len(dropped) == 1 else 'ies'} ({dropped[0]})"
    return found, None


def store_cache(new: dict[str, CompiledKernel], path: Path) -> None:
    """Merge readings into the cache under its lock and replace the file atomically; a cache
    that cannot be written costs a recompile next time, never this run (one line on stderr)."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            current, _ = read_cache(path)
            merged = {key: asdict(value) for key, value in {**current, **new}.items()}
            handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump({"format": CACHE_FORMAT, "entries": merged}, out, separators=(",", ":"))
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
    except (OSError, Timeout) as exc:
        print(f"mlagen: could not write the compile cache {path}: {exc}", file=sys.stderr)


# --- the orchestration -------------------------------------------------------------------------

Progress = Callable[[Iterable[CompiledKernel], int], Iterable[CompiledKernel]]


def unique(launches: Iterable[Launch]) -> list[Launch]:
    """One launch per distinct binary, in first-seen order."""
    return list({launch.cache_key: launch for launch in reversed(list(launches))}.values())[::-1]


class Compiler:
    """A pool of spawned workers (TRITON_INTERPRET=0) that capture launcher calls and compile
    what they launch, each distinct binary once, read from or added to the on-disk cache.

        with Compiler(workers=2) as compiler:
            launches = compiler.capture([(call, 90), ...])    # per call, what it launched
            readings = compiler.compile(every launch)         # by Launch.cache_key
    """

    def __init__(self, workers: int = 2, *, use_cache: bool = True):
        self.workers = max(1, workers)
        self.use_cache = use_cache
        self._pool: ProcessPoolExecutor | None = None
        self._saved: str | None = None
        self._cached: dict[str, CompiledKernel] | None = None

    def __enter__(self) -> Compiler:
        self._saved = os.environ.get("TRITON_INTERPRET")
        # Workers copy the environment when they start, before they import triton.
        os.environ["TRITON_INTERPRET"] = "0"
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(cancel_futures=True)
        if self._saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self._saved

    def capture(self, calls: list[tuple[Callable[[], Any], int]]) -> list[tuple[Launch, ...]]:
        """For each (call, arch): the kernels the call launches on sm_<arch>, in launch order."""
        assert self._pool is not None, "use Compiler as a context manager"
        chunk = max(1, len(calls) // (4 * self.workers))
        return list(self._pool.map(_capture_job, calls, chunksize=chunk))

    def cached(self) -> dict[str, CompiledKernel]:
        if self._cached is None:
            self._cached = {}
            if self.use_cache:
                self._cached, problem = read_cache(cache_path())
                if problem:
                    print(
                        f"mlagen: ignoring {'part of ' if self._cached else ''}the compile cache "
                        f"{cache_path()}: {problem}",
                        file=sys.stderr,
                    )
        return self._cached

    def missing(self, launches: Iterable[Launch]) -> list[Launch]:
        """The distinct binaries among `launches` that the cache does not hold."""
        cached = self.cached()
        return [launch for launch in unique(launches) if launch.cache_key not in cached]

    def compile(
        self, launches: Iterable[Launch], progress: Progress | None = None
    ) -> dict[str, CompiledKernel]:
        """Readings of every launch by Launch.cache_key; each distinct binary compiled once (in
        parallel), or taken from the cache. A launch that fails to compile comes back with
        `error` set."""
        assert self._pool is not None, "use Compiler as a context manager"
        launches = unique(launches)
        todo = self.missing(launches)
        results: dict[str, CompiledKernel] = {}
        if todo:
            done = self._pool.map(_compile_keep_going, todo)
            try:
                for launch, reading in zip(todo, progress(done, len(todo)) if progress else done):
                    results[launch.cache_key] = reading
            finally:  # what was compiled before an interrupt is kept
                if self.use_cache and results:
                    store_cache(results, cache_path())
                    self.cached().update(results)
        cached = self.cached()
        return {
            launch.cache_key: results.get(launch.cache_key) or cached[launch.cache_key] for launch in launches
        }
