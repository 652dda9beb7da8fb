"""Where the w8a8-fp8 gpu path departs from its float32 reference: activation codes (kernel vs the spec's e4m3
rounding), scales, and the product with and without _scaled_mm's fast accumulation. CUDA, sm89+.

    PYTHONPATH=src python3 bench/fp8_check.py [--shapes 51x1024x4096,816x2048x2048]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


def check(m: int, k: int, n: int) -> dict:
    from duquant.formats.fp8 import fp8_quantize
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.layers import DuQuantLinear

    torch.manual_seed(k + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    layer = DuQuantLinear.from_linear(lin, "w8a8-fp8").cuda()
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    ref = layer.fmt.reference(layer, x)
    plan = build_act_plan(layer.transform, k, "cuda")
    codes, sx, _, _ = act_quant_tile(x, plan, clip=layer.act_clip, fp8=True)
    rc, rs = fp8_quantize(layer.transform.apply(x.float()), layer.act_clip)
    flips = int((codes.float() != rc.float()).sum())
    out = {"shape": f"{m}x{k}x{n}", "code flips": flips, "codes": codes.numel(),
           "scale max rel diff": float(((sx - rs.reshape(-1)).abs() / rs.reshape(-1)).max())}
    layer.backend = "gpu"
    y = layer(x).float()
    tol = 2.0 ** -7 * ref.abs() + 1e-2 * ref.abs().max()
    out["err/tol max (model path)"] = float(((y - ref).abs() / tol).max())
    wt = layer._gpu_state.group.weight_t if hasattr(layer, "_gpu_state") else None
    if wt is not None:
        sw = layer._gpu_state.group.scale_w
        for fast in (True, False):
            yy = torch._scaled_mm(codes, wt, scale_a=sx.reshape(-1, 1), scale_b=sw, out_dtype=torch.float32,
                                  use_fast_accum=fast)
            if layer.bias is not None:
                yy = yy + layer.bias.float()
            out[f"err/tol fast_accum={fast} (f32 out)"] = float(((yy - ref).abs() / tol).max())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="51x1024x4096,51x4096x1024,816x2048x2048")
    a = p.parse_args()
    for s in a.shapes.split(","):
        print(check(*(int(v) for v in s.split("x"))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
