"""`duquant report`: what W4A8 costs a policy, per part and per method, in one command.

For every bits setting x part x method the float model is quantized in place (one shared calibration run), its
outputs are compared with the float outputs on held-out inputs (the flow-matching noise is fixed, so the comparison
is exact), every quantized layer's output error is measured on held-out activations, the modules are put back, and
the next run starts from the same float model. Results: a terminal table, ``report.json`` (schema in
docs/report.md), ``report.md`` and ``report.png``.

``report_model(model, make_inputs, forward)`` runs the same measurements on any nn.Module.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duquant import __version__, formats, registry
from duquant.api import _set_module, integer_weights, quantize
from duquant.calibration import ActivationRecorder, CalibrationResult, calibrate
from duquant.config import PRESETS, ConfigError, DuQuantConfig, bits_name
from duquant.quantizers import relative_error
from duquant.selection import select_layers

SCHEMA_VERSION = 1
METHODS = tuple(registry.METHODS)  # rtn, smoothquant, hadamard, duquant (duquant/registry.py)
CALIBRATION_MODES = ("one-pass", "sequential")


def variant_label(method: str, rounding: str = "rtn", calibration: str = "one-pass",
                  permutation: str | None = None) -> str:
    """A row's method with its options: "duquant", "duquant+gptq", "duquant+shuffle+gptq+seq" (the permutation's
    registered label: none for the default zigzag, and for methods that take no permutation, permutation None)."""
    perm = registry.permutation(permutation).label if permutation is not None else ""
    return (method + perm + ("" if rounding == "rtn" else f"+{rounding}")
            + ("+seq" if calibration == "sequential" else ""))


def row_permutations(method: str, permutations: Sequence[str] | None, default: str) -> list[str | None]:
    """The permutations a method's rows run: each of `permutations` (default: the configured one) for a method
    registered with ``permutes``, [None] (one row, permutation irrelevant) for the others."""
    if not registry.method(method).permutes:
        return [None]
    return [registry.permutation(p).name for p in (permutations or [default])]


def parse_permutations(args) -> list[str] | None:
    """--permutations as registered names (None when not given: the configured permutation)."""
    text = getattr(args, "permutations", None)
    if not text:
        return None
    return list(dict.fromkeys(registry.permutation(p).name for p in text.split(",") if p.strip()))


def permutation_note(rep) -> dict:
    """What a row's layers got: {"permutations_used": {name: layers}, "permutation_note": the quantize summary's
    line, naming the layers that fell back and why}."""
    from duquant.selection import permutation_summary

    used = [(r.permutation, r.in_features) for r in rep.layers if r.permutation != "none"]
    counts: dict[str, int] = {}
    for name, _ in used:
        counts[name] = counts.get(name, 0) + 1
    return {"permutations_used": counts,
            "permutation_note": permutation_summary(rep.config["permute"], used, rep.config["block_size"])}


PARTS = ("llm", "dit", "vision", "full")


# The formats --format-rows adds to --bits: the weight-only w4a16 (no activation transform: one row per weight
# rounding), FP8 (every method's transform, e4m3 weights and activations) and 4-bit weights with FP8 activations
# (w4a8-fp8). Not in the default report: the w4a16 and w8a8-fp8 rows alone took it from ~31-34 s to ~44-54 s on 2
# CPU cores (the default stays under ~40 s).
FORMAT_ROWS = ("w4a16", "w8a8-fp8", "w4a8-fp8")
# Weight roundings of the rows when --weight-roundings is not given: a weight-only format has no transform to
# compare, so its rows compare the roundings; a non-integer format (fp8) has its own rounding only.
WEIGHT_ONLY_ROUNDINGS = ("rtn", "gptq")


def parse_formats(text: str) -> list[str]:
    """'w4a8,w4a16,w8a8-fp8' -> registered format names (duquant.formats); 'w4a0' means w4a16. An unknown name is
    a ValueError listing the known ones."""
    out = []
    for item in text.lower().replace(" ", "").split(","):
        if not item:
            continue
        if item in formats.names():
            out.append(item)
            continue
        try:
            (w, a), = parse_bits(item)  # w4a0 and other spellings of an integer format
        except ValueError:
            raise ValueError(f"unknown format {item!r} in --bits; known: {', '.join(formats.names())}") from None
        out.append(formats.get(bits_name(w, a)).name)
    if not out:
        raise ValueError("--bits is empty; write e.g. w4a8,w4a16,w8a8-fp8")
    return out


def format_rows(fmt_names: Sequence[str], methods: Sequence[str], roundings: Sequence[str] | None
                ) -> list[tuple[str, str, str]]:
    """(format, method, weight rounding) of every row: an online-transform format runs every method with every
    rounding its weights take (fp8: its own); a weight-only format (w4a16) runs no transform, so it gets one row
    per rounding (method "rtn", the registered "no transform") whatever the methods. `roundings` None: rtn, and
    rtn + gptq for weight-only formats."""
    out = []
    for name in fmt_names:
        fmt = formats.get(name)
        if fmt.online_transform:
            rs = list(roundings or ["rtn"]) if integer_weights(fmt) else ["rtn"]
            out += [(name, m, r) for m in methods for r in rs]
        else:
            out += [(name, "rtn", r) for r in (roundings or WEIGHT_ONLY_ROUNDINGS)]
    return list(dict.fromkeys(out))


def parse_bits(text: str) -> list[tuple[int, int]]:
    """'w4a8,w8a8' -> [(4, 8), (8, 8)]; 'w4a16' keeps activations in float."""
    out = []
    for item in text.lower().replace(" ", "").split(","):
        if not item:
            continue
        if not (item.startswith("w") and "a" in item):
            raise ValueError(f"bad --bits entry {item!r}; write e.g. w4a8,w4a4,w8a8")
        w, a = item[1:].split("a", 1)
        try:
            out.append((int(w), int(a)))
        except ValueError:
            raise ValueError(f"bad --bits entry {item!r}; write e.g. w4a8,w4a4,w8a8") from None
    if not out:
        raise ValueError("--bits is empty; write e.g. w4a8")
    return out


@dataclass
class Target:
    """One model part to quantize: a label and the selection fields it sets."""

    name: str
    scope: str | None = None  # None: the base config's
    include: str | None = None
    preset: str | None = None


def _linear_bytes(module: nn.Linear, bytes_per_param: int = 2) -> int:
    n = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return n * bytes_per_param


def _param_bytes(model: nn.Module, bytes_per_param: int = 2) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n * bytes_per_param


def layer_errors(quant_model: nn.Module, originals: dict[str, nn.Module], samples: dict[str, torch.Tensor]
                 ) -> dict[str, float]:
    """Relative output error ||q(x) - f(x)||^2 / ||f(x)||^2 of each quantized layer on held-out inputs."""
    errs = {}
    with torch.no_grad():
        for name, float_layer in originals.items():
            x = samples.get(name)
            if x is None:
                continue
            q_layer = quant_model.get_submodule(name)
            dev = float_layer.weight.device
            xf = x.to(dev, float_layer.weight.dtype)
            ref = float_layer(xf).float()
            out = q_layer(xf).float()
            errs[name] = relative_error(out, ref)
    return errs



def run_rows(model: nn.Module, *, targets: Sequence[Target], methods: Sequence[str],
             bits: Sequence[tuple[int, int] | str], calibrate_fn: Callable[[nn.Module], None], eval_inputs: list,
             forward: Callable[[nn.Module, Any, int], Any],
             base: DuQuantConfig | None = None, progress: bool = True, packdir: str | None = None,
             layer_tokens: int = 256, roundings: Sequence[str] | None = ("rtn",),
             calibrations: Sequence[str] = ("one-pass",), permutations: Sequence[str] | None = None
             ) -> tuple[list[dict], dict]:
    """The measurement loop shared by the pi0 report and report_model: formats x parts x methods (x permutations,
    for methods that take one; `permutations` None: the base config's) x weight roundings x calibration modes,
    every row from the same float model and the same calibration data. `bits`
    holds (wbits, abits) pairs or format names (w8a8-fp8, w4a16: ``format_rows`` says which methods and
    roundings each gets). One-pass rows share one recorded calibration (and the transforms built from it, across
    formats and parts); sequential rows rerun `calibrate_fn` block by block (its first pass is the shared one)."""
    for mode in calibrations:
        if mode not in CALIBRATION_MODES:
            raise ValueError(f"unknown calibration mode {mode!r}; use {' or '.join(CALIBRATION_MODES)}")
    for r in roundings or ():
        registry.rounding(r)
    fmt_names = [b if isinstance(b, str) else bits_name(*b) for b in bits]
    variants = format_rows(fmt_names, methods, roundings)
    from tqdm.auto import tqdm

    base = base or DuQuantConfig()
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        refs = [forward(model, x, i).float().cpu() for i, x in enumerate(eval_inputs)]

    configs = {}
    union: dict[str, nn.Linear] = {}
    for t in targets:
        cfg = base.replace(preset=t.preset, scope=base.scope if t.scope is None else t.scope,
                           include=t.include or base.include)
        sel = select_layers(model, cfg)
        configs[t.name] = cfg
        union.update(sel.modules)
    union = {n: union[n] for n, _ in model.named_modules() if n in union}
    gptq = any(registry.rounding(r).needs_activations for _, _, r in variants)
    calib: CalibrationResult = calibrate(model, union, calibrate_fn, max_tokens=base.calib_tokens, seed=base.seed,
                                         hessian=gptq)
    with ActivationRecorder(union, max_tokens=layer_tokens, seed=base.seed + 99) as rec, torch.no_grad():
        for i, x in enumerate(eval_inputs):
            forward(model, x, i)
    held_out = {n: s.sample for n, s in rec.stats.items() if s.sample is not None}
    setup_seconds = time.perf_counter() - t0

    rows = []
    transforms: dict = {}  # built transforms, shared by the one-pass rows (they do not depend on the bits)
    runs = [(f, t, m, p, r, c) for f in fmt_names for t in targets
            for (f2, m, r) in variants if f2 == f for p in row_permutations(m, permutations, base.permute)
            for c in calibrations]
    bar = tqdm(runs, desc="report", disable=not progress)
    for fmt_name, target, method, perm, rounding, mode in bar:
        fmt = formats.get(fmt_name)
        wbits, abits = fmt.wbits, fmt.abits
        label = variant_label(method, rounding, mode, perm)
        bar.set_postfix_str(f"{fmt_name} {target.name} {label}")
        sequential = mode == "sequential"
        cfg = configs[target.name].replace(method=method, format=fmt_name, wbits=wbits, abits=abits, packdir=None,
                                           weight_rounding=rounding, sequential=sequential,
                                           permute=perm or base.permute)
        if packdir:
            cfg = cfg.replace(packdir=str(Path(packdir) / f"{target.name}-{label}-{fmt_name}"))
        sel = select_layers(model, cfg)
        originals = dict(sel.modules)
        try:
            t_run = time.perf_counter()
            rep = quantize(model, cfg, calibrate=calibrate_fn if sequential else None, calibration=calib,
                           progress=False, verbose=False, transforms=transforms)
            run_seconds = time.perf_counter() - t_run
            with torch.no_grad():
                outs = [forward(model, x, i).float().cpu() for i, x in enumerate(eval_inputs)]
            lerr = layer_errors(model, originals, held_out)
        finally:
            for name, module in originals.items():
                _set_module(model, name, module)
        pred, ref = torch.cat([o.flatten(1) for o in outs]), torch.cat([r.flatten(1) for r in refs])
        rel_mse = relative_error(pred, ref)
        worst = sorted(lerr.items(), key=lambda kv: -kv[1])[:10]
        before = sum(_linear_bytes(m) for m in originals.values())
        after = rep.bytes_after
        rows.append({
            "part": target.name, "method": method, "weight_rounding": rounding, "calibration": mode,
            "permutation": perm, **permutation_note(rep),
            "label": label, "bits": fmt_name, "format": fmt_name, "format_label": fmt.label(),
            "wbits": wbits, "abits": abits, "num_layers": len(rep.layers),
            "action_rel_mse": rel_mse, "action_max_abs": float((pred - ref).abs().max()),
            "layer_rel_err_mean": float(sum(lerr.values()) / max(1, len(lerr))),
            "layer_rel_err_max": float(max(lerr.values(), default=0.0)),
            "worst_layers": [{"name": n, "rel_err": e} for n, e in worst],
            "weight_bytes_before": before, "weight_bytes_after": after,
            "calib_seconds": rep.calibration_seconds if sequential else calib.seconds,
            "quant_seconds": run_seconds,
            "packs_reused": rep.pack_hits, "packs_computed": rep.pack_misses,
            "transform_kinds": sorted({r.transform_kind for r in rep.layers}),
        })
    return rows, {"setup_seconds": setup_seconds, "calibration_seconds": calib.seconds,
                  "calibrated_layers": len(union), "eval_batches": len(eval_inputs)}


def report_model(model: nn.Module, make_inputs: Callable[[int], Any], forward: Callable[[nn.Module, Any], Any], *,
                 targets: Sequence[Target] | None = None, methods: Sequence[str] = METHODS,
                 bits: Sequence[tuple[int, int] | str] = ((4, 8),), calib_batches: int = 8, eval_batches: int = 4,
                 base: DuQuantConfig | None = None, progress: bool = False,
                 roundings: Sequence[str] | None = ("rtn",),
                 calibrations: Sequence[str] = ("one-pass",), permutations: Sequence[str] | None = None) -> dict:
    """Layer-error and output-error report for any nn.Module built from nn.Linear.

    `make_inputs(i)` returns the i-th batch (calibration uses 0..calib_batches-1, evaluation the next ones);
    `forward(model, inputs)` returns the output tensor to compare. Returns {"rows": [...], ...} as in report.json.
    """
    calib_inputs = [make_inputs(i) for i in range(calib_batches)]
    eval_inputs = [make_inputs(calib_batches + i) for i in range(max(1, eval_batches))]

    def calibrate_fn(m: nn.Module) -> None:
        with torch.no_grad():
            for x in calib_inputs:
                forward(m, x)

    rows, info = run_rows(model, targets=targets or [Target("all")], methods=methods, bits=bits,
                          calibrate_fn=calibrate_fn, eval_inputs=eval_inputs,
                          forward=lambda m, x, i: _as_tensor(forward(m, x)), base=base, progress=progress,
                          roundings=roundings, calibrations=calibrations, permutations=permutations)
    bytes_total = _param_bytes(model)
    for r in rows:
        r["model_bytes_before"] = bytes_total
        r["model_bytes_after"] = bytes_total - r["weight_bytes_before"] + r["weight_bytes_after"]
    return {"schema_version": SCHEMA_VERSION, "rows": rows, **info}


def _as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("forward(model, inputs) must return a tensor (or an object with .logits / .last_hidden_state)")


# ---- full-size memory (computed from shapes on the meta device) -------------------------------------------------

def full_size_memory(config_name: str, wbits: int = 4, group_size: int | None = None) -> list[dict]:
    """Weight bytes of each part of the full-size model at bf16 and after W{wbits} packing, from shapes alone."""
    from duquant.workflows import load_model

    model = load_model(config_name, device="meta")
    total = _param_bytes(model)
    rows = []
    for part in PARTS:
        cfg = DuQuantConfig(wbits=wbits).with_preset(part)
        sel = select_layers(model, cfg)
        before = sum(_linear_bytes(m) for m in sel.modules.values())
        after = 0
        for m in sel.modules.values():
            groups = 1 if group_size is None else -(-m.in_features // group_size)
            codes = m.out_features * (-(-m.in_features * wbits // 8))
            after += codes + m.out_features * groups * 8 + (m.bias.numel() * 2 if m.bias is not None else 0)
        rows.append({"config": config_name, "part": part, "bits": f"w{wbits}", "layers": len(sel),
                     "weight_bytes_before": before, "weight_bytes_after": after, "model_bytes_before": total,
                     "model_bytes_after": total - before + after,
                     "model_saving": (before - after) / total})
    return rows


# ---- the pi0 report -----------------------------------------------------------------------------------------------

def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="duquant_report", help="output directory (report.json, report.md, report.png)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts of {list(PARTS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods of {list(METHODS)}")
    p.add_argument("--bits", default="w4a8",
                   help="comma-separated formats, e.g. w4a8,w4a4,w8a8,w4a16,w8a8-fp8,w4a8-fp8 (default w4a8)")
    p.add_argument("--format-rows", action="store_true",
                   help=f"add the rows of {', '.join(FORMAT_ROWS)} (weight-only: rtn and gptq rounding; fp8: every "
                        "method) to --bits (pi0 report: 40 rows; the 24 of w4a16 and w8a8-fp8 took ~11-20 s more on 2 "
                        "CPU cores)")
    p.add_argument("--weight-roundings", default=None,
                   help=f"comma-separated weight roundings of {list(registry.ROUNDINGS)} (default rtn; weight-only "
                        "formats such as w4a16: rtn,gptq)")
    p.add_argument("--calibrations", default="one-pass",
                   help="comma-separated calibration modes: one-pass, sequential (default one-pass)")
    p.add_argument("--permutations", default=None,
                   help=f"comma-separated permutations of {list(registry.PERMUTATIONS)}: one row each for the "
                        "methods that take one (duquant; labels duquant, duquant+shuffle, duquant+noperm); default: "
                        "the configured one (zigzag)")
    p.add_argument("--calib", help="calibration observations (.safetensors/.npz) or a LeRobot dataset directory "
                   "(see docs/report.md)")
    p.add_argument("--text", help="transformers checkpoint: text file scored by perplexity (causal LM) or "
                   "split into sentences (encoder: embedding cosine); see docs/report.md")
    p.add_argument("--seq-len", type=int, default=256, help="transformers causal LM: tokens per window (256)")
    p.add_argument("--eval-obs", help="held-out observations for the action error (default: synthetic)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=None, help="rotation block size (default 128)")
    p.add_argument("--rotation-steps", type=int, default=None, help="greedy rotation steps (default 256)")
    p.add_argument("--packdir", help="reuse/write packs under this directory (one sub-directory per run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="fake", choices=["fake", "gpu"],
                   help="how quantized layers run: fake (torch reference, any device) or gpu (the Triton kernels; "
                        "needs --device cuda). Both should give the same figures within docs/gpu.md's tolerance")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in model and the synthetic data")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_variants(args) -> tuple[list[str], list[str]]:
    """--weight-roundings and --calibrations as lists, checked against the registry (no --weight-roundings: rtn)."""
    roundings = [s.strip() for s in (args.weight_roundings or "rtn").split(",") if s.strip()]
    for r in roundings:
        registry.rounding(r)
    modes = [s.strip() for s in args.calibrations.split(",") if s.strip()]
    for m in modes:
        if m not in CALIBRATION_MODES:
            raise ValueError(f"unknown calibration mode {m!r}; use a comma-separated list of {list(CALIBRATION_MODES)}")
    return roundings or ["rtn"], modes or ["one-pass"]


def run_report_cli(args, load_calib=None) -> int:
    """`load_calib(model) -> (batches, source)` reads --calib (the CLI passes its reader, which also takes a
    LeRobot dataset directory); without it --calib is an observation file."""
    from duquant import workflows as wf

    t_start = time.perf_counter()
    if getattr(args, "backend", "fake") == "gpu" and not str(args.device).startswith("cuda"):
        raise ConfigError(f"--backend gpu runs the Triton kernels on CUDA; add --device cuda (got {args.device!r})")
    roundings, modes = parse_variants(args)
    permutations = parse_permutations(args)
    parts = [s for s in args.parts.split(",") if s]
    for part in parts:
        if part not in PRESETS:
            raise ValueError(f"unknown part {part!r}; choose from {sorted(PRESETS)}")
    methods = [s for s in args.methods.split(",") if s]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    bits = parse_formats(args.bits)
    if args.format_rows:
        bits = list(dict.fromkeys([*bits, *FORMAT_ROWS]))
    if args.weight_roundings is None:
        roundings = None  # format_rows' defaults: rtn, and rtn + gptq for weight-only formats
    config_name = args.config or (None if args.checkpoint else args.default_config)
    dtype = wf.parse_dtype(args.dtype)
    model = wf.load_model(config_name, args.checkpoint, device=args.device, dtype=dtype, seed=args.seed)
    calib_source = f"synthetic, seed {args.seed + 1}"
    if args.calib:
        calib_obs, calib_source = (load_calib(model) if load_calib is not None
                                   else (wf.load_calibration_file(args.calib, args.batch_size), args.calib))
        calib_obs = calib_obs[: args.calib_batches]
    else:
        calib_obs = wf.synthetic_observations(model, args.calib_batches, args.batch_size, seed=args.seed + 1)
    if args.eval_obs:
        eval_obs = wf.load_calibration_file(args.eval_obs, args.batch_size)[: args.eval_batches]
    else:
        eval_obs = wf.synthetic_observations(model, args.eval_batches, args.batch_size, seed=args.seed + 50_000)

    base_kwargs = {"backend": getattr(args, "backend", "fake")}
    if args.block_size:
        base_kwargs["block_size"] = args.block_size
    if args.rotation_steps is not None:
        base_kwargs["rotation_steps"] = args.rotation_steps
    base = DuQuantConfig(**base_kwargs)

    def forward(m: nn.Module, obs, i: int) -> torch.Tensor:
        device = next(m.parameters()).device
        obs = obs.to(device)
        noise = wf.fixed_noise(m, obs.batch_size, 4321 + i, device=device)
        return m.sample_actions(obs, noise=noise)

    targets = [Target(p, preset=p, scope=PRESETS[p].scope, include=PRESETS[p].include) for p in parts]
    rows, info = run_rows(model, targets=targets, methods=methods, bits=bits,
                          calibrate_fn=wf.calibration_fn(calib_obs, progress=not args.quiet),
                          eval_inputs=eval_obs, forward=forward, base=base, progress=not args.quiet,
                          packdir=args.packdir, roundings=roundings, calibrations=modes, permutations=permutations)
    model_bytes = _param_bytes(model)
    for r in rows:
        r["model_bytes_before"] = model_bytes
        r["model_bytes_after"] = model_bytes - r["weight_bytes_before"] + r["weight_bytes_after"]
    full_name = (config_name or "pi0").replace("-tiny", "")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "duquant_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"config": config_name, "checkpoint": args.checkpoint, "dtype": args.dtype, "device": args.device,
                  "param_bytes_bf16": model_bytes},
        "data": {"calibration": calib_source,
                 "evaluation": args.eval_obs or f"synthetic, seed {args.seed + 50_000}",
                 "calib_batches": len(calib_obs), "eval_batches": len(eval_obs), "batch_size": args.batch_size},
        "settings": base.to_dict(),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
        "rows": rows,
        "full_size_memory": full_size_memory(full_name, wbits=4) if full_name in ("pi0", "pi05") else [],
        "timing": {**info, "total_seconds": None},
    }
    doc["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_report(doc, Path(args.out), plot=not args.no_plot)
    print_table(doc)
    print(f"wrote {Path(args.out) / 'report.json'}, report.md" + ("" if args.no_plot else ", report.png"))
    return 0


# ---- output -------------------------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def to_markdown(doc: dict) -> str:
    lines = [f"# duquant report ({doc['model']['config'] or doc['model']['checkpoint']})", "",
             f"Created {doc['created']} with duquant {doc['duquant_version']}, torch {doc['environment']['torch']}. "
             f"Calibration: {doc['data']['calibration']}; evaluation: {doc['data']['evaluation']} "
             f"({doc['data']['eval_batches']} batches of {doc['data']['batch_size']}). The flow-matching noise is "
             "fixed, so the action error is the quantization's alone.", "",
             "| part | method | format | layers | action rel. MSE | action max abs | layer err mean | layer err max "
             "| weights MiB (bf16 → quant) | model MiB (bf16 → quant) | quant s | packs reused |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best = {}
    for r in doc["rows"]:
        key = (r["part"], r["bits"])
        if key not in best or r["action_rel_mse"] < best[key]["action_rel_mse"]:
            best[key] = r
    for r in doc["rows"]:
        mark = "**" if best[(r["part"], r["bits"])] is r else ""
        lines.append(
            f"| {r['part']} | {mark}{r.get('label', r['method'])}{mark} | {r['bits']} | {r['num_layers']} | "
            f"{mark}{r['action_rel_mse']:.3e}{mark} | {r['action_max_abs']:.3e} | {r['layer_rel_err_mean']:.3e} | "
            f"{r['layer_rel_err_max']:.3e} | {_mib(r['weight_bytes_before'])} → {_mib(r['weight_bytes_after'])} | "
            f"{_mib(r['model_bytes_before'])} → {_mib(r['model_bytes_after'])} | {r['quant_seconds']:.2f} | "
            f"{r['packs_reused']} |")
    lines += format_legend(doc["rows"])
    lines += permutation_legend(doc["rows"])
    if doc.get("full_size_memory"):
        lines += ["", "## Weight memory at full size (computed from shapes, bf16 → packed 4-bit + scales)", "",
                  "| config | part | layers | weights GiB | model GiB | model saving |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in doc["full_size_memory"]:
            lines.append(f"| {r['config']} | {r['part']} | {r['layers']} | {r['weight_bytes_before'] / 2**30:.2f} → "
                         f"{r['weight_bytes_after'] / 2**30:.2f} | {r['model_bytes_before'] / 2**30:.2f} → "
                         f"{r['model_bytes_after'] / 2**30:.2f} | {100 * r['model_saving']:.1f}% |")
    lines += ["", "## Worst layers (relative output error on held-out activations)", ""]
    for r in doc["rows"]:
        if r["method"] != "duquant":
            continue
        lines.append(f"**{r['part']} / {r.get('label', 'duquant')} / {r['bits']}**: " + ", ".join(
            f"`{w['name']}` {w['rel_err']:.2e}" for w in r["worst_layers"][:10]))
        lines.append("")
    t = doc["timing"]
    lines += [f"Total {t['total_seconds']} s (shared calibration {t['calibration_seconds']:.2f} s over "
              f"{t['calibrated_layers']} layers)."]
    return "\n".join(lines) + "\n"


def format_legend(rows: list[dict]) -> list[str]:
    """The formats of the rows by their ``Format.label()`` (what the weights and activations are: an fp8 or
    bf16-activation row is never called int8), and what the method column means for weight-only formats."""
    named = list(dict.fromkeys(r.get("format", r["bits"]) for r in rows))
    labels = []
    for name in named:
        try:
            labels.append(formats.get(name).label())
        except formats.FormatError:
            labels.append(name)
    out = ["", "Formats: " + "; ".join(labels) + "."]
    weight_only = [n for n in named if n in formats.names() and not formats.get(n).online_transform]
    if weight_only:
        out[-1] += (f" {', '.join(weight_only)}: weight-only, no activation transform; its rows differ by weight "
                    "rounding (`rtn`: round to nearest, `rtn+gptq`: GPTQ).")
    return out


def permutation_legend(rows: list[dict]) -> list[str]:
    """Under the table, for every row whose layers did not all get the permutation asked for: which permutation
    the layers got and why (e.g. shuffle on 24 layers, zigzag on the 8 whose width it cannot take)."""
    notes = [f"- {r['part']} / {r['label']} / {r['bits']}: {r['permutation_note']}" for r in rows
             if r.get("permutation") and set(r.get("permutations_used") or {}) - {r["permutation"]}]
    return ["", "Permutations (layers that did not get the one asked for, and why):", *notes] if notes else []


def plot_action_error(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    bits_list = sorted({r["bits"] for r in rows})
    parts = list(dict.fromkeys(r["part"] for r in rows))
    methods = list(dict.fromkeys(r.get("label", r["method"]) for r in rows))
    width_in = max(4 + 3 * len(parts), len(bits_list) * (2 + 2 * len(parts)))
    fig, axes = plt.subplots(1, len(bits_list), figsize=(width_in, 4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, bits in zip(axes[0], bits_list):
        for j, method in enumerate(methods):
            vals = []
            for part in parts:
                match = [r for r in rows if r["bits"] == bits and r["part"] == part
                         and r.get("label", r["method"]) == method]
                vals.append(match[0]["action_rel_mse"] if match else float("nan"))
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(parts))]
            ax.bar(xs, vals, width, label=method)
        ax.set_xticks(range(len(parts)), parts)
        ax.set_yscale("log")
        ax.set_ylabel("action relative MSE vs float")
        ax.set_title(f"{doc['model']['config'] or 'checkpoint'} {bits.upper()}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(doc: dict, out: Path, plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "report.json", json.dumps(doc, indent=2))
    _atomic_text(out / "report.md", to_markdown(doc))
    if plot:
        plot_action_error(doc, out / "report.png")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"duquant report: {doc['model']['config'] or doc['model']['checkpoint']}")
    for col in ("part", "method", "bits", "layers", "action rel MSE", "max abs", "layer err", "weights MiB",
                "model MiB", "quant s"):
        table.add_column(col, justify="right" if col not in ("part", "method", "bits") else "left")
    for r in doc["rows"]:
        table.add_row(r["part"], r.get("label", r["method"]), r["bits"], str(r["num_layers"]),
                      f"{r['action_rel_mse']:.3e}",
                      f"{r['action_max_abs']:.3e}", f"{r['layer_rel_err_mean']:.2e}",
                      f"{_mib(r['weight_bytes_before'])}→{_mib(r['weight_bytes_after'])}",
                      f"{_mib(r['model_bytes_before'])}→{_mib(r['model_bytes_after'])}", f"{r['quant_seconds']:.2f}")
    import sys

    # piped or redirected, rich fits the table to 80 columns and cuts the numbers ("3.75…"): print it whole
    Console(width=None if sys.stdout.isatty() else 1000).print(table)

