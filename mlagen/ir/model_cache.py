"""A whole model's decode cache at a context length, from its layers' specs: DeepSeek-V4's
mix of sliding, CSA and HCA layers beside MLA stacks of the same depth (DESIGN.md sections
1, 5 and 6). Pure arithmetic on specs: no torch, no files."""

from __future__ import annotations

from dataclasses import dataclass

from mlagen.spec import CompressedSpec
from mlagen.spec.schema import DTYPE_BYTES

GIB = 1 << 30
MIB = 1 << 20
# DeepSeek-V3's MLA cache per token and layer (latent 512 + rope key 64) and V3.2's indexer key.
MLA_VALUES = 512 + 64
DSA_INDEX_VALUES = 128


@dataclass(frozen=True, slots=True)
class ModelCache:
    """The cache of one sequence of `context` tokens: per layer type, how many layers and their spec."""

    layers: tuple[tuple[str, int, CompressedSpec], ...]
    context: int

    @property
    def depth(self) -> int:
        return sum(count for _, count, _ in self.layers)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.layers[0][2].dtype]

    def entries_bytes(self) -> float:
        """What grows with the sequence: compressed entries and index keys."""
        return (
            sum(count * spec.cache_values_per_token() * self.context for _, count, spec in self.layers)
            * self.dtype_bytes
        )

    def fixed_bytes(self) -> int:
        """The windows' rows and the unfinished windows' projections."""
        return sum(count * spec.fixed_cache_values() for _, count, spec in self.layers) * self.dtype_bytes

    def total_bytes(self) -> float:
        return self.entries_bytes() + self.fixed_bytes()

    def mla_bytes(self, index: bool) -> int:
        """The same depth of MLA layers caching latent + rope key per token (V3), plus the
        indexer's key (V3.2 DSA), in the same dtype."""
        values = MLA_VALUES + (DSA_INDEX_VALUES if index else 0)
        return self.depth * self.context * values * self.dtype_bytes


def _size(bytes_: float) -> str:
    return f"{bytes_ / GIB:.2f} GiB" if bytes_ >= GIB else f"{bytes_ / MIB:.1f} MiB"


def describe(cache: ModelCache) -> list[str]:
    dtype = cache.layers[0][2].dtype
    lines = []
    for kind, count, spec in cache.layers:
        per_token = spec.cache_values_per_token() * cache.dtype_bytes
        lines.append(
            f"  {kind} x{count}: {per_token:g} B per token per layer in {dtype}, "
            f"{spec.fixed_cache_values() * cache.dtype_bytes:,} B fixed per sequence"
        )
    total = cache.total_bytes()
    lines.append(
        f"KV cache of one {cache.context:,}-token sequence in {dtype}: {_size(total)} (compressed entries "
        f"{_size(cache.entries_bytes())}, windows and unfinished windows {_size(cache.fixed_bytes())})"
    )
    for name, index, what in (
        ("V3.2-style DSA", True, f"latent 512 + rope 64 + indexer key {DSA_INDEX_VALUES}"),
        ("V3-style MLA", False, "latent 512 + rope 64"),
    ):
        other = cache.mla_bytes(index)
        lines.append(
            f"  a {name} stack of {cache.depth} layers ({what} per token): {_size(other)}, {other / total:.1f}x more"
        )
    return lines
