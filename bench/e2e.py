"""pi0 / pi0.5 `sample_actions` end to end on CUDA, every variant captured whole in one CUDA graph.

Variants (all on the same full-size random-weight model, bf16 activations):
  bf16 plain      the readable model as it is, captured in one graph (no fusion, no compile)
  bf16 fast       duquant.runtime.optimize: fused q/k/v and gate/up, compiled blocks, one graph
  w4a8 / w8a8     DuQuant on llm+vision (expert bf16) or on every part, gpu backend, plus the same fast path
  w4a16 expert    the action expert's linears in w4a16 (4-bit weights, bf16 activations, no transform), alone
                  or beside W4A8 llm+vision
Each variant's actions are checked against the plain eager model's on the same inputs (relative error printed);
the run exits non-zero if any capture fails or any fast-path output disagrees beyond the tolerance. Nothing is
ever timed in another mode than the one named.

    PYTHONPATH=src python3 bench/e2e.py [--models pi0,pi05] [--batches 1,16] [--variants ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import env_info, median_event_ms, quantize_synthetic  # noqa: E402

from duquant.models import build_policy, make_synthetic_observation  # noqa: E402
from duquant.runtime import CapturedPolicy, compile_blocks, fuse_projections  # noqa: E402

# name -> (DuQuant parts, weight bits or format name, fuse + compile, w4a16 parts)
VARIANTS = {
    "bf16 plain": ((), 0, False, ()),
    "bf16 fast": ((), 0, True, ()),
    "w4a8 llm+vision fast": (("llm", "vision"), 4, True, ()),
    "w4a8 llm fast": (("llm",), 4, True, ()),
    "w4a8 llm+vision w4a16 expert fast": (("llm", "vision"), 4, True, ("expert",)),
    "w4a16 expert fast": ((), 4, True, ("expert",)),
    "w4a8 all fast": (("llm", "vision", "expert"), 4, True, ()),
    "w8a8 llm+vision fast": (("llm", "vision"), 8, True, ()),
    "w8a8-fp8 llm fast": (("llm",), "w8a8-fp8", True, ()),
    "w4a8-fp8 llm fast": (("llm",), "w4a8-fp8", True, ()),
    # the expert too: at batch 16 its products are M = 816 per step (compute-bound), at batch 1 M = 51
    "w8a8-fp8 llm+expert fast": (("llm", "expert"), "w8a8-fp8", True, ()),
    "w4a8-fp8 llm+expert fast": (("llm", "expert"), "w4a8-fp8", True, ()),
    "w8a8-fp8 llm w4a16 expert fast": (("llm",), "w8a8-fp8", True, ("expert",)),
}
SHUFFLE = " shuffle"  # suffix of a quantized variant: permute=shuffle, not zigzag ("w4a8 llm fast shuffle")
GEGLU = " geglu"  # after it: DUQUANT_FUSE_GEGLU=1, the MLP product inside the down projection's activation kernel


def split_variant(v: str) -> tuple[str, bool, bool]:
    """'w4a8 llm fast shuffle geglu' -> ('w4a8 llm fast', shuffle, geglu)."""
    geglu = v.endswith(GEGLU)
    v = v.removesuffix(GEGLU)
    return v.removesuffix(SHUFFLE), v.endswith(SHUFFLE), geglu
TOLERANCE = {"bf16": 0.05, "quant": 0.5}  # relative L2 error of actions vs the plain eager model (see docs/gpu.md)


def model_bytes(model) -> int:
    """Bytes of the model's distinct storages (fused projections' Linears are views of one storage)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run(models, batches, variants, iters: int, out: Path) -> int:
    rows, failures = [], []
    for name in models:
        base = build_policy(name, device="cuda", dtype=torch.bfloat16)
        inputs = {}
        for batch in batches:
            obs = make_synthetic_observation(base.config, batch_size=batch, seed=0).to("cuda")
            noise = torch.randn(batch, base.config.action_horizon, base.config.action_dim, device="cuda",
                                generator=torch.Generator("cuda").manual_seed(0))
            with torch.no_grad():
                inputs[batch] = (obs, noise, base.sample_actions(obs, noise=noise))
        for vname in variants:  # one model per variant (quantized and compiled once), captured per batch size
            base_name, shuffle, geglu = split_variant(vname)
            permute = "shuffle" if shuffle else "zigzag"
            parts, wbits, fast, weight_only = VARIANTS[base_name]
            os.environ["DUQUANT_FUSE_GEGLU"] = "1" if geglu else "0"  # read when the layers are prepared
            model = copy.deepcopy(base) if (parts or fast or weight_only) else base
            t0 = time.perf_counter()
            if parts or weight_only:
                from duquant import kernels

                quantize_synthetic(model, parts, wbits, weight_only=weight_only, permute=permute)
                kernels.prepare_gpu_model(model)
            quant_s = time.perf_counter() - t0
            if fast:
                fuse_projections(model)
                compile_blocks(model)
            # The float base stays allocated beside a copied variant: its bytes are not the variant's.
            held = model_bytes(base) if model is not base else 0
            for batch, (obs, noise, ref) in inputs.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t1 = time.perf_counter()
                try:
                    captured = CapturedPolicy(model, obs)
                except Exception as err:  # a benchmark that cannot capture does not time anything else
                    failures.append(f"{name} b{batch} {vname}: {err}")
                    print("CAPTURE FAILED:", failures[-1][:2000], flush=True)
                    continue
                capture_s = time.perf_counter() - t1
                actions = captured(obs, noise)
                err = rel_err(actions, ref)
                tol = TOLERANCE["quant" if (parts or weight_only) else "bf16"]
                if not err <= tol:
                    failures.append(f"{name} b{batch} {vname}: actions differ from the plain eager model by {err:.3g}")
                ms = median_event_ms(captured.replay, iters)
                peak = (torch.cuda.max_memory_allocated() - held) / 1e9
                row = {"model": name, "batch": batch, "variant": vname, "ms": round(ms, 3),
                       "rel err vs eager": float(f"{err:.3g}"), "quantize s": round(quant_s, 1),
                       "compile+capture s": round(capture_s, 1), "peak GB": round(peak, 2),
                       "weights GB": round(model_bytes(model) / 1e9, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del captured
                gc.collect()
                torch.cuda.empty_cache()
            if model is not base:
                del model
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        del base, inputs
        gc.collect()
        torch.cuda.empty_cache()
    for r in rows:
        plain = next((x for x in rows if (x["model"], x["batch"], x["variant"]) == (r["model"], r["batch"],
                                                                                     "bf16 plain")), None)
        fast = next((x for x in rows if (x["model"], x["batch"], x["variant"]) == (r["model"], r["batch"],
                                                                                    "bf16 fast")), None)
        r["vs bf16 plain"] = round(plain["ms"] / r["ms"], 3) if plain else None
        r["vs bf16 fast"] = round(fast["ms"] / r["ms"], 3) if fast else None
    info = env_info()
    cols = ["model", "batch", "variant", "ms", "vs bf16 fast", "vs bf16 plain", "rel err vs eager", "peak GB",
            "weights GB", "quantize s", "compile+capture s"]
    md = [f"`sample_actions` (10 steps), full-size random weights, {info['gpu']}, torch {info['torch']}, commit "
          f"{info['commit']}, {info['date']}; median of {iters} replays of one whole-call CUDA graph per variant.",
          "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    if failures:
        md += ["", "FAILURES:"] + [f"- {f}" for f in failures]
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps({"env": info, "rows": rows, "failures": failures}, indent=1))
    (out / "e2e.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--models", default="pi0")
    p.add_argument("--batches", default="1")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}; "
                   f"a quantized one may end in '{SHUFFLE}' (permute=shuffle), then '{GEGLU}' "
                   f"(DUQUANT_FUSE_GEGLU=1)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    variants = [v.strip() for v in a.variants.split(",")]
    unknown = [v for v in variants if split_variant(v)[0] not in VARIANTS
               or ((split_variant(v)[1] or split_variant(v)[2]) and not VARIANTS[split_variant(v)[0]][0])
               or (split_variant(v)[2] and not split_variant(v)[1])]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return run(a.models.split(","), [int(b) for b in a.batches.split(",")], variants, a.iters, Path(a.out))


if __name__ == "__main__":
    sys.exit(main())
