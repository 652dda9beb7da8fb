"""Block-scope refinement of DuQuant's learned rotations on Gemma 3 270M (CPU; prototype, docs/report.md "Item 5,
ninth session").

`duquant.rotation_refine` fits each group's rotations to the group's own linear output. Here the rotations of
every group of one decoder layer are refined jointly (the same Cayley parametrisation, `rotation_refine._Blocks`)
so that a larger scope's output matches the float one, every Linear of the scope fake-quantized through its
transform (per-token activations, per-channel weights, round-to-nearest with a straight-through estimator):

  block  the decoder layer's output (attention with q/k norms, RoPE, the post-norms, the GeGLU), on the layer
         inputs of the calibration windows captured with a forward pre-hook; all four groups learned at once
  geglu  act(gate(x)) * up(x) for the gate/up group alone (the other groups: the per-group refinement)
  mlpout down(act(gate(x)) * up(x)) with gate / up quantized and the down projection in float, gate/up group alone

Two modes:

  --pilot   layers 3, 9, 15 (--layers): the decoder-layer output error on held-out windows 4-5 (relative to the
            float layer's update, out - in) of the greedy transforms, the per-group refinement and the new
            objectives, W4A4 RTN, no clip search
  (default) one full row as bench/gemma_refine.py (gptq-clip, act clip search, 20 windows), the transforms of each
            layer refined by --objective's loss after the per-group refinement (starting from the per-group result;
            a checkpoint is kept only if the calibration-set loss beats it)

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/gemma_block_refine.py --pilot --seed 0
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/gemma_block_refine.py --objective mlpout --seed 0 --steps 200 \
        --block-steps 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from duquant.rotation_refine import _Blocks, _fake_quant_rows
from duquant.transform import LayerTransform


class Learn:
    """A LayerTransform whose block rotations are R0 @ cayley(A) (A learnable, 0 at start); smoothing and
    permutation fixed."""

    def __init__(self, t: LayerTransform):
        self.t, self.c, self.bs = t, t.in_features, t.block_size
        self.smooth = t.smooth.float() if t.smooth is not None else None
        self.perm = t.perm
        self.blocks = {n: _Blocks(getattr(t, n).float(), self.c, self.bs, t._shared(n, getattr(t, n)))
                       for n in ("rot1", "rot2") if getattr(t, n) is not None}
        self.mats = None

    def params(self) -> list[torch.Tensor]:
        return [p for b in self.blocks.values() for p in b.params()]

    def refresh(self) -> None:
        self.mats = {n: b.matrices() for n, b in self.blocks.items()}

    def _ops(self, v: torch.Tensor) -> torch.Tensor:
        for n in ("rot1", "perm", "rot2"):
            if n == "perm":
                if self.perm is not None:
                    v = v[:, self.perm]
            elif n in self.blocks:
                v = self.blocks[n].apply(v, self.mats[n])
        return v

    def x(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops(x / self.smooth if self.smooth is not None else x)

    def w(self, w: torch.Tensor) -> torch.Tensor:
        return self._ops(w * self.smooth if self.smooth is not None else w)

    def final(self) -> LayerTransform:
        if all(not bool(p.detach().abs().sum()) for p in self.params()):
            return self.t
        new = {n: b.final() for n, b in self.blocks.items()}
        t = self.t
        return LayerTransform(t.in_features, t.block_size, smooth=t.smooth, rot1=new.get("rot1", t.rot1),
                              perm=t.perm, rot2=new.get("rot2", t.rot2), kind=t.kind, permutation=t.permutation)


class FakeQLinear(nn.Module):
    """x -> Q_a(T x) Q_w(W T)^T, differentiable in the transform's A (STE rounding)."""

    def __init__(self, weight: torch.Tensor, learn: Learn, q: dict):
        super().__init__()
        self.weight_f, self.learn, self.q = weight.detach().float(), learn, q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = self.learn.x(x.reshape(-1, x.shape[-1]).float())
        if self.q["abits"] not in (0, 16):
            xt = _fake_quant_rows(xt, self.q["abits"], False, self.q["act_clip"], True)
        wq = _fake_quant_rows(self.learn.w(self.weight_f), self.q["wbits"], False, self.q["w_clip"], False)
        return (xt @ wq.T).reshape(*lead, -1)


def _parent_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


