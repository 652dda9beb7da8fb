"""Instruction counts, registers and shared memory of the activation kernels' sm_90 code, compiled on the CPU
(``duquant.kernels.aot``, no GPU needed): run it at two commits and compare the JSON to show that a refactor left
the generated code alone.

    PYTHONPATH=src python3 bench/ptx_signature.py out.json          # then: git checkout OTHER; ... other.json
    python3 bench/ptx_signature.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

CASES = {  # name -> (report function name, args, flags)
    "fold 4,16,4 split": ("shuffle_kernel_report", (4, 16, 4), dict(split=True, stages=1)),
    "fold 1,128,8": ("shuffle_kernel_report", (1, 128, 8), dict(stages=1)),
    "fold 2,8,4 symmetric": ("shuffle_kernel_report", (2, 8, 4), dict(SYMMETRIC=True, stages=1)),
    "fold 4,16,4 fp8": ("shuffle_kernel_report", (4, 16, 4), dict(fp8=True, stages=1)),
    "tile 2,16,4": ("tile_kernel_report", (2, 16, 4), {}),
    "tile 2,16,4 symmetric split": ("tile_kernel_report", (2, 16, 4), dict(SYMMETRIC=True, SPLIT=True)),
    "tile 2,16,4 fp8": ("tile_kernel_report", (2, 16, 4), dict(fp8=True)),
    "tile 2,16,4 partial last block": ("tile_kernel_report", (2, 16, 4), dict(two=True)),
}


def signature() -> dict:
    import triton

    from duquant.kernels import aot

    captured = {}
    real = triton.compile

    def spy(*a, **k):
        kernel = real(*a, **k)
        captured["ptx"] = kernel.asm["ptx"]
        return kernel

    triton.compile = spy
    try:
        out = {}
        for name, (fn, args, flags) in CASES.items():
            rep = getattr(aot, fn)(*args, **flags)
            lines = [ln.strip() for ln in captured["ptx"].splitlines()]
            code = [ln for ln in lines if ln and not ln.startswith(("//", ".", "$"))]
            ops = Counter(re.sub(r"^@!?%\w+\s+", "", ln).split()[0] for ln in code)
            out[name] = {"report": rep, "instructions": len(code), "ops": dict(sorted(ops.items()))}
        return out
    finally:
        triton.compile = real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="write the signature here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two signature files")
    a = p.parse_args()
    if a.compare:
        x, y = (json.load(open(f)) for f in a.compare)
        same = True
        for name in sorted(set(x) | set(y)):
            ok = x.get(name) == y.get(name)
            same &= ok
            print(f"{'same' if ok else 'DIFFERENT':9}  {name}")
        return 0 if same else 1
    if not a.out:
        p.error("give an output file or --compare A B")
    sig = signature()
    json.dump(sig, open(a.out, "w"), indent=1, sort_keys=True)
    for name, v in sig.items():
        print(f"{name}: {v['instructions']} instructions, {v['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
