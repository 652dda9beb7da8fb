"""DuQuant activation transform (smooth -> R1 -> permutation -> R2 -> per-token asymmetric int8) on pi0's
activation shapes: the block-tile kernel (kernels/triton_act_tile.py) against today's fused kernel
(kernels/triton_act.py) and the naive torch version under torch.compile, and against the memory floor.

    PYTHONPATH=src python3 bench/act_transform.py [--out DIR] [--quick] [--no-compile] [--shapes 816x2048,51x1024]
        [--permute zigzag,shuffle]

- Correctness first, on fresh random inputs with outlier channels (bf16), against the eager spec
  ``reference.act_quant`` on the CPU, outputs poisoned before each call: every kernel variant that is timed is
  also checked (codes, scales, zero points, row sums; tolerances of docs/gpu.md per rotation precision).
- Times: median of CUDA-graph replays (20 calls per graph), input L2-hot as in a model.
- Floor: (2 B read + 1 B written per element + 12 B per token) at the device copy bandwidth measured here.
- Writes act_transform.{json,md} to --out (default $OUT). Exits 1 if any correctness check failed, 2 if it
  cannot run (no CUDA / triton).
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

T0 = time.time()
SHAPES = [(816, 2048), (816, 16384), (51, 1024), (51, 4096), (768, 1152), (768, 4304)]
TARGETS = {(816, 2048): ("x floor", 3.0), (816, 16384): ("x floor", 3.0), (51, 1024): ("us", 5.0),
           (51, 4096): ("us", 5.0)}
# max |code - spec|, share of codes differing, per-token scale rel. error (docs/gpu.md, tests/test_kernels.py)
TOLERANCE = {"ieee": (1, 1e-4, 1e-5), "tf32": (2, 0.1, 5e-3), "fp16": (2, 0.1, 5e-3), "bf16": (8, 0.5, 5e-2)}


def time_graph(fn, calls: int = 20, iters: int = 15) -> float:
    """Median µs per call of fn, from replays of one CUDA graph holding `calls` calls."""
    return kernel_bench.time_graph(fn, iters=iters, calls=calls)


def copy_bandwidth() -> float:
    """GB/s of a 512 MB device-to-device copy (bytes read + written)."""
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_graph(lambda: b.copy_(a), calls=5)
    return 2 * 512 * 2**20 / (t * 1e-6) / 1e9


def naive_act(x, smooth, rot1, perm, rot2, clip: float):
    """The transform + quantization in plain torch ops (the torch.compile baseline): codes - 128, scale, zero - 128."""
    m, k = x.shape
    bs = rot1.shape[-1]
    y = x.float() / smooth
    y = (y.reshape(m, k // bs, bs) @ rot1).reshape(m, k)
    y = y[:, perm]
    y = (y.reshape(m, k // bs, bs) @ rot2).reshape(m, k)
    mn = y.amin(-1, keepdim=True) * clip
    mx = y.amax(-1, keepdim=True) * clip
    scale = ((mx - mn) / 255.0).clamp(1e-8, 1e8)
    zero = torch.round(-mn / scale)
    q = torch.clamp(torch.round(y / scale) + zero, 0, 255) - 128
    return q.to(torch.int8), scale.reshape(-1), (zero - 128).reshape(-1)


def check(name, got, ref, precision, failures, k_codes=None) -> dict:
    """Compare (codes, scale, zero[, rowsum]) with the spec; record a failure with its numbers."""
    codes, sx, zx = got[0], got[1], got[2]
    rc, rsx, rzx = ref
    max_d, max_rate, rtol = TOLERANCE[precision]
    codes = codes[:, :k_codes] if k_codes else codes
    d = (codes.int() - rc.int()).abs()
    rec = {"max |dcode|": int(d.max()), "codes differing": float((d > 0).float().mean()),
           "scale rel": float(((sx - rsx) / rsx).abs().max()),
           "zero |d|": float((zx - rzx).abs().max()) if zx is not None else 0.0}
    ok = (rec["max |dcode|"] <= max_d and rec["codes differing"] <= max_rate and rec["scale rel"] <= rtol
          and rec["zero |d|"] <= max_d and bool(torch.isfinite(sx).all()))
    if len(got) > 3 and got[3] is not None:
        rs_ok = torch.equal(got[3], got[0].int().sum(-1, dtype=torch.int32))
        rec["rowsum ok"] = bool(rs_ok)
        ok = ok and rs_ok
    rec["ok"] = bool(ok)
    if not ok:
        failures.append(f"{name}: {rec}")
        print("CHECK FAILED", name, rec, flush=True)
    return rec


def poisoned(m, kc, device, symmetric=False):
    return (torch.full((m, kc), 77, dtype=torch.int8, device=device), torch.full((m,), float("nan"), device=device),
            None if symmetric else torch.full((m,), float("nan"), device=device),
            torch.full((m,), -7, dtype=torch.int32, device=device))


def poison_allocator(nbytes: int, device="cuda") -> None:
    """Fill the caching allocator's free blocks with garbage, so outputs allocated by torch.empty start dirty."""
    t = torch.full((nbytes,), 0x5A, dtype=torch.uint8, device=device)
    del t


