# ruff: noqa: B023  (timed lambdas run before the loop moves on)
"""Kernel benchmarks on pi0's shapes (the library of bench/*.py, run through `duquant bench`). CUDA only.

- ``gemm``: every pi0 GEMM shape: bf16 cuBLAS (F.linear), ours (int8 x int8, int8 x packed int4; both
  orientations), torch's own FP8 rowwise ``_scaled_mm`` and ``_int_mm`` (library kernels present with torch),
  each with an output check against a float reference.
- ``act``: the fused activation kernel against memory bandwidth (bytes = bf16 read + int8 write).
- ``stack``: one decoder layer's linear layers per part (LLM M=816, expert M=51, SigLIP M=768), activation
  kernels included, in one CUDA graph over L layers with distinct weights; bf16 unfused / fused vs W4A8 / W8A8.

Each writes <name>.json and <name>.md into the output folder.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, M, K, [N per member]) -- pi0: PaliGemma gemma_2b (width 2048, 8x256 heads, 1 kv head, mlp 16384) on an
# 816-token prefix, gemma_300m action expert (width 1024, mlp 4096) on 51 tokens, SigLIP So400m (1152, mlp 4304)
# on 3 x 256 image tokens.
PI0_GEMMS = [
    ("llm.q", 816, 2048, [2048]), ("llm.kv", 816, 2048, [256]), ("llm.o", 816, 2048, [2048]),
    ("llm.gate/up", 816, 2048, [16384]), ("llm.down", 816, 16384, [2048]),
    ("llm.qkv fused", 816, 2048, [2048, 256, 256]), ("llm.gate+up fused", 816, 2048, [16384, 16384]),
    ("exp.q", 51, 1024, [2048]), ("exp.kv", 51, 1024, [256]), ("exp.o", 51, 2048, [1024]),
    ("exp.gate/up", 51, 1024, [4096]), ("exp.down", 51, 4096, [1024]),
    ("exp.qkv fused", 51, 1024, [2048, 256, 256]), ("exp.gate+up fused", 51, 1024, [4096, 4096]),
    ("vis.qkv fused", 768, 1152, [1152, 1152, 1152]), ("vis.o", 768, 1152, [1152]),
    ("vis.fc1", 768, 1152, [4304]), ("vis.fc2", 768, 4304, [1152]),
]

# one decoder layer per part: groups of (K, [N per member]) sharing an input
PI0_LAYERS = {
    "llm": (816, [(2048, [2048, 256, 256]), (2048, [2048]), (2048, [16384, 16384]), (16384, [2048])]),
    "expert": (51, [(1024, [2048, 256, 256]), (2048, [1024]), (1024, [4096, 4096]), (4096, [1024])]),
    "vision": (768, [(1152, [1152, 1152, 1152]), (1152, [1152]), (1152, [4304]), (4304, [1152])]),
}


def env_info() -> dict:
    """What a result was measured on: GPU, versions, date, and the commit (DUQUANT_COMMIT, set by the caller: the
    device machine gets the working tree without .git)."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": os.environ.get("DUQUANT_COMMIT", "unknown"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def cannot_run(name: str) -> int | None:
    """2 (with one line saying why) when the GPU kernels cannot run here, else None."""
    from duquant.kernels import gpu_available

    ok, why = gpu_available()
    if ok:
        return None
    print(f"{name}: {why}; this benchmark measures GPU kernels", file=sys.stderr)
    return 2


_FLUSH = None


def timeit(fn, reps: int = 20, flush: bool = True) -> float:
    """Median µs of fn, timed as CUDA-graph replays (no host launch overhead in the figure), with the L2 cache
    flushed before each call (a 256 MB memset in the graph, its own time subtracted), like weights coming from
    HBM in a real forward."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    # a read-only flush: a memset would leave 50 MB of dirty lines whose write-back the timed kernel would pay
    def body():
        for _ in range(reps):
            if flush:
                _FLUSH.max()
            fn()

    def only_flush():
        for _ in range(reps):
            _FLUSH.max()

    t = time_graph(body, iters=7)
    if flush:
        t -= time_graph(only_flush, iters=7)
    return t / reps


def median_event_ms(step, iters: int = 20) -> float:
    """Median ms of `step()` (e.g. one graph replay) between two CUDA events."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def check_then_time(label: str, launch, out: torch.Tensor, ref: torch.Tensor, time_fn, failures: list[str],
                    tol: float = 1e-2) -> float | None:
    """The sweeps' rule, a configuration is timed only after its output was checked: ``launch()`` once into
    ``out`` (poisoned with NaN first), its relative L2 error against ``ref``, then ``time_fn()`` (µs). None when the
    output misses ``ref`` by ``tol`` or more (recorded in ``failures``) or the configuration cannot run (out of
    resources, say: printed, not a candidate)."""
    try:
        out.fill_(float("nan"))
        launch()
        torch.cuda.synchronize()
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        if not err < tol:
            failures.append(f"{label}: rel err {err:.3g}")
            return None
        return time_fn()
    except Exception as e:  # noqa: BLE001
        print(f"skip {label}: {str(e)[:120]}", flush=True)
        return None