class Swapped:
    """Context: the Linears `names` (relative to `root`) replaced by FakeQLinear through `learns[name]`."""

    def __init__(self, root: nn.Module, names: list[str], learns: dict[str, Learn], q: dict):
        self.root, self.names, self.learns, self.q, self.saved = root, names, learns, q, {}
        self.weights = {n: root.get_submodule(n).weight for n in names}

    def __enter__(self):
        for n in self.names:
            parent, attr = _parent_attr(self.root, n)
            lin = getattr(parent, attr)
            self.saved[n] = lin
            setattr(parent, attr, FakeQLinear(self.weights[n], self.learns[n], self.q))
        return self

    def __exit__(self, *exc):
        for n, lin in self.saved.items():
            parent, attr = _parent_attr(self.root, n)
            setattr(parent, attr, lin)


def scope_error(fn, inputs, targets, bases, learns_list, root, names, learns, q) -> float:
    """sum ||fn_q(inp) - target||^2 / sum ||target - base||^2 over the windows (no grad)."""
    with torch.no_grad(), Swapped(root, names, learns, q):
        return _err_swapped(fn, inputs, targets, bases, learns_list)


def refine_scope(fn, inputs, targets, bases, root, names, learns: dict[str, Learn], q: dict, *, steps: int,
                 lr: float = 3e-3, per_step: int = 2, eval_every: int = 25, seed: int = 0, log=None) -> float:
    """Adam on the A of every distinct Learn in `learns` against the scope loss; the best checkpoint (the initial
    one included) on the whole calibration set is kept. Returns its loss."""
    uniq = list({id(v): v for v in learns.values()}.values())
    params = [p for lt in uniq for p in lt.params()]
    best = scope_error(fn, inputs, targets, bases, uniq, root, names, learns, q)
    best_p = [p.detach().clone() for p in params]
    if log is not None:
        log.append((0, best))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    den = sum(float((t - b).pow(2).sum()) for t, b in zip(targets, bases, strict=True)) / len(targets)
    with torch.enable_grad(), Swapped(root, names, learns, q):
        for i in range(1, steps + 1):
            idx = torch.randperm(len(inputs), generator=gen)[:per_step].tolist()
            for lt in uniq:
                lt.refresh()
            loss = sum((fn(inputs[j]) - targets[j]).pow(2).sum() for j in idx) / (den * len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % eval_every == 0 or i == steps:
                with torch.no_grad():
                    cur = _err_swapped(fn, inputs, targets, bases, uniq)
                if log is not None:
                    log.append((i, cur))
                if cur < best:
                    best, best_p = cur, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best_p, strict=True):
            p.copy_(b)
    return best


def _err_swapped(fn, inputs, targets, bases, uniq) -> float:
    """The scope error of `fn` with the Linears already swapped (the transforms' matrices refreshed first)."""
    for lt in uniq:
        lt.refresh()
    num = den = 0.0
    for inp, tgt, base in zip(inputs, targets, bases, strict=True):
        num += float((fn(inp) - tgt).pow(2).sum())
        den += float((tgt - base).pow(2).sum())
    return num / max(den, 1e-30)


class Captures:
    """Per decoder layer: its inputs (hidden states, kwargs) and outputs, and the MLP's inputs, per window."""

    def __init__(self, layers: nn.ModuleList, keep: set[int]):
        self.inp = {i: [] for i in keep}
        self.out = {i: [] for i in keep}
        self.mlp = {i: [] for i in keep}
        self.handles = []
        for i in keep:
            layer = layers[i]
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))
            self.handles.append(layer.mlp.register_forward_pre_hook(self._mlp(i)))

    def _pre(self, i):
        def hook(mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
            h = args[0] if args else kw.pop("hidden_states")
            self.inp[i].append((h.detach().clone(), kw))
        return hook

    def _post(self, i):
        def hook(mod, args, out):
            self.out[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    def _mlp(self, i):
        def hook(mod, args):
            self.mlp[i].append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def capture(model, windows, keep: set[int]) -> Captures:
    cap = Captures(model.model.layers, keep)
    try:
        with torch.no_grad():
            for x in windows:
                model(input_ids=x, use_cache=False)
    finally:
        cap.remove()
    return cap


def layer_groups(groups: list[list[str]], i: int) -> list[list[str]]:
    tag = f"model.layers.{i}."
    return [g for g in groups if g[0].startswith(tag)]


def block_fn(layer):
    def fn(inp):
        h, kw = inp
        out = layer(h, **kw)
        return out[0] if isinstance(out, tuple) else out
    return fn


def geglu_fn(mlp):
    def fn(x):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return fn


def mlpout_fn(mlp, down_weight: torch.Tensor):
    """The MLP's output with gate / up quantized and the down projection in float (the GeGLU's error as the down
    projection sees it)."""
    def fn(x):
        return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)) @ down_weight.T
    return fn


