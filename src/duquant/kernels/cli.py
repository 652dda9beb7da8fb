"""`duquant bench`: runs the GPU benchmarks of the repository's `bench/` folder (CUDA only; JSON + Markdown).

The benchmark code is not part of the installed package: `duquant bench WHAT [args]` runs `bench/<script>.py`
of the source checkout that duquant is installed from (`pip install -e .`), with the remaining arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPTS = {
    "e2e": ("e2e.py", "sample_actions end to end, every variant in one CUDA graph (bf16 plain/fast, W4A8, W8A8)"),
    "profile": ("breakdown.py", "where the time of one sample_actions goes, by category (bf16, W4A8)"),
    "gemm": ("gemm_shapes.py", "every pi0 GEMM shape: bf16 cuBLAS vs our int8 / int4 kernels vs torch FP8"),
    "act": ("act_kernel.py", "the fused activation kernel against memory bandwidth"),
    "act-transform": ("act_transform.py", "activation-transform kernels against their memory floor"),
    "stack": ("layer_stack.py", "one decoder layer's linears per part, activation kernels included"),
    "peer-openpi": ("peer_openpi.py", "openpi's own compiled PI0Pytorch on this GPU (--openpi-src PATH)"),
    "peer-realtime-vla": ("peer_realtime_vla.py", "realtime-vla's Triton pi0 / pi0.5 beside our bf16 fast path "
                                                  "(--realtime-vla-src PATH)"),
}


def bench_dir() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/duquant/kernels/cli.py -> repository root
    return root / "bench" if (root / "bench" / "e2e.py").is_file() else None


def register(sub) -> None:
    lines = "\n".join(f"  {k:18s} {v[1]}" for k, v in SCRIPTS.items())
    p = sub.add_parser("bench", help="GPU benchmarks on pi0's shapes and end to end (CUDA only; bench/ folder)",
                       description=__doc__ + "\nbenchmarks:\n" + lines,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(SCRIPTS), help="which benchmark (see above)")
    p.add_argument("args", nargs="...", help="passed to the script (e.g. --models pi0,pi05 --batches 1,16)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import runpy

    folder = bench_dir()
    if folder is None:
        print("duquant bench runs the scripts in the repository's bench/ folder: clone the repository and install "
              "it with `pip install -e .`", file=sys.stderr)
        return 2
    from duquant.kernels import gpu_available

    ok, why = gpu_available()
    if not ok and args.what != "peer-openpi":
        print(f"duquant bench: the GPU benchmarks cannot run here: {why}", file=sys.stderr)
        return 2
    script = folder / SCRIPTS[args.what][0]
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:  # the scripts end with sys.exit(code); a message instead of a code is a failure
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            return 1
        return int(done.code or 0)
    return 0