def time_graph(fn, iters: int = 20, calls: int = 1) -> float:
    """Median µs per call of fn, from replays of one CUDA graph holding `calls` calls (captured after a warm-up
    on a side stream)."""
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return median_event_ms(g.replay, iters) * 1000.0 / calls


def write(out_dir: str | Path, name: str, data: dict, md: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(md)


def finish(out_dir: str | Path, name: str, data: dict, md: str, failures: list[str]) -> int:
    """Write <name>.json / .md (failed checks listed in both), print the Markdown; 1 if any check failed."""
    if failures:
        md += "\n## FAILED CHECKS\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    write(out_dir, name, {**data, "failures": failures}, md)
    print(md)
    if failures:
        print(f"{len(failures)} correctness check(s) FAILED", file=sys.stderr)
        return 1
    return 0


def table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of `rows` (dicts) in the order of `cols`, floats to 0.1 from 10 up, else to 0.01."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.1f}" if isinstance(v, float) and abs(v) >= 10 else
                         (f"{v:.2f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- random operands in kernel layout -----------------------------------------------------------------------------

def random_gemm_weight(k: int, splits: list[int], wbits: int, w_symmetric: bool, device="cuda", bias=False,
                       seed: int = 0):
    """A GemmWeight with random codes / scales (no layer), plus its dequantized float32 [N, K] for checking."""
    from duquant.kernels.triton_gemm import W_INT4, W_INT8, W_UINT8, GemmWeight
    from duquant.quantizers import pack_int4

    g = torch.Generator(device=device).manual_seed(seed)
    n = sum(splits)
    if wbits == 4:
        codes = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.int16)
        zero = torch.full((n,), 8, device=device, dtype=torch.int32) if w_symmetric else \
            torch.randint(4, 12, (n,), generator=g, device=device, dtype=torch.int32)
        data, kind = pack_int4(codes.to(torch.uint8)), W_INT4
    elif w_symmetric:
        codes = torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int16)
        zero = torch.zeros(n, device=device, dtype=torch.int32)
        data, kind = codes.to(torch.int8), W_INT8
    else:
        u = torch.randint(0, 256, (n, k), generator=g, device=device, dtype=torch.int16)
        codes = u - 128
        zero = torch.randint(-20, 20, (n,), generator=g, device=device, dtype=torch.int32)
        data, kind = u.to(torch.uint8), W_UINT8
    scale = torch.rand(n, generator=g, device=device) * 0.01 + 0.001
    colsum = (codes.float() - zero[:, None].float()).sum(1)
    b = torch.randn(n, generator=g, device=device) * 0.1 if bias else None
    w = GemmWeight(data=data.contiguous(), kind=kind, N=n, K=k, scale=scale, zero=zero, colsum=colsum, bias=b,
                   group_size=None, splits=tuple(splits))
    deq = (codes.float() - zero[:, None].float()) * scale[:, None]
    return w, deq


