"""The preamble of a subprocess that runs Triton kernels under the interpreter on the CPU (shared by the kernel
tests): sets TRITON_INTERPRET before triton loads and patches the interpreter for numpy >= 2.4."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

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


def run_under_interpreter(script: str, marker: str, timeout: int = 600) -> None:
    """Run `script` (PREAMBLE + test code) in a subprocess under the Triton interpreter; it must exit 0 and print
    `marker`. Skips when triton is not installed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and marker in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
