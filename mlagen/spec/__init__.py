"""Spec language: YAML files describing one attention layer (see specs/)."""

from mlagen.spec.parse import load_spec, parse_spec
from mlagen.spec.schema import (
    DTYPE_BYTES,
    CompressedSpec,
    Compression,
    EntryIndexer,
    GqaSpec,
    LatentSpec,
    MlaSpec,
    Rope,
    Spec,
    Yarn,
)

__all__ = [
    "DTYPE_BYTES",
    "CompressedSpec",
    "Compression",
    "EntryIndexer",
    "GqaSpec",
    "LatentSpec",
    "MlaSpec",
    "Rope",
    "Spec",
    "Yarn",
    "load_spec",
    "parse_spec",
]
