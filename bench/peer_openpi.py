"""openpi's own PyTorch pi0 / pi0.5 (`PI0Pytorch.sample_actions`), compiled as openpi serves it, timed on this GPU
so our figures can be put beside it from the same machine and session. Never vendors openpi: give the path of an
openpi checkout (its `src/openpi/models_pytorch`, `models/gemma.py`, `shared/` are imported from there) and a
Python environment with openpi's transformers (4.53.2) and jax/flax/beartype, as openpi's own install makes it.
openpi's `transformers_replace` patch is copied over that transformers, as openpi's README instructs.

    python3 bench/peer_openpi.py --openpi-src /path/to/openpi [--models pi0,pi05] [--compile reduce-overhead]

Random weights, bf16 (openpi's selected-parameter precision), 3 cameras (the third masked), a 48-token prompt
(200 for pi0.5, openpi's max_token_len) with 16 real tokens, 10 steps, batch 1: the layout of bench/e2e.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def install_patch(openpi: Path) -> None:
    import transformers

    src = openpi / "src/openpi/models_pytorch/transformers_replace"
    if not src.is_dir():
        sys.exit(f"peer_openpi: {src} not found; --openpi-src must be an openpi checkout")
    shutil.copytree(src, Path(transformers.__file__).parent, dirs_exist_ok=True)


def observation(batch: int, prompt_len: int, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    images = {k: torch.rand(batch, 3, 224, 224, generator=g, device=device) * 2 - 1 for k in KEYS}
    masks = {k: torch.full((batch,), i < 2, dtype=torch.bool, device=device) for i, k in enumerate(KEYS)}
    tokens = torch.randint(3, 257152, (batch, prompt_len), generator=g, device=device)
    tmask = torch.zeros(batch, prompt_len, dtype=torch.bool, device=device)
    tmask[:, :16] = True
    return SimpleNamespace(images=images, image_masks=masks, state=torch.randn(batch, 32, generator=g, device=device),
                           tokenized_prompt=tokens, tokenized_prompt_mask=tmask, token_ar_mask=None,
                           token_loss_mask=None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--openpi-src", required=True, help="openpi checkout (holds src/openpi/models_pytorch)")
    p.add_argument("--models", default="pi0,pi05")
    p.add_argument("--compile", default="reduce-overhead", help="openpi's pytorch_compile_mode ('none': eager)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = p.parse_args()
    openpi = Path(a.openpi_src).resolve()
    install_patch(openpi)
    sys.path.insert(0, str(openpi / "src"))
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

    rows = []
    for name in a.models.split(","):
        pi05 = name == "pi05"
        cfg = SimpleNamespace(pi05=pi05, paligemma_variant="gemma_2b", action_expert_variant="gemma_300m",
                              dtype="bfloat16", action_dim=32, action_horizon=50, max_token_len=200 if pi05 else 48,
                              pytorch_compile_mode=None if a.compile == "none" else a.compile)
        torch.manual_seed(0)
        model = PI0Pytorch(cfg).to("cuda").eval()
        obs = observation(a.batch, cfg.max_token_len)
        noise = torch.randn(a.batch, 50, 32, device="cuda")
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(5):  # compile + cudagraph warm-up
                model.sample_actions("cuda", obs, noise=noise)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            times = []
            for _ in range(a.iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                model.sample_actions("cuda", obs, noise=noise)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
        row = {"peer": "openpi PI0Pytorch", "model": name, "batch": a.batch, "compile": a.compile,
               "ms": round(sorted(times)[len(times) // 2], 3), "warm-up s": round(warm_s, 1),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_openpi.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