def tile_configs(m: int, k: int, quick: bool, shuffle: bool = False) -> list[dict]:
    """The kernel's own default first (required to pass), then explicit launch configurations; with the shuffle
    permutation also its transpose mode (ActPlan.shuffle_piece)."""
    from duquant.kernels.triton_act_tile import default_config

    nbp = 1 << max(0, (-(-k // 128) - 1).bit_length())
    br0, w0, p0 = default_config(m, k)
    # perm_mode given: the tile kernel itself (a shuffle plan's plain default call goes to the folded kernel)
    cfgs = [dict(precision="fp16", perm_mode=p0)]
    if quick:
        if shuffle and br0 * nbp < 128:  # (the transpose mode's 128-row tile does not fit in shared memory)
            cfgs.append(dict(block_tokens=br0, num_warps=w0, perm_mode=2, precision="fp16"))
        cfgs.append(dict(block_tokens=br0, num_warps=w0, perm_mode=1 - p0, precision="fp16"))
        return cfgs
    for rows in sorted({max(16, 16 // nbp * nbp), 32, 64, 128}):
        br = max(1, rows // nbp)
        rows = br * nbp
        if rows < 16 or rows > 256:
            continue
        for warps in ((4,) if rows <= 32 else (4, 8) if rows == 64 else (8, 16)):  # ~64 fp32 acc regs/thread
            for pm in ((0, 1, 2) if shuffle and rows < 128 else (0, 1)):
                # a 128-row tile holds x, y and both matrices: loading the matrices per tile frees ~64 registers
                for hoist in ((True, False) if rows >= 128 else (True,)):
                    c = dict(block_tokens=br, num_warps=warps, perm_mode=pm, precision="fp16", chunk_rows=0)
                    if not hoist:
                        c["hoist"] = False
                    if c not in cfgs:
                        cfgs.append(c)
    if nbp > 16:  # one token in chunks (the default beyond 32 blocks)
        for chunk, warps in ((16, 4), (32, 4), (32, 8), (64, 8)):
            if chunk < nbp:
                cfgs.append(dict(chunk_rows=chunk, num_warps=warps, precision="fp16"))
    cfgs.append(dict(precision="bf16"))
    cfgs.append(dict(precision="tf32"))
    return cfgs


def fold_configs(m: int, k: int, quick: bool) -> list[dict]:
    """The folded shuffle kernel: its default ({}), then (tokens per step, warps) candidates, each with and without
    the x prefetch and the IEEE division (x * (1/s) changes codes against the spec), then other grid sizes."""
    if quick:
        return [{}, {"fold": "transpose"}]
    nb = k // 128
    cands = {16: [(4, 4), (2, 4), (2, 8), (1, 4), (1, 8)], 128: [(1, 8), (1, 16)]}.get(
        nb, [(max(1, 16 // nb), 4), (max(1, 16 // nb), 8), (max(1, 32 // nb), 4)])
    cfgs = [{}]
    for br, warps in cands:
        for prefetch in (False, True):
            for exact in (True, False):
                c = dict(block_tokens=br, num_warps=warps, num_stages=1, prefetch=prefetch)
                if not exact:
                    c["exact_div"] = False
                cfgs.append(c)
    from duquant.kernels.triton_act_shuffle import default_config

    br, warps, stages = default_config(m, k)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4
    cfgs += [dict(block_tokens=br, num_warps=warps, num_stages=stages, programs=p) for p in (sms, 4 * sms)]
    return cfgs + [dict(c, fold="transpose") for c in cfgs if "exact_div" not in c]


def fold_name(c: dict) -> str:
    if c.get("fold"):
        return fold_name({k: v for k, v in c.items() if k != "fold"}) + f" ({c['fold']} fold)"
    if not c:
        return "fold default"
    parts = [f"BR={c['block_tokens']}", f"w={c['num_warps']}", f"st={c['num_stages']}"]
    if c.get("programs"):
        parts.append(f"prog={c['programs']}")
    if c.get("prefetch"):
        parts.append("prefetch")
    if c.get("exact_div") is False:
        parts.append("x*(1/s)")
    return "fold " + ",".join(parts)


def cfg_name(c: dict) -> str:
    parts = [f"tile {c['precision']}"]
    if c.get("chunk_rows"):
        parts.append(f"chunks of {c['chunk_rows']}")
    if "block_tokens" in c:
        parts.append(f"BR={c['block_tokens']}")
    if "num_warps" in c:
        parts.append(f"w={c['num_warps']}")
    if "perm_mode" in c:
        parts.append({0: "scratch", 1: "gather", 2: "transpose"}[int(c["perm_mode"])])
    if c.get("programs"):
        parts.append(f"prog={c['programs']}")
    if c.get("hoist") is False:
        parts.append("per-tile matrices")
    if c.get("prefetch"):
        parts.append("prefetch")
    if c.get("exact_div") is False:
        parts.append("x*(1/s)")
    if len(parts) == 1 or set(c) == {"precision", "perm_mode"}:
        parts.append("default")
    return " ".join(parts[:1]) + " " + ",".join(parts[1:])


def run_shape(m, k, transform, bw, args, failures, permute="zigzag") -> list[dict]:
    from duquant.kernels import reference
    from duquant.kernels.triton_act import act_quant, build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.random_layers import random_activations

    dev = args.device
    plan = build_act_plan(transform, k, dev)
    assert plan.fused, plan.reason
    floor = (m * k * 3 + m * 12) / (bw * 1e9) * 1e6
    rows = []
    # fresh inputs for the checks (seeded per shape, outlier channels), the spec on the CPU in float32
    x = random_activations(m, k, seed=1000 + m + k, dtype=torch.bfloat16, device=dev)
    ref = reference.act_quant(x.cpu(), transform, 8, False, 0.9)
    ref = tuple(t.to(dev) for t in ref)
    ref_split = reference.split_int4_order(ref[0])

    def record(variant, fn, check_fn, required=True, config=None):
        """Check, then time. Wrong numbers always fail the run; an exploratory variant that does not compile
        (required=False) is reported, not failed."""
        row = {"M": m, "K": k, "permute": permute, "variant": variant, "floor us": floor, "config": config,
               "default": bool(config and required)}
        try:
            row.update(check_fn())
            if row.get("ok") and dev == "cuda":
                t = time_graph(fn)
                row.update({"us": t, "x floor": t / floor})
        except Exception as e:  # noqa: BLE001
            row.update({"ok": False, "error": repr(e)[:300]})
            if required:
                failures.append(f"{m}x{k} {variant}: {repr(e)[:300]}")
            traceback.print_exc()
        rows.append(row)
        print(f"[{time.time() - T0:6.1f} s]", {kk: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                               for kk, v in row.items() if kk != "config"}, flush=True)

    # today's fused kernel (tf32 rotations, its default launch configuration)
    def old_check():
        poison_allocator(m * k * 4, dev)
        return check(f"{m}x{k} old", act_quant(x, plan, clip=0.9), ref, "tf32", failures)

    if dev == "cuda":  # (its interpreter run is tests/test_kernels.py's)
        record("old fused (tf32)", lambda: act_quant(x, plan, clip=0.9), old_check)

    # the block-tile kernel, each configuration checked before it is timed
    outs = poisoned(m, k, dev)
    cfgs = tile_configs(m, k, args.quick, shuffle=permute == "shuffle")
    if dev == "cuda" and not args.quick:  # stage 2: the best stage-1 configuration with other grids / matrix loads
        cfgs.append("stage 2")
    for idx, c in enumerate(cfgs):
        if c == "stage 2":
            timed = [r for r in rows if r.get("config") and r["config"]["precision"] == "fp16" and "us" in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r["us"])["config"]
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            flip = dict(hoist=not best.get("hoist", True))
            # exact_div=False: x * (1/scale) instead of IEEE division (a ~15-instruction sequence per element)
            for extra in (dict(programs=sms), dict(programs=4 * sms), dict(programs=16), flip,
                          dict(exact_div=False), dict(prefetch=True), dict(prefetch=True, exact_div=False)):
                c = dict(best, **extra)
                if c not in cfgs:
                    cfgs.append(c)
            continue
        if dev == "cpu" and c["precision"] in ("bf16", "tf32"):  # the interpreter's bf16 dot is wrong; tf32 = ieee
            continue
        def tile_check(c=c):
            got = act_quant_tile(x, plan, clip=0.9, out=poisoned(m, k, dev), **c)
            rec = check(f"{m}x{k} {cfg_name(c)}", got, ref, c["precision"], failures)
            got_s = act_quant_tile(x, plan, clip=0.9, layout="split", out=poisoned(m, 2 * (-(-k // 2)), dev),
                                   **c)
            rec_s = check(f"{m}x{k} {cfg_name(c)} split", (got_s[0],) + tuple(got_s[1:]), (ref_split,) + ref[1:],
                          c["precision"], failures)
            rec["ok"] = rec["ok"] and rec_s["ok"]
            return rec

        record(cfg_name(c), lambda c=c: act_quant_tile(x, plan, clip=0.9, out=outs, **c), tile_check,
               required=idx == 0, config=c)

    # permute=shuffle folded into the matrices (kernels/triton_act_shuffle.py): default first, then a sweep
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle
    from duquant.kernels.triton_act_shuffle import cannot_run as fold_cannot_run

    if permute == "shuffle" and fold_cannot_run(plan) is None:
        for c in fold_configs(m, k, not args.fold_sweep or dev == "cpu"):
            def fold_check(c=c):
                got = act_quant_shuffle(x, plan, clip=0.9, out=poisoned(m, k, dev), **c)
                rec = check(f"{m}x{k} {fold_name(c)}", got, ref, "fp16", failures)
                got_s = act_quant_shuffle(x, plan, clip=0.9, layout="split",
                                          out=poisoned(m, 2 * (-(-k // 2)), dev), **c)
                rec_s = check(f"{m}x{k} {fold_name(c)} split", got_s, (ref_split,) + ref[1:], "fp16", failures)
                rec["ok"] = rec["ok"] and rec_s["ok"]
                return rec

            record(fold_name(c), lambda c=c: act_quant_shuffle(x, plan, clip=0.9, out=outs, **c), fold_check,
                   required=not c, config=dict(c, kernel="fold"))
            if not c:  # the default, writing split order too (what W4 layers run)
                kc2 = 2 * (-(-k // 2))
                out_s = poisoned(m, kc2, dev)
                record("fold default, W4 split order",
                       lambda out_s=out_s: act_quant_shuffle(x, plan, clip=0.9, layout="split", out=out_s),
                       lambda: {"ok": True}, required=False)

    # the default configuration writing the packed-int4 GEMM's order (what W4 layers run)
    kc = 2 * (-(-k // 2))
    outs_split = poisoned(m, kc, dev)

    def split_check():
        got = act_quant_tile(x, plan, clip=0.9, layout="split", out=poisoned(m, kc, dev))
        return check(f"{m}x{k} split", got, (ref_split,) + ref[1:], "fp16", failures)

    record("W4 split order, default (fold for shuffle)", lambda: act_quant_tile(x, plan, clip=0.9, layout="split",
                                                                      out=outs_split), split_check)

    # the same kernel writing e4m3 codes (format w8a8-fp8 with the DuQuant transform): spec formats/fp8.py
    from duquant.formats.fp8 import fp8_quantize

    rc8, rs8 = fp8_quantize(transform.apply(x.cpu().float()), 0.9)
    rc8, rs8 = rc8.float().to(dev), rs8.reshape(-1).to(dev)
    out8 = (torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev), torch.empty(m, device=dev), None, None)

    def fp8_check():
        codes, sx, _, _ = act_quant_tile(x, plan, clip=0.9, fp8=True,
                                         out=(torch.full((m, k), float("nan"), device=dev).to(torch.float8_e4m3fn),
                                              torch.full((m,), float("nan"), device=dev), None, None))
        c = codes.float()
        ulp = torch.exp2(torch.floor(torch.log2(rc8.abs().clamp(min=2.0 ** -9))) - 3).clamp(min=2.0 ** -9)
        ad = (c - rc8).abs()
        rec = {"max |dcode| / (ulp + 0.5)": float((ad / (ulp + 0.5)).max()),
               "codes differing": float((ad > 0).float().mean()),
               "scale rel": float(((sx - rs8) / rs8).abs().max())}
        # fp16 rotations: one e4m3 step, or < 0.5 code units when small; scales as the int8 path's
        rec["ok"] = bool(rec["max |dcode| / (ulp + 0.5)"] <= 1 and rec["codes differing"] <= 0.1
                         and rec["scale rel"] <= 5e-3 and torch.isfinite(c).all())
        if not rec["ok"]:
            failures.append(f"{m}x{k} tile fp8: {rec}")
        return rec

    if dev == "cuda":  # (interpreter: tests/test_formats.py; its fp8 cast differs from the GPU's)
        record("fp8 out (default; fold for shuffle)", lambda: act_quant_tile(x, plan, clip=0.9, fp8=True, out=out8),
               fp8_check)

    if not args.no_compile:
        t = transform.to(dev)
        smooth = t.smooth.float() if t.smooth is not None else torch.ones(k, device=dev)
        r1, r2 = t.rot1[0].float(), t.rot2[0].float()
        perm = t.perm
        kfull = k // 128 * 128
        if kfull == k:
            fn = torch.compile(naive_act, dynamic=False)

            def comp_check():
                got = fn(x, smooth, r1, perm, r2, 0.9)
                return check(f"{m}x{k} torch.compile", got, ref, "tf32", failures)

            record("torch.compile naive", lambda: fn(x, smooth, r1, perm, r2, 0.9), comp_check)
    return rows


def summarize(rows) -> list[dict]:
    out = []
    for m, k, perm in {(r["M"], r["K"], r["permute"]): None for r in rows}:
        rs = [r for r in rows if (r["M"], r["K"], r["permute"]) == (m, k, perm) and r.get("ok") and "us" in r]
        if not rs:
            continue
        tiles = [r for r in rs if r["variant"].startswith("tile fp16")]
        folds = [r for r in rs if r["variant"].startswith("fold") and "split" not in r["variant"]]
        best = min(tiles + folds, key=lambda r: r["us"]) if tiles + folds else None
        default = next((r for r in tiles if r.get("default")), None)
        fold_default = next((r for r in folds if r["variant"] == "fold default"), None)

        def us(prefix, rs=rs):
            got = [r["us"] for r in rs if r["variant"].startswith(prefix)]
            return got[0] if got else None

        s = {"M": m, "K": k, "permute": perm, "floor us": rs[0]["floor us"], "old us": us("old"),
             "torch.compile us": us("torch.compile"), "tile default us": default and default["us"],
             "fold default us": fold_default and fold_default["us"],
             "best us": best and best["us"], "best variant": best and best["variant"]}
        if best:
            s["best x floor"] = best["us"] / s["floor us"]
            tgt = TARGETS.get((m, k))
            if tgt:
                s["target"] = f"<= {tgt[1]:g} {tgt[0]}"
                s["met"] = bool((s["best x floor"] if tgt[0] == "x floor" else best["us"]) <= tgt[1])
        out.append(s)
    return out


def table(rows, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append("" if v is None else (f"{v:.2f}" if abs(v) >= 1 else f"{v:.2g}") if isinstance(v, float)
                         else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _patch_interpreter() -> None:
    """numpy >= 2.4 refuses int() of a 1-element array, which the interpreter's loop bounds need."""
    import triton.runtime.interpreter as interp

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--quick", action="store_true", help="default configuration and the other permutation mode only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--fold-sweep", action="store_true", help="sweep the folded shuffle kernel's launch settings "
                   "(permute=shuffle; without it, its default only)")
    p.add_argument("--shapes", default="", help="e.g. 816x2048,51x1024 (default: all six)")
    p.add_argument("--device", default="cuda", help="cpu: checks only, under TRITON_INTERPRET=1 (no timing)")
    p.add_argument("--permute", default="zigzag", help="zigzag, shuffle or both (zigzag,shuffle): the transform's "
                   "permutation; shuffle runs as a fixed block transpose in the tile kernel where the width allows")
    args = p.parse_args()
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("act_transform: --device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        _patch_interpreter()
    elif kernel_bench.cannot_run("act_transform"):
        return 2
    from duquant.random_layers import random_transform

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    torch.manual_seed(0)
    bw = copy_bandwidth() if args.device == "cuda" else float("nan")
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    failures: list[str] = []
    rows: list[dict] = []
    transforms = {}
    for m, k in shapes:
        for perm in args.permute.split(","):
            if (k, perm) not in transforms:  # a real DuQuant transform (greedy rotations), on random outliers
                transforms[k, perm] = random_transform(k, "duquant", 128, seed=k, steps=4, permute=perm)
            rows += run_shape(m, k, transforms[k, perm], bw, args, failures, perm)
    summary = summarize(rows)
    env = {**kernel_bench.env_info(), "copy GB/s": bw}
    if args.device == "cpu":
        env["gpu"] = "cpu (interpreter, no timing)"
    md = (f"DuQuant activation transform, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
          f"Copy bandwidth {bw:.0f} GB/s; floor = (2 B + 1 B per element + 12 B per token) at that bandwidth. "
          "µs per call, CUDA-graph replays, input L2-hot.\n\n"
          + table(summary, ["M", "K", "permute", "floor us", "old us", "torch.compile us", "tile default us",
                            "fold default us", "best us", "best x floor", "target", "met", "best variant"])
          + "\n## Every variant\n\n"
          + table(rows, ["M", "K", "permute", "variant", "us", "x floor", "max |dcode|", "codes differing",
                         "scale rel", "ok"]))
    return kernel_bench.finish(args.out, "act_transform", {"env": env, "summary": summary, "rows": rows}, md,
                               failures)

if __name__ == "__main__":
    sys.exit(main())
