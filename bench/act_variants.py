# ruff: noqa: B023  (timed closures run before the loop moves on)
"""Launch variants of the folded activation kernel (kernels/triton_act_shuffle.py) against its default launch, per
shape, in one process: the smoothing tile requested at every step instead of once per program (``hoist_smooth``),
the persistent grid (``programs``), a register cap (``max_registers``: 128 lets two 8-warp programs share a
multiprocessor at K = 16384), and the launch before 4035bc1 ("before"). Every variant's codes, scales and sums
are first compared with the default launch's for equality (the arithmetic is the same), then timed (median of
CUDA-graph replays, 20 calls per graph).

    PYTHONPATH=src python3 bench/act_variants.py [--shapes 816x16384,816x2048] [--variants default,before,...]
        [--layouts natural,split] [--out DIR]
    PYTHONPATH=src python3 bench/act_variants.py --kernel tile     # the one-tile kernel on zigzag transforms:
        x prefetch and the smoothing table loaded once per program, each against its default launch

Writes act_variants.{json,md}. Exits 1 when a variant's outputs differ from the default's, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402

SHAPES = "816x2048,816x16384,51x1024,51x2048,13056x2048,13056x16384"


def variants(sms: int) -> dict[str, dict]:
    """Name -> act_quant_shuffle keyword arguments. "before": the launch of the commits before 4035bc1 (the
    smoothing tile loaded at every step, two programs per multiprocessor at every width)."""
    return {
        "default": {},
        "before": {"hoist_smooth": False, "programs": 2 * sms},
        "smooth-per-step": {"hoist_smooth": False},
        f"programs{2 * sms}": {"programs": 2 * sms},
        f"programs{sms}": {"programs": sms},
        "regs128": {"max_registers": 128},
        **K2048_STEPS,
    }


# tokens per step x warps around K = 2048's default 4 x 4: at other widths these steps are other row counts (1024
# rows at K = 16384, over shared memory), so they run at K = 2048 only ("n/a" elsewhere)
K2048_STEPS = {
    "br8w8": {"block_tokens": 8, "num_warps": 8},
    "br4w8": {"block_tokens": 4, "num_warps": 8},
    "br2w4": {"block_tokens": 2, "num_warps": 4},
    "br1w4": {"block_tokens": 1, "num_warps": 4},
}


TILE_VARIANTS = {  # the one-tile kernel (triton_act_tile; what zigzag layers run)
    "default": {},
    "before": {"prefetch": False, "hoist_smooth": False},  # its launch before the ninth session
    "prefetch-only": {"prefetch": True, "hoist_smooth": False},
    "hoist-only": {"prefetch": False, "hoist_smooth": True},
    "prefetch+hoist": {"prefetch": True, "hoist_smooth": True},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--variants", default="", help="comma-separated names (default: all)")
    p.add_argument("--layouts", default="natural,split")
    p.add_argument("--kernel", choices=("fold", "tile"), default="fold",
                   help="fold: act_quant_shuffle (permute=shuffle); tile: act_quant_tile's one-tile kernel")
    p.add_argument("--permute", default=None, help="the transform's permutation (default: shuffle for fold, zigzag "
                                                   "for tile)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = p.parse_args()
    code = kernel_bench.cannot_run("act_variants")
    if code is not None:
        return code
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.random_layers import random_activations, random_transform

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = variants(sms) if a.kernel == "fold" else TILE_VARIANTS
    run = act_quant_shuffle if a.kernel == "fold" else act_quant_tile
    permute = a.permute or ("shuffle" if a.kernel == "fold" else "zigzag")
    names = [n for n in a.variants.split(",") if n] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown --variants {unknown} for --kernel {a.kernel}: choose from {list(table)}")
    rows, bad = [], []
    for shape in a.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        plan = build_act_plan(random_transform(k, "duquant", 128, seed=k, steps=4, permute=permute), k, "cuda")
        x = random_activations(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
        for layout in a.layouts.split(","):
            ref = run(x, plan, clip=0.9, layout=layout)
            row = {"shape": shape, "layout": layout}
            for name in names:
                if name in K2048_STEPS and k != 2048:
                    row[name] = "n/a"
                    continue
                kw = table[name]
                out = run(x, plan, clip=0.9, layout=layout, **kw)
                same = all((u is None and v is None) or torch.equal(u, v) for u, v in zip(ref, out))
                if not same:
                    bad.append(f"{shape} {layout} {name}")
                    row[name] = "differs"
                    continue
                row[name] = kernel_bench.time_graph(lambda: run(x, plan, clip=0.9, layout=layout, **kw), calls=20)
            rows.append(row)
            print({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    env = kernel_bench.env_info()
    md = [f"Activation kernel launch variants ({a.kernel} kernel, permute={permute}), µs per call, {env['gpu']}, "
          f"commit {env['commit']}, "
          f"{env['date']}", "", "| shape | layout | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        md.append(f"| {r['shape']} | {r['layout']} | " + " | ".join(
            f"{r[n]:.2f}" if isinstance(r[n], float) else str(r[n]) for n in names) + " |")
    kernel_bench.write(a.out, "act_variants", {"env": env, "kernel": a.kernel, "permute": permute, "rows": rows,
                                               "differs": bad}, "\n".join(md) + "\n")
    if bad:
        print("outputs differ from the default launch:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
