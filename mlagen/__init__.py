"""mlagen: YAML attention specs -> Triton kernels and PyTorch modules.

attn_module = mlagen.load("specs/deepseek_v3.yaml")   # generates if needed, then imports
attn = attn_module.Attention()

mlagen.patch(model)      # a transformers model's attention layers -> generated modules
mlagen.unpatch(model)    # and back
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlagen.spec import Spec

__version__ = "0.1.0"


def load(spec: str | Path | Spec, out_root: str | Path = "generated") -> ModuleType:
    """Generate `out_root/<name>/` for the spec (a YAML path or a parsed Spec; only if
    stale) and import it."""
    from mlagen.codegen import generate
    from mlagen.spec import load_spec

    result = generate(spec if not isinstance(spec, (str, Path)) else load_spec(spec), out_root)
    package_dir = result.package_dir.resolve()
    where = hashlib.sha256(str(package_dir).encode()).hexdigest()[:12]
    module_name = f"mlagen_generated_{result.spec.name}_{where}"
    if module_name in sys.modules and not result.changed:
        return sys.modules[module_name]
    # Regenerated files replace the package whole: forget its old submodules too.
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        module_name, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def patch(model, **options):
    """Replace every attention layer of a transformers model with a generated module;
    see mlagen.hf.patch."""
    from mlagen.hf import patch as patch_model

    return patch_model(model, **options)


def unpatch(model):
    """Restore the attention layers `patch` replaced; see mlagen.hf.unpatch."""
    from mlagen.hf import unpatch as unpatch_model

    return unpatch_model(model)


__all__ = ["__version__", "load", "patch", "unpatch"]