def random_act_codes(m: int, k: int, device="cuda", seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-128, 128, (m, k), generator=g, device=device, dtype=torch.int16).to(torch.int8)
    sx = torch.rand(m, generator=g, device=device) * 0.05 + 0.01
    zx = torch.randint(-10, 10, (m,), generator=g, device=device).float()
    return codes, sx, zx


# ---- GEMM shapes --------------------------------------------------------------------------------------------------

def bench_gemm(out_dir, shapes=None, formats=("w8a8-sym", "w8a8", "w4a8")) -> dict:
    from duquant.kernels import reference
    from duquant.kernels.triton_gemm import _launch

    shapes = shapes or PI0_GEMMS
    rows = []
    for name, m, k, splits in shapes:
        n = sum(splits)
        row = {"shape": name, "M": m, "K": k, "N": n}
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        row["bf16 us"] = timeit(lambda: F.linear(x, wb))
        # torch FP8 rowwise (library; GEMM only, activation already quantized)
        try:
            xf = x.to(torch.float8_e4m3fn)
            wf = wb.to(torch.float8_e4m3fn)
            sa = torch.ones(m, 1, device="cuda")
            sb = torch.ones(1, n, device="cuda")
            row["fp8 _scaled_mm us"] = timeit(lambda: torch._scaled_mm(xf, wf.t(), scale_a=sa, scale_b=sb,
                                                                     out_dtype=torch.bfloat16, use_fast_accum=True))
        except Exception as e:  # noqa: BLE001
            row["fp8 _scaled_mm us"] = f"n/a ({type(e).__name__})"
        try:
            if m > 16:
                xi = torch.randint(-128, 127, (m, k), device="cuda", dtype=torch.int8)
                wi = torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8)
                row["_int_mm us"] = timeit(lambda: torch._int_mm(xi, wi.t()))
        except Exception as e:  # noqa: BLE001
            row["_int_mm us"] = f"n/a ({type(e).__name__})"
        for fmt in formats:
            wbits = 4 if fmt == "w4a8" else 8
            w, deq = random_gemm_weight(k, splits, wbits, w_symmetric=fmt.endswith("-sym"), bias=False)
            codes, sx, zx = random_act_codes(m, k)
            rs = reference.code_row_sums(codes)
            xin = reference.split_int4_order(codes) if w.act_layout == "split" else codes
            ref = ((codes.float() - zx[:, None]) * sx[:, None]) @ deq.T
            outs = [torch.empty(m, s, device="cuda", dtype=torch.bfloat16) for s in splits]
            for variant in ("nt", "swap"):
                _launch(variant, xin, sx, zx, rs, w, outs)  # autotune
                t = timeit(lambda variant=variant: _launch(variant, xin, sx, zx, rs, w, outs))
                y = torch.cat([o.float() for o in outs], 1)
                err = float((y - ref).norm() / ref.norm())
                row[f"{fmt} {variant} us"] = t
                row[f"{fmt} {variant} err"] = err
            best = min(row[f"{fmt} nt us"], row[f"{fmt} swap us"])
            row[f"{fmt} best us"] = best
            row[f"{fmt} speedup"] = row["bf16 us"] / best
        rows.append(row)
        print({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    info = env_info()
    cols = ["shape", "M", "K", "N", "bf16 us", "fp8 _scaled_mm us", "_int_mm us"]
    for fmt in formats:
        cols += [f"{fmt} nt us", f"{fmt} swap us", f"{fmt} speedup"]
    md = (f"GEMM only (activation codes given), {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
          f"{info['date']}. µs = median of triton do_bench (L2 flushed). Output rel. error vs float32 reference "
          f"in the JSON (bf16 rounding: ~2e-3).\n\n" + table(rows, cols))
    data = {"env": info, "rows": rows}
    write(out_dir, "gemm_shapes", data, md)
    return data


# ---- activation kernel --------------------------------------------------------------------------------------------

def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), flush=False)
    return 2 * a.numel() / (t * 1e-6) / 1e9


