"""Quick GPU smoke test of every kernel on small shapes (first thing to run on a fresh device)."""

import sys
import traceback

import torch

from duquant.kernels import _gemm_weight, gpu_available, reference
from duquant.kernels.triton_act import act_quant, build_act_plan
from duquant.kernels.triton_gemm import int_gemm
from duquant.random_layers import random_activations, random_group

print(gpu_available(), flush=True)
fails = 0
for k, outs, wbits, wsym, gs, asym, m in [(2048, [256, 128], 4, False, None, False, 51),
                                           (1152, [128], 8, False, None, True, 33),
                                           (4304, [64], 4, True, 128, False, 17),
                                           (16384, [64], 8, True, None, False, 9)]:
    try:
        layers = random_group(k, outs, wbits=wbits, w_symmetric=wsym, group_size=gs, act_symmetric=asym, seed=k,
                              steps=2, device="cuda")
        x = random_activations(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
        plan = build_act_plan(layers[0].transform, k, "cuda")
        w = _gemm_weight(layers, share_storage=False)
        rc, rsx, rzx = reference.act_quant(x, layers[0].transform, 8, asym, 0.9)
        for prec in ("ieee", "tf32"):
            codes, sx, zx, rs = act_quant(x, plan, symmetric=asym, clip=0.9, layout="natural", precision=prec)
            d = (codes.int() - rc.int()).abs()
            print(f"act K={k} {prec}: max|dcode|={int(d.max())} flip rate={float((d > 0).float().mean()):.2e} "
                  f"scale rel={float(((sx - rsx) / rsx).abs().max()):.1e}", flush=True)
        codes, sx, zx, rs = act_quant(x, plan, symmetric=asym, clip=0.9, layout="natural", precision="ieee")
        cg = act_quant(x, plan, symmetric=asym, clip=0.9, layout=w.act_layout, precision="ieee")[0]
        for variant in ("nt", "swap"):
            ys = int_gemm(cg, sx, zx, rs, w, variant=variant)
            for layer, y in zip(layers, ys):
                ref = reference.int_gemm(codes, sx, zx, reference.int_weight_from_layer(layer), layer.bias)
                err = float((y.float() - ref).norm() / ref.norm())
                print(f"gemm K={k} W{wbits} sym={wsym} gs={gs} {variant}: rel err {err:.2e}", flush=True)
                fails += err > 5e-3
    except Exception:
        traceback.print_exc()
        fails += 1
print("SMOKE FAILS", fails)
sys.exit(1 if fails else 0)
