"""realtime-vla (Dexmal, "Running VLAs at Real-time Speed", arXiv 2510.26742: hand-written Triton pi0 / pi0.5, bf16)
timed on this GPU beside our bf16 fast path, in one process, so the two figures share a machine and a session.

Never vendors realtime-vla: give the folder holding its `pi0_infer.py` / `pi05_infer.py` (a checkout of
github.com/Dexmal/realtime-vla or a fork of it). Its classes are built as its own `benchmark.py` builds them (a prompt
of random language embeddings, `num_views`, `chunk_size`), with random bf16 weights; ours is the full-size random-
weight policy of bench/e2e.py on the fast path (fused projections, compiled blocks, one CUDA graph per call).

    python3 bench/peer_realtime_vla.py --realtime-vla-src /path/to/realtime-vla [--models pi0,pi05]

Shapes: 3 views of 224 x 224, a 50-step chunk of 32-dim actions, 10 flow steps (realtime-vla's fixed count), the
prompt length of our config (pi0: 48 tokens, pi0.5: 200). Times: median of CUDA-event timings of whole calls after
warm-up (realtime-vla's `forward` runs its own CUDA graphs; ours replays one graph). Exits 1 when either side cannot
run, 2 without CUDA; never times a substitute.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import env_info, median_event_ms, table, write  # noqa: E402

PEER = {"pi0": ("pi0_infer", "Pi0Inference"), "pi05": ("pi05_infer", "Pi05Inference")}


def time_peer(src: Path, name: str, views: int, chunk: int, prompt_len: int, iters: int) -> float:
    sys.path.insert(0, str(src))
    module_name, class_name = PEER[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    g = torch.Generator().manual_seed(0)
    ckpt = {"language_embeds": torch.randn(prompt_len, 2048, generator=g, dtype=torch.bfloat16)}
    kwargs = {"discrete_state_input": False} if name == "pi05" else {}
    infer = cls(ckpt, num_views=views, chunk_size=chunk, **kwargs)
    for w in getattr(infer, "weights", {}).values():  # allocated with torch.empty: give them finite values
        if torch.is_tensor(w) and w.is_floating_point():
            w.normal_(0.0, 0.02)
    gc = torch.Generator("cuda").manual_seed(0)
    image = torch.randn(views, 224, 224, 3, generator=gc, device="cuda").to(torch.bfloat16)
    noise = torch.randn(chunk, 32, generator=gc, device="cuda").to(torch.bfloat16)
    args = (image, noise) if name == "pi05" else (image, torch.randn(32, generator=gc, device="cuda").to(
        torch.bfloat16), noise)
    for _ in range(3):
        infer.forward(*args)
    torch.cuda.synchronize()
    return median_event_ms(lambda: infer.forward(*args), iters)


def time_ours(name: str, iters: int) -> tuple[float, int]:
    from duquant.models import build_policy, make_synthetic_observation
    from duquant.runtime import CapturedPolicy, compile_blocks, fuse_projections

    model = build_policy(name, device="cuda", dtype=torch.bfloat16)
    obs = make_synthetic_observation(model.config, batch_size=1, seed=0).to("cuda")
    fuse_projections(model)
    compile_blocks(model)
    captured = CapturedPolicy(model, obs)  # raises when capture fails: nothing else is timed
    ms = median_event_ms(captured.replay, iters)
    prompt_len = model.config.max_token_len
    del captured, model
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return ms, prompt_len


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realtime-vla-src", required=True, help="folder holding realtime-vla's pi0_infer.py")
    p.add_argument("--models", default="pi0,pi05")
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("peer_realtime_vla: no CUDA device", file=sys.stderr)
        return 2
    src = Path(a.realtime_vla_src).resolve()
    if not (src / "pi0_infer.py").is_file():
        print(f"peer_realtime_vla: {src} has no pi0_infer.py; give a realtime-vla checkout", file=sys.stderr)
        return 1
    rows, failed = [], False
    for name in a.models.split(","):
        ours_ms, prompt_len = time_ours(name, a.iters)
        try:
            peer_ms = time_peer(src, name, a.views, a.chunk, prompt_len, a.iters)
        except Exception as err:  # noqa: BLE001  (report which side could not run, then fail)
            print(f"peer_realtime_vla: realtime-vla {name} could not run: {err}", file=sys.stderr)
            failed = True
            continue
        row = {"model": name, "views": a.views, "prompt tokens": prompt_len, "chunk": a.chunk,
               "ours bf16 fast ms": round(ours_ms, 3), "realtime-vla ms": round(peer_ms, 3),
               "ours / realtime-vla": round(ours_ms / peer_ms, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = env_info()
    md = (f"realtime-vla beside our bf16 fast path, {info['gpu']}, torch {info['torch']}, commit {info['commit']}, "
          f"{info['date']}; median of {a.iters} calls each.\n\n"
          + table(rows, ["model", "views", "prompt tokens", "ours bf16 fast ms", "realtime-vla ms",
                         "ours / realtime-vla"]))
    write(a.out, "peer_realtime_vla", {"env": info, "rows": rows}, md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
