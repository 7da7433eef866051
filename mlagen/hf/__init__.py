"""Hugging Face transformers integration (needs `pip install transformers`).

mlagen.patch(model)              # attention layers -> generated modules, same parameters
model.generate(input_ids, ...)   # MLA layers decode from the compressed paged cache
mlagen.unpatch(model)
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mlagen.hf needs transformers: pip install 'mlagen[hf]'") from exc

from mlagen.hf.cache import MlagenCache
from mlagen.hf.patch import PatchReport, default_out_root, patch, unpatch

__all__ = ["MlagenCache", "PatchReport", "default_out_root", "patch", "unpatch"]