def bench_act(out_dir, cases=None, sweep: bool = True) -> dict:
    from duquant.kernels.triton_act import _launch_config, act_quant, build_act_plan
    from duquant.random_layers import random_transform

    cases = cases or [(816, 2048), (816, 16384), (51, 1024), (51, 2048), (51, 4096), (768, 1152), (768, 4304)]
    bw = copy_bandwidth()
    rows = []
    plans = {}
    for m, k in cases:
        if k not in plans:
            plans[k] = build_act_plan(random_transform(k, "duquant", 128, seed=k, steps=4), k, "cuda")
        plan = plans[k]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        nbytes = m * k * 3 + m * 16
        floor_us = nbytes / (bw * 1e9) * 1e6
        bm, warps = _launch_config(m, plan.KP, plan.BS, True)
        variants = [(f"fused BM={bm},w={warps}", dict(impl="fused")), ("fused bf16", dict(precision="bf16"))]
        if sweep and (m, k) in ((816, 2048), (816, 16384), (51, 1024)):
            variants += [(f"fused BM={b},w={wp}{' ' + tag if tag else ''}", dict(block_m=b, num_warps=wp, **extra))
                         for b, wp in ((1, 4), (2, 4), (2, 8), (4, 4), (8, 8))
                         for tag, extra in (("", {}), ("hoist", dict(hoist=True)), ("1 prog/SM", dict(programs=132)),
                                            ("bf16", dict(precision="bf16")))
                         if b * plan.KP // plan.BS >= 16 and b * plan.KP <= 32768]
            variants += [("fused no-perm", dict(disable=("HAS_PERM",))),
                         ("fused no-rot", dict(disable=("HAS_PERM", "HAS_R1", "HAS_R2")))]
        for vname, kw in variants:
            try:
                act_quant(x, plan, clip=0.9, **kw)
                t = timeit(lambda kw=kw: act_quant(x, plan, clip=0.9, **kw), flush=False)  # x is L2-hot in a model
            except Exception as e:  # noqa: BLE001
                print("act variant failed", m, k, vname, repr(e)[:200], flush=True)
                continue
            rows.append({"M": m, "K": k, "variant": vname,
                         "us": t, "GB/s": nbytes / (t * 1e-6) / 1e9, "floor us": floor_us,
                         "of copy bw": floor_us / t})
            print(rows[-1], flush=True)
    info = env_info()
    info["copy GB/s"] = bw
    md = (f"Fused DuQuant activation kernel (smooth, rot1, perm, rot2, asym per-token int8; 128-wide blocks), "
          f"{info['gpu']}, {info['date']}. Device copy bandwidth {bw:.0f} GB/s; floor = (2 B read + 1 B write) "
          f"per element at that bandwidth.\n\n" + table(rows, ["M", "K", "variant", "us", "GB/s", "floor us",
                                                                 "of copy bw"]))
    data = {"env": info, "rows": rows}
    write(out_dir, "act_kernel", data, md)
    return data


# ---- one decoder layer per part -----------------------------------------------------------------------------------

def _bf16_group(k, outs, device="cuda"):
    return [torch.randn(n, k, device=device, dtype=torch.bfloat16) / math.sqrt(k) for n in outs]


def bench_stack(out_dir, parts=("llm", "expert", "vision"), nlayers: int = 2,
                formats=(("w4a8", 4, False), ("w8a8", 8, False), ("w8a8-sym", 8, True))) -> dict:
    from duquant.kernels import GpuLinearGroup
    from duquant.random_layers import random_group

    rows = []
    for part in parts:
        m, groups = PI0_LAYERS[part]
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _ in groups]
        bf = [[_bf16_group(k, outs) for k, outs in groups] for _ in range(nlayers)]
        bf_fused = [[torch.cat(ws) for ws in layer] for layer in bf]

        def run_bf16(bf=bf, xs=xs):
            for layer in bf:
                for x, ws in zip(xs, layer):
                    for w in ws:
                        F.linear(x, w)

        def run_bf16_fused(bf_fused=bf_fused, xs=xs):
            for layer in bf_fused:
                for x, w in zip(xs, layer):
                    F.linear(x, w)

        t_bf = time_graph(run_bf16) / nlayers
        t_bff = time_graph(run_bf16_fused) / nlayers
        bytes_bf = sum(w.numel() * 2 for ws in bf[0] for w in ws)
        row = {"part": part, "M": m, "bf16 us": t_bf, "bf16 fused us": t_bff}
        del bf, bf_fused
        for fmt, wbits, wsym in formats:
            qlayers = []
            for li in range(nlayers):
                gl = []
                for gi, (k, outs) in enumerate(groups):
                    layers = random_group(k, outs, wbits=wbits, w_symmetric=wsym, bias=False, seed=100 * li + gi,
                                          steps=4, device="cuda")
                    gl.append(GpuLinearGroup(layers))
                qlayers.append(gl)

            def run_q(qlayers=qlayers, xs=xs):
                for gl in qlayers:
                    for x, g in zip(xs, gl):
                        g.forward_all(x)

            t_q = time_graph(run_q) / nlayers
            # breakdown on layer 0: activation kernels alone, GEMMs alone
            from duquant.kernels.triton_act import act_quant
            from duquant.kernels.triton_gemm import int_gemm

            acts = [act_quant(x, g.plan, clip=g.clip, layout=g.gemms[0][1].act_layout)
                    for x, g in zip(xs, qlayers[0])]

            def run_act(qlayers=qlayers, xs=xs):
                for x, g in zip(xs, qlayers[0]):
                    act_quant(x, g.plan, clip=g.clip, layout=g.gemms[0][1].act_layout)

            def run_gemm(qlayers=qlayers, acts=acts):
                for a, g in zip(acts, qlayers[0]):
                    int_gemm(*a, g.gemms[0][1])

            row[f"{fmt} us"] = t_q
            row[f"{fmt} act us"] = time_graph(run_act)
            row[f"{fmt} gemm us"] = time_graph(run_gemm)
            row[f"{fmt} vs bf16"] = t_bf / t_q
            row[f"{fmt} vs bf16 fused"] = t_bff / t_q
            qbytes = sum(g.resident_bytes() for g in qlayers[0])
            row[f"{fmt} bytes/bf16"] = qbytes / bytes_bf
            del qlayers, acts
            torch.cuda.empty_cache()
        rows.append(row)
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    info = env_info()
    cols = ["part", "M", "bf16 us", "bf16 fused us"]
    for fmt, _, _ in formats:
        cols += [f"{fmt} us", f"{fmt} act us", f"{fmt} gemm us", f"{fmt} vs bf16", f"{fmt} vs bf16 fused",
                 f"{fmt} bytes/bf16"]
    md = (f"One decoder layer's linear layers per part (µs per layer, CUDA graph over {nlayers} layers with "
          f"distinct weights; ours = fused activation kernel once per shared input + fused q/k/v and gate/up "
          f"GEMMs; bf16 = cuBLAS F.linear per layer, 'fused' = concatenated q/k/v and gate/up weights). "
          f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, {info['date']}. "
          f"'act' / 'gemm' = the activation kernels / the GEMMs of one layer alone.\n\n" + table(rows, cols))
    data = {"env": info, "rows": rows}
    write(out_dir, "layer_stack", data, md)
    return data


