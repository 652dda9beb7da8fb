"""Every GPU format on pi0's linear-layer shapes: bf16 cuBLAS vs w4a16 (Triton bf16 x int4), w8a8-fp8
(``torch._scaled_mm``, activation quantization included) and w4a8 (DuQuant activation kernel + integer GEMM; old
fused and new tile activation kernels), one layer at a time.

    PYTHONPATH=src python3 bench/formats.py [--out DIR] [--parts expert,llm,vision] [--formats w4a16,w8a8-fp8,w4a8]

- Correctness first: each layer's gpu output on a fresh bf16 input (allocator poisoned before the call) against
  its format's float32 reference (``Format.reference``; w4a8: the integer spec ``reference.quantized_linear``).
- Times: median of CUDA-graph replays (20 calls per graph), input L2-hot, weights as they come (a 100 MB+ weight set
  per shape would be needed to defeat L2 for the small ones: the M = 51 rows flatter every format alike).
- Writes formats.{json,md} to --out (default $OUT). Exits 1 if a check failed, 2 without CUDA / triton.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402
from torch import nn

T0 = time.time()
# (part, name, M, K, N): pi0 (gemma_2b prefix of 816 tokens, gemma_300m expert on 51, SigLIP on 3 x 256)
SHAPES = [
    ("expert", "q", 51, 1024, 2048), ("expert", "kv", 51, 1024, 256), ("expert", "o", 51, 2048, 1024),
    ("expert", "gate/up", 51, 1024, 4096), ("expert", "down", 51, 4096, 1024),
    ("expert", "qkv fused", 51, 1024, 2560), ("expert", "gate+up fused", 51, 1024, 8192),
    ("llm", "q", 816, 2048, 2048), ("llm", "o", 816, 2048, 2048), ("llm", "gate/up", 816, 2048, 16384),
    ("llm", "down", 816, 16384, 2048),
    ("vision", "fc1", 768, 1152, 4304), ("vision", "fc2", 768, 4304, 1152),
]


def time_graph(fn, calls: int = 20, iters: int = 15) -> float:
    """Median µs per call of fn, from replays of one CUDA graph holding `calls` calls."""
    return kernel_bench.time_graph(fn, iters=iters, calls=calls)


def poison_allocator(nbytes: int) -> None:
    t = torch.full((nbytes,), 0x7F, dtype=torch.uint8, device="cuda")  # bf16 0x7F7F: a huge finite value
    del t


def build(fmt: str, lin: nn.Linear, k: int, impl: str | None):
    """A gpu-backend layer of `fmt` from the float linear (w4a8: a real DuQuant transform)."""
    from duquant import kernels
    from duquant.layers import DuQuantLinear
    from duquant.random_layers import random_transform

    if fmt == "w4a8":
        t = random_transform(k, "duquant", 128, seed=k, steps=4)
        layer = DuQuantLinear.from_linear(lin, "w4a8", transform=t, w_clip=0.9, act_clip=0.9, method="duquant")
    elif fmt == "w8a8-fp8 duquant":  # fp8 codes out of the DuQuant activation kernel
        t = random_transform(k, "duquant", 128, seed=k, steps=4)
        layer = DuQuantLinear.from_linear(lin, "w8a8-fp8", transform=t, method="duquant")
    elif fmt == "w4a16 g128":
        layer = DuQuantLinear.from_linear(lin, "w4a16", group_size=128)
    else:
        layer = DuQuantLinear.from_linear(lin, fmt)
    layer = layer.cuda()
    layer.backend = "gpu"
    if impl:
        os.environ["DUQUANT_ACT_IMPL"] = impl
    try:
        kernels.prepare_gpu_model(nn.ModuleList([layer]))
    finally:
        os.environ.pop("DUQUANT_ACT_IMPL", None)
    return layer


def state_bytes(layer) -> int:
    st = layer._gpu_state
    return st.resident_bytes() if hasattr(st, "resident_bytes") else st.num_bytes()


def check(layer, fmt: str, x: torch.Tensor) -> dict:
    from duquant.kernels import reference

    if fmt == "w4a8":  # the integer spec, float64, on the GPU (same buffers; the kernel state stays)
        ref = reference.quantized_linear(x.float(), layer, out_dtype=torch.float64).float()
    else:
        ref = layer.fmt.reference(layer, x)
    poison_allocator(x.shape[0] * layer.out_features * 4)
    y = layer(x)
    err = (y.float() - ref).abs()
    rel = float(err.norm() / ref.norm())
    if fmt == "w4a8":  # activation-code flips of tf32 / fp16 rotations (docs/gpu.md)
        ok = rel < 1e-2
    else:
        c = 1e-2 if fmt.startswith("w8a8-fp8") else 1e-3
        ok = bool((err <= 2.0 ** -7 * ref.abs() + c * ref.abs().max()).all())
    ok = ok and bool(torch.isfinite(y).all())
    return {"rel err": rel, "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--parts", default="expert,llm,vision")
    p.add_argument("--formats", default="w4a16,w4a16 g128,w8a8-fp8,w8a8-fp8 duquant,w4a8")
    args = p.parse_args()
    if kernel_bench.cannot_run("formats"):
        return 2
    parts = args.parts.split(",")
    fmts = [f for f in args.formats.split(",") if f]
    if torch.cuda.get_device_capability() < (8, 9):
        fmts = [f for f in fmts if not f.startswith("w8a8-fp8")]
    variants = []
    for f in fmts:
        variants += [(f, "fused"), (f, "tile")] if f == "w4a8" else [(f, None)]
    rows, failures = [], []
    for part, name, m, k, n in SHAPES:
        if part not in parts:
            continue
        torch.manual_seed(k + n)
        lin = nn.Linear(k, n, bias=True)
        wb = lin.weight.detach().to("cuda", torch.bfloat16)
        bb = lin.bias.detach().to("cuda", torch.bfloat16)
        x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
        t_bf = time_graph(lambda x=x, wb=wb, bb=bb: torch.nn.functional.linear(x, wb, bb))
        row = {"part": part, "layer": name, "M": m, "K": k, "N": n, "bf16 us": t_bf}
        for fmt, impl in variants:
            col = fmt + (f" ({impl} act)" if impl else "")
            try:
                layer = build(fmt, lin, k, impl)
                xc = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)  # fresh input for the check
                rec = check(layer, fmt, xc)
                if not rec["ok"]:
                    failures.append(f"{part}.{name} {col}: rel err {rec['rel err']:.3g}")
                    print("CHECK FAILED", part, name, col, rec, flush=True)
                    row[f"{col} us"] = "FAILED"
                    continue
                t = time_graph(lambda layer=layer, x=x: layer(x))
                row[f"{col} us"] = t
                row[f"{col} vs bf16"] = t_bf / t
                row[f"{col} bytes/bf16"] = state_bytes(layer) / (n * k * 2 + n * 2)
                row[f"{col} rel err"] = rec["rel err"]
            except Exception as e:  # noqa: BLE001  (a format that cannot run this shape fails the benchmark)
                traceback.print_exc()
                failures.append(f"{part}.{name} {col}: {repr(e)[:300]}")
                row[f"{col} us"] = "ERROR"
            finally:
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"[{time.time() - T0:6.1f} s]", {kk: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                               for kk, v in row.items()}, flush=True)
    env = kernel_bench.env_info()
    cols = ["part", "layer", "M", "K", "N", "bf16 us"]
    for fmt, impl in variants:
        col = fmt + (f" ({impl} act)" if impl else "")
        cols += [f"{col} us", f"{col} vs bf16"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    md = (f"Formats per linear layer, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
          "µs per call (CUDA-graph replays, input L2-hot), activation quantization included; vs bf16 = bf16 "
          "cuBLAS time / format time.\n\n" + "\n".join(lines) + "\n")
    return kernel_bench.finish(args.out, "formats", {"env": env, "rows": rows}, md, failures)

if __name__ == "__main__":
    sys.exit(main())
