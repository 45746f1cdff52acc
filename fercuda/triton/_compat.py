"""Differences between the Triton releases fercuda supports (3.6 to 3.8), smoothed over.

Triton 3.6's interpreter (TRITON_INTERPRET=1) turns a scalar, which it holds as a one-element
array, into a Python int with ``int(array)``; NumPy 2.4 and newer refuse that for arrays of one
dimension, so every loop with runtime bounds (``for i in range(start, end, STEP)``) fails with
"only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed in
later releases by squeezing the array first). ``fix_interpreter_index()`` makes the interpreter of
such a release squeeze too; it changes nothing in releases that already do, nor on a GPU.
"""

import inspect

_UNFIXED = "int(self.handle.data))"


def fix_interpreter_index():
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_fercuda_fixed", False):
        return False
    try:
        unfixed = _UNFIXED in inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    if not unfixed:
        return False

    def _patch_lang_tensor(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fercuda_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