def main_cli(which: str, out_dir: str | None = None, **kw) -> None:
    out_dir = out_dir or os.environ.get("OUT", "bench_out")
    {"gemm": bench_gemm, "act": bench_act, "stack": bench_stack}[which](out_dir, **kw)


# ---- end to end ---------------------------------------------------------------------------------------------------

PART_PREFIX = {
    "llm": "paligemma_with_expert.paligemma.model.language_model.",
    "expert": "paligemma_with_expert.gemma_expert.model.",
    "vision": "paligemma_with_expert.paligemma.model.vision_tower.",
}
_GROUP_NAMES = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("out_proj",), ("gate_proj", "up_proj"), ("down_proj",),
                ("fc1",), ("fc2",)]


def quantize_synthetic(model, parts, wbits: int | str = 4, w_symmetric: bool = False, steps: int = 4,
                       weight_only: tuple = (), permute: str = "zigzag") -> int:
    """Replace the transformer-block linears of `parts` by gpu-backend DuQuantLinear layers with real DuQuant
    transforms (searched once per input width on random outlier activations, not calibrated: this measures speed
    and memory only). `wbits`: 4 or 8 (integer weights, int8 activations) or a format name with an online
    transform (``w8a8-fp8``, ``w4a8-fp8``). Parts in `weight_only` become w4a16 layers instead (no activation
    transform; the format the action expert at M ~ 51 is meant to use). ``permute``: zigzag or shuffle
    (docs/algorithm.md)."""
    from torch import nn

    from duquant import formats
    from duquant.layers import DuQuantLinear
    from duquant.random_layers import random_transform
    from duquant.transform import LayerTransform

    fmt = wbits if isinstance(wbits, str) else formats.name_for_bits(wbits, 8)
    # the fixed 4-bit clip (w4a8, w4a8-fp8); 8-bit and fp8 weights unclipped
    f = formats.get(fmt)
    w_clip = 0.9 if f.weights.startswith("int") and f.wbits <= 4 else 1.0
    prefixes = [PART_PREFIX[p] for p in (*parts, *weight_only)]
    weight_only_prefixes = tuple(PART_PREFIX[p] for p in weight_only)
    n = 0
    searched: dict[int, object] = {}  # one search per input width: the kernels' cost does not depend on the values
    for name, mod in list(model.named_modules()):
        if not any(name.startswith(p) for p in prefixes) or ".layers." not in name:
            continue
        for grp in _GROUP_NAMES:
            lins = [getattr(mod, g, None) for g in grp]
            if not all(isinstance(lin, nn.Linear) for lin in lins):
                continue
            k = lins[0].in_features
            dev = lins[0].weight.device
            if name.startswith(weight_only_prefixes):
                shared = LayerTransform(k, 128, kind="rtn")  # one identity object: the group runs one GEMM
                for g, lin in zip(grp, lins):
                    setattr(mod, g, DuQuantLinear.from_linear(lin, "w4a16", transform=shared, backend="gpu",
                                                              w_clip=0.9))
                n += 1
                continue
            if k not in searched:
                sample_w = torch.cat([lin.weight[:256].detach().float().cpu() for lin in lins])[:256]
                searched[k] = random_transform(k, "duquant", 128, seed=n, steps=steps, weight=sample_w,
                                               permute=permute)
            # a copy per group: groups are told apart by their transform object (kernels.prepare_gpu_model)
            t = copy.deepcopy(searched[k]).to(dev)
            for g, lin in zip(grp, lins):
                setattr(mod, g, DuQuantLinear.from_linear(lin, fmt, transform=t, w_symmetric=w_symmetric,
                                                          w_clip=w_clip, act_clip=0.9, method="duquant",
                                                          backend="gpu"))
            n += 1
    return n


def _model_bytes(model) -> tuple[int, int]:
    from duquant.layers import DuQuantLinear

    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    quant = sum(m.weight_bytes() for m in model.modules() if isinstance(m, DuQuantLinear))
    return total, quant
