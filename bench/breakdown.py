"""Where the time of one `sample_actions` goes: a torch.profiler breakdown by category, for bf16 and W4A8.

Categories come from where each GPU kernel was launched: inside a Linear (GEMMs), inside attention (score and
value products, softmax), inside a quantized layer (split by kernel name into the activation transform +
quantization and the integer GEMMs), anything else (norms, RoPE, residuals, embeddings: "norms + elementwise").
"idle" is the whole-call CUDA-graph replay time minus the summed kernel time: the gaps between kernels.
The profiled run is the eager (uncompiled) model, so every kernel can be attributed; the compiled fast path's
kernels are listed by name beside it. Kernels launched by Triton's own launcher (the quantized layers' kernels)
carry no CPU op in the profile (an H100 run at a493d52 left 17 of W4A8's 35 ms unattributed, counted as idle), so
for quantized variants the eager table is not written: their breakdown is the fast path's, by kernel name.

    PYTHONPATH=src python3 bench/breakdown.py [--models pi0] [--variants bf16,w4a8,w4a8+w4a16] [--out DIR]

Variants: bf16; w4a8 = DuQuant W4A8 on the LLM + SigLIP (expert bf16, bench/e2e.py's default configuration);
w4a8-all = also the expert; w4a8+w4a16 = the expert in w4a16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import env_info, median_event_ms, quantize_synthetic  # noqa: E402

from duquant.models import build_policy, gemma, make_synthetic_observation, pi0, siglip  # noqa: E402
from duquant.runtime import CapturedPolicy, compile_blocks, fuse_projections  # noqa: E402

CATEGORIES = ("gemm", "attention", "quantized linear")
# variant -> (DuQuant W4A8 parts, w4a16 parts); "w4a8" is the default GPU configuration of bench/e2e.py
QUANTIZED = {"w4a8": (("llm", "vision"), ()), "w4a8-llm": (("llm",), ()),
             "w4a8-all": (("llm", "vision", "expert"), ()), "w4a8+w4a16": (("llm", "vision"), ("expert",))}
SHUFFLE = "-shuffle"  # suffix of a quantized variant: permute=shuffle instead of zigzag (e.g. w4a8-llm-shuffle)


@contextlib.contextmanager
def annotated():
    """Wrap Linear, attention and quantized-layer calls in profiler ranges (restored on exit)."""
    from duquant.layers import DuQuantLinear

    saved = (nn.Linear.forward, gemma.attend, pi0.attend, F.scaled_dot_product_attention, DuQuantLinear.forward)

    def ranged(fn, label):
        def wrapper(*args, **kwargs):
            with record_function(f"cat::{label}"):
                return fn(*args, **kwargs)
        return wrapper

    nn.Linear.forward = ranged(saved[0], "gemm")
    gemma.attend = pi0.attend = ranged(saved[1], "attention")
    siglip.F.scaled_dot_product_attention = ranged(saved[3], "attention")
    DuQuantLinear.forward = ranged(saved[4], "quantized linear")
    try:
        yield
    finally:
        nn.Linear.forward, gemma.attend, pi0.attend = saved[0], saved[1], saved[2]
        siglip.F.scaled_dot_product_attention = saved[3]
        DuQuantLinear.forward = saved[4]


def category_of(event) -> str:
    e = event
    while e is not None:
        if e.name.startswith("cat::"):
            return e.name[5:]
        e = e.cpu_parent
    return "norms + elementwise"


def quantized_split(kernel_name: str) -> str:
    n = kernel_name.lower()
    if "w4a16" in n:
        return "quantized: w4a16 GEMM"
    is_gemm = ("gemm" in n or "mm" in n) and "act" not in n
    return "quantized: int GEMM" if is_gemm else "quantized: act transform + quant"


def breakdown(model, obs, noise) -> dict:
    with torch.no_grad(), annotated():
        model.sample_actions(obs, noise=noise)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.sample_actions(obs, noise=noise)
            torch.cuda.synchronize()
    us = defaultdict(float)
    count = defaultdict(int)
    for ev in prof.events():
        for k in ev.kernels:
            cat = category_of(ev)
            if cat == "quantized linear":
                cat = quantized_split(k.name)
            us[cat] += k.duration
            count[cat] += 1
    return {"kernel us": dict(us), "kernels": dict(count)}


def kernel_names(model, obs, noise, top: int = 15) -> list[tuple[str, float, int]]:
    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.sample_actions(obs, noise=noise)
            torch.cuda.synchronize()
    rows = [(e.key[:80], e.device_time_total, e.count) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def fast_category(kernel_name: str) -> str:
    """Category of a compiled fast-path kernel from its name (inductor names fused kernels after their ops)."""
    n = kernel_name.lower()
    if "softmax" in n:
        return "attention (softmax)"
    if "w4a16" in n:
        return "quantized: w4a16 GEMM"
    if n.startswith("_gemm_"):  # triton_gemm.py's integer kernels
        return "quantized: int GEMM"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "splitk", "xmma", "mm_")):
        return "gemm"
    if "act" in n or "quant" in n:
        return "quantized: act transform + quant"
    return "norms + elementwise (fused)"


def graph_ms(model, obs, noise, iters: int = 20) -> float:
    captured = CapturedPolicy(model, obs)  # raises when capture fails: nothing else is timed
    captured.static_noise.copy_(noise)
    return median_event_ms(captured.replay, iters)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--models", default="pi0")
    p.add_argument("--variants", default="bf16,w4a8")
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    results = []
    for name in a.models.split(","):
        base = build_policy(name, device="cuda", dtype=torch.bfloat16)
        obs = make_synthetic_observation(base.config, batch_size=a.batch, seed=0).to("cuda")
        noise = torch.randn(a.batch, base.config.action_horizon, base.config.action_dim, device="cuda")
        for variant in a.variants.split(","):
            model = copy.deepcopy(base)
            if variant.removesuffix(SHUFFLE) in QUANTIZED:
                from duquant import kernels

                parts, weight_only = QUANTIZED[variant.removesuffix(SHUFFLE)]
                quantize_synthetic(model, parts, 4, weight_only=weight_only,
                                   permute="shuffle" if variant.endswith(SHUFFLE) else "zigzag")
                kernels.prepare_gpu_model(model)
            elif variant != "bf16":
                p.error(f"unknown variant {variant!r} (bf16, {', '.join(QUANTIZED)})")
            # eager attribution misses Triton-launched kernels (module docstring): bf16 only
            bd = breakdown(model, obs, noise) if variant == "bf16" else {"kernel us": {}, "kernels": {}}
            plain_ms = graph_ms(model, obs, noise)
            fuse_projections(model)
            compile_blocks(model)
            fast_ms = graph_ms(model, obs, noise)
            top = kernel_names(model, obs, noise, top=10_000)
            fast_cats = defaultdict(float)
            for kname, t_us, _ in top:
                fast_cats[fast_category(kname)] += t_us / 1000
            top = top[:15]
            total_kernel_ms = sum(bd["kernel us"].values()) / 1000 if bd["kernel us"] else float("nan")
            res = {"model": name, "variant": variant, "batch": a.batch, "graph ms (plain)": plain_ms,
                   "graph ms (fast)": fast_ms, "kernel ms": total_kernel_ms,
                   "idle ms (plain graph)": plain_ms - total_kernel_ms,
                   "by category ms": {k: v / 1000 for k, v in sorted(bd["kernel us"].items())},
                   "kernels by category": bd["kernels"], "fast path by category ms": dict(fast_cats),
                   "fast path top kernels (us, count)": top}
            results.append(res)
            print(json.dumps(res, indent=1), flush=True)
            del model
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        del base
        torch.cuda.empty_cache()
    info = env_info()
    md = [f"One `sample_actions` (10 steps, batch {a.batch}), {info['gpu']}, torch {info['torch']}, commit "
          f"{info['commit']}, {info['date']}. Kernel time by category in the plain model (eager, profiled), "
          "idle = plain whole-call graph replay minus kernel time.", ""]
    cats = sorted({c for r in results for c in r["by category ms"]})
    cols = ["model", "variant", "graph ms (plain)", "graph ms (fast)", "kernel ms", "idle ms (plain graph)", *cats]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r["model"], r["variant"]] + [f"{r[c]:.2f}" for c in cols[2:6]] + \
                [f"{r['by category ms'].get(c, 0):.2f}" for c in cats]
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += ["", "The compiled fast path (fused + compiled + one graph), kernel time by category from kernel names:", ""]
    fcats = sorted({c for r in results for c in r["fast path by category ms"]})
    md += ["| model | variant | " + " | ".join(fcats) + " |", "|" + "---|" * (len(fcats) + 2)]
    for r in results:
        md.append(f"| {r['model']} | {r['variant']} | " +
                  " | ".join(f"{r['fast path by category ms'].get(c, 0):.2f}" for c in fcats) + " |")
    for r in results:
        md += ["", f"Top kernels of the fast path, {r['model']} {r['variant']} (µs total, launches):", ""]
        md += [f"- `{n}`: {t:.0f} µs, {c}" for n, t, c in r["fast path top kernels (us, count)"]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"env": info, "results": results}, indent=1))
    (out / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
