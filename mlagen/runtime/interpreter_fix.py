"""Triton 3.6's interpreter (TRITON_INTERPRET=1) turns a scalar tensor into a Python int with
int() of its one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be
converted to Python scalars", triton-lang/triton#9171): every kernel whose loop runs to a
run-time bound then fails on CPU. Triton 3.9 converts the squeezed array. pyproject allows
Triton 3.6 (what torch 2.11 installs), so under an older Triton's interpreter the conversion
takes the squeezed array too; a Triton from 3.9 on is left as it is."""

from __future__ import annotations

from mlagen.runtime.launch import triton_version


def index_scalars_under_any_numpy() -> bool:
    """Patch the interpreter's scalar conversion where this Triton needs it; True when patched
    (now or before)."""
    if triton_version() >= (3, 9):
        return False
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # an interpreter laid out otherwise: nothing of ours to mend
        return False
    if getattr(patch_tensor, "indexes_squeezed", False):
        return True

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        # the scope restores attributes last-set-first, so this undoes before the original does
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.indexes_squeezed = True
    interpreter._patch_lang_tensor = patched
    return True
