"""The preamble of a subprocess that runs Triton kernels under the interpreter on the CPU (shared by the kernel
tests): sets TRITON_INTERPRET before triton loads and patches the interpreter for numpy >= 2.4."""

import textwrap

PREAMBLE = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interp
    _orig = interp._patch_lang_tensor

    def _patched(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array (loop bounds)
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched
""")