def learns_for(groups: list[list[str]], transforms: dict[tuple, LayerTransform], prefix: str) -> dict[str, Learn]:
    out = {}
    for g in groups:
        lt = Learn(transforms[tuple(g)])
        for n in g:
            out[n[len(prefix):]] = lt
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="/tmp/gemma3-270m")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="per-group rotation_refine_steps (before the block loss)")
    p.add_argument("--block-steps", type=int, default=100, help="Adam steps of the block loss per decoder layer")
    p.add_argument("--block-lr", type=float, default=3e-3)
    p.add_argument("--per-step", type=int, default=2, help="calibration windows per block-loss step")
    p.add_argument("--objective", choices=("block", "geglu", "mlpout"), default="block",
                   help="full row: the scope refined after the per-group refinement")
    p.add_argument("--pilot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="full row with RTN rounding and no clip search (a quick check)")
    p.add_argument("--layers", default="3,9,15")
    p.add_argument("--variants", default="geglu,mlpout,block_from_greedy,block_from_group",
                   help="pilot: the refinements compared with the greedy and per-group transforms")
    a = p.parse_args()

    from duquant import api
    from duquant import real_models as rm
    from duquant.calibration import calibrate
    from duquant.config import DuQuantConfig
    from duquant.selection import select_layers

    torch.set_num_threads(1)
    model, tok, _ = rm.load_checkpoint(a.checkpoint)
    with open(a.text) as f:
        w = rm.text_windows(tok, f.read(), 256, 100)
    calib, held, check = w[0:4] + w[6:22], w[4:6], w[22:29]
    base = DuQuantConfig(w_clip=0.9, gptq_damp=0.1).replace(scope="", include=rm.BLOCK_LINEARS, preset=None)
    cfg = base.replace(method="duquant", wbits=4, abits=4, weight_rounding="gptq-clip", seed=a.seed,
                       rotation_refine_steps=a.steps, act_clip_search=True)
    if a.smoke:
        cfg = cfg.replace(weight_rounding="rtn", act_clip_search=False)
    sel = select_layers(model, base)
    modules = dict(sel.modules)
    q = dict(wbits=4, abits=4, act_clip=cfg.activation_clip_for(4), w_clip=cfg.weight_clip(4))
    t_start = time.perf_counter()
    with torch.no_grad():
        cal = calibrate(model, modules, lambda m: [m(input_ids=x) for x in calib],
                        max_tokens=base.calib_tokens, seed=base.seed, hessian=True)

    if a.pilot:
        keep = {int(s) for s in a.layers.split(",")}
        cap_c, cap_h = capture(model, calib, keep), capture(model, held, keep)
        rows = []
        for i in sorted(keep):
            layer = model.model.layers[i]
            prefix = f"model.layers.{i}."
            groups = layer_groups(cal.groups, i)
            rel = [n[len(prefix):] for g in groups for n in g]
            bfn = block_fn(layer)
            inp_h = cap_h.inp[i]
            bases_h = [h for h, _ in inp_h]
            inp_c = cap_c.inp[i]
            bases_c = [h for h, _ in inp_c]

            def held_err(tr: dict, layer=layer, groups=groups, prefix=prefix, rel=rel, bfn=bfn, inp_h=inp_h,
                         bases_h=bases_h, i=i):
                ls = learns_for(groups, tr, prefix)
                uniq = list({id(v): v for v in ls.values()}.values())
                return scope_error(bfn, inp_h, cap_h.out[i], bases_h, uniq, layer, rel, ls, q)

            row = dict(layer=i)
            t0 = time.perf_counter()
            greedy = {tuple(g): api.group_transform(g, modules, cal.stats[g[0]],
                                                    cfg.replace(rotation_refine_steps=0)) for g in groups}
            row["greedy"] = held_err(greedy)
            t1 = time.perf_counter()
            group = {tuple(g): api.group_transform(g, modules, cal.stats[g[0]], cfg) for g in groups}
            row["group"], row["group_s"] = held_err(group), round(time.perf_counter() - t1)
            # geglu / mlpout: the gate/up group's rotations (from the per-group result) refined on act(gate) * up,
            # or on the MLP output with a float down projection
            gu = [g for g in groups if any(n.endswith("gate_proj") for n in g)][0]
            mlp = layer.mlp
            xs = cap_c.mlp[i]
            for name, sfn in (("geglu", geglu_fn(mlp)), ("mlpout", mlpout_fn(mlp, mlp.down_proj.weight.detach()))):
                if name not in a.variants:
                    continue
                t2 = time.perf_counter()
                ls = learns_for([gu], group, prefix)
                with torch.no_grad():
                    tg = [sfn(x) for x in xs]
                zeros = [torch.zeros_like(t) for t in tg]
                mrel = {k[len("mlp."):]: v for k, v in ls.items()}
                refine_scope(sfn, xs, tg, zeros, mlp, list(mrel), mrel, q, steps=a.block_steps,
                             lr=a.block_lr, per_step=a.per_step, seed=a.seed)
                var = dict(group)
                var[tuple(gu)] = next(iter(ls.values())).final()
                row[name], row[name + "_s"] = held_err(var), round(time.perf_counter() - t2)
            # block from the greedy transforms and from the per-group result
            for name, init in (("block_from_greedy", greedy), ("block_from_group", group)):
                if name not in a.variants:
                    continue
                t3 = time.perf_counter()
                ls = learns_for(groups, init, prefix)
                log = []
                refine_scope(bfn, inp_c, cap_c.out[i], bases_c, layer, rel, ls, q, steps=a.block_steps,
                             lr=a.block_lr, per_step=a.per_step, seed=a.seed, log=log)
                done = {tuple(g): ls[g[0][len(prefix):]].final() for g in groups}
                row[name], row[name + "_s"] = held_err(done), round(time.perf_counter() - t3)
                row[name + "_calib_log"] = [(s, round(v, 5)) for s, v in log]
            row["greedy_s"] = round(t1 - t0)
            print(json.dumps(row), flush=True)
            rows.append(row)
        print(json.dumps(dict(seed=a.seed, steps=a.steps, block_steps=a.block_steps, per_step=a.per_step,
                              wall_s=round(time.perf_counter() - t_start), rows=rows)))
        return 0

    # full row: per-group refinement, then the block loss per decoder layer, inside quantize()
    n_layers = len(model.model.layers)
    cap = capture(model, calib, set(range(n_layers)))
    if a.objective in ("geglu", "mlpout"):  # only the MLP inputs are needed
        cap.inp = {i: [] for i in range(n_layers)}
        cap.out = {i: [] for i in range(n_layers)}
    done: dict[tuple, LayerTransform] = {}
    orig = api.group_transform
    block_s = [0.0]

    def patched(names, mods, stats, config, transforms=None):
        key = tuple(names)
        if key in done:
            return done[key]
        i = int(names[0].split(".")[2])
        prefix = f"model.layers.{i}."
        groups = layer_groups(cal.groups, i)
        if key not in {tuple(g) for g in groups}:
            return orig(names, mods, stats, config, transforms)
        first = {tuple(g): orig(g, modules, cal.stats[g[0]], config, transforms) for g in groups}
        t0 = time.perf_counter()
        layer = model.model.layers[i]
        if a.objective in ("geglu", "mlpout"):  # only the gate/up group, on act(gate) * up
            done.update(first)
            gu = [g for g in groups if any(n.endswith("gate_proj") for n in g)][0]
            ls = learns_for([gu], first, prefix)
            mlp, xs = layer.mlp, cap.mlp[i]
            sfn = geglu_fn(mlp) if a.objective == "geglu" else mlpout_fn(mlp, mlp.down_proj.weight.detach())
            with torch.no_grad():
                tg = [sfn(x) for x in xs]
            mrel = {k[len("mlp."):]: v for k, v in ls.items()}
            refine_scope(sfn, xs, tg, [torch.zeros_like(t) for t in tg], mlp, list(mrel), mrel, q,
                         steps=a.block_steps, lr=a.block_lr, per_step=a.per_step, seed=a.seed + i)
            done[tuple(gu)] = next(iter(ls.values())).final()
            block_s[0] += time.perf_counter() - t0
            return done[key]
        rel = [n[len(prefix):] for g in groups for n in g]
        ls = learns_for(groups, first, prefix)
        refine_scope(block_fn(layer), cap.inp[i], cap.out[i], [h for h, _ in cap.inp[i]], layer, rel, ls, q,
                     steps=a.block_steps, lr=a.block_lr, per_step=a.per_step, seed=a.seed + i)
        for g in groups:
            done[tuple(g)] = ls[g[0][len(prefix):]].final()
        block_s[0] += time.perf_counter() - t0
        return done[key]

    api.group_transform = patched
    f_held, f_check = rm.perplexity(model, held), rm.perplexity(model, check)
    with torch.no_grad():
        t0 = time.perf_counter()
        rep = api.quantize(model, cfg, calibration=cal, progress=False, verbose=False)
    wall = time.perf_counter() - t0
    print(json.dumps(dict(seed=a.seed, objective=a.objective, steps=a.steps, block_steps=a.block_steps,
                          per_step=a.per_step, block_lr=a.block_lr, wall_s=round(wall), block_s=round(block_s[0]),
                          phase_seconds=rep.phase_seconds, held=rm.perplexity(model, held) / f_held,
                          check=rm.perplexity(model, check) / f_check)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
