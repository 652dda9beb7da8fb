"""`duquant bench`: the GPU kernel benchmarks (CUDA only; results as JSON + Markdown)."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("bench", help="GPU kernel benchmarks on pi0's shapes (gemm, act, stack, e2e); CUDA only")
    p.add_argument("what", choices=["gemm", "act", "stack", "e2e"],
                   help="gemm: every pi0 GEMM shape; act: the fused activation kernel; stack: one decoder layer "
                        "per part; e2e: sample_actions bf16 vs W4A8")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder (JSON + Markdown)")
    p.add_argument("--models", default="pi0", help="e2e: pi0,pi05")
    p.add_argument("--batches", default="1", help="e2e: batch sizes, e.g. 1,16")
    p.add_argument("--layers", type=int, default=2, help="stack: layers with distinct weights per graph")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import sys

    from duquant.kernels import gpu_available

    ok, why = gpu_available()
    if not ok:
        print(f"duquant bench: the GPU kernels cannot run here: {why}", file=sys.stderr)
        return 2
    from duquant.kernels import bench

    if args.what == "gemm":
        bench.bench_gemm(args.out)
    elif args.what == "act":
        bench.bench_act(args.out)
    elif args.what == "stack":
        bench.bench_stack(args.out, nlayers=args.layers)
    else:
        bench.bench_e2e(args.out, models=tuple(args.models.split(",")),
                        batches=tuple(int(b) for b in args.batches.split(",")))
    print(f"results in {args.out}")
    return 0
