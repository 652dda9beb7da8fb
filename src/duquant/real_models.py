"""`duquant report --checkpoint DIR` on a local transformers checkpoint: methods x bits side by side.

- A causal LM (an ``*ForCausalLM`` architecture) is scored by perplexity on a text file the user gives (``--text``):
  the file is tokenized once and cut into windows of ``--seq-len`` tokens; the first ``--calib-batches`` windows
  calibrate, the *next* ``--eval-batches`` windows (never seen in calibration) are scored.
- Any other model (an encoder) is scored by the cosine similarity of its mean-pooled embeddings to the float
  model's, on the sentences of ``--text`` (the first batches of 16 calibrate, the next ones are scored).

Every row quantizes the same float model in place and puts it back, as the pi0 report does. The Linear layers
inside numbered blocks (``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.``) are quantized; embeddings, norms and
the head stay in float. Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from duquant import __version__, registry
from duquant.api import _set_module, quantize
from duquant.calibration import calibrate
from duquant.config import DuQuantConfig
from duquant.selection import select_layers

BLOCK_LINEARS = r"\.(layers|layer|h|blocks)\.\d+\."
# DuQuantConfig fields a report takes from OPENPI_DUQUANT_* (shared by every row)
SHARED_SETTINGS = ("block_size", "block_out", "permute", "row_rot", "alpha", "rotation_steps", "w_symmetric", "w_clip",
                   "w_group_size", "clip_search", "act_symmetric", "act_clip", "act_pct", "act_clip_search",
                   "act_static", "gptq_damp", "gptq_act_order", "calib_tokens", "share_transforms", "seed",
                   "rotation_refine_steps", "rotation_refine_smooth")


def is_transformers_checkpoint(path: str | Path) -> bool:
    """A directory with a transformers config.json (a "model_type" key; pi0 checkpoints have none)."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "model_type" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, kind) with kind "causal-lm" or "encoder"."""
    try:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError("a transformers checkpoint needs the transformers package: "
                          "pip install 'duquant[hf]'") from err
    cfg = json.loads((Path(path) / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, "causal-lm" if causal else "encoder"


# ---- data ---------------------------------------------------------------------------------------------------------

def text_windows(tokenizer, text: str, seq_len: int, count: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping [1, seq_len] token windows of `text` (at most `count`)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = getattr(tokenizer, "bos_token_id", None)
    step = seq_len - (1 if bos is not None else 0)
    out = []
    for start in range(0, ids.numel() - step + 1, step):
        w = ids[start:start + step]
        if bos is not None:
            w = torch.cat([torch.tensor([bos]), w])
        out.append(w.unsqueeze(0))
        if len(out) == count:
            break
    return out


def sentence_batches(tokenizer, text: str, batch_size: int) -> list[dict]:
    import re

    lines = [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", " ".join(text.split())) if len(s.strip()) > 20]
    return [dict(tokenizer(lines[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=128)) for i in range(0, len(lines), batch_size)]


# ---- metrics ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over every window."""
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for w in windows:
        w = w.to(device)
        logits = model(input_ids=w).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll, n = nll + float(loss), n + w[:, 1:].numel()
    return math.exp(nll / max(1, n))


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    device = next(model.parameters()).device
    out = []
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        h = model(**b).last_hidden_state.float()
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out)


# ---- the report ---------------------------------------------------------------------------------------------------

def run_rows(model: nn.Module, tokenizer, kind: str, text: str, *, methods, bits, roundings, calibrations,
             seq_len: int = 256, calib_batches: int = 8, eval_batches: int = 8, batch_size: int = 16,
             base: DuQuantConfig | None = None, progress: bool = True, on_row=None,
             permutations=None) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    base = (base or DuQuantConfig()).replace(scope="", include=BLOCK_LINEARS, preset=None)
    t0 = time.perf_counter()
    if kind == "causal-lm":
        windows = text_windows(tokenizer, text, seq_len, calib_batches + eval_batches)
        if len(windows) < calib_batches + 1:
            raise ValueError(f"--text holds {len(windows)} windows of {seq_len} tokens; calibration needs "
                             f"{calib_batches} and evaluation at least 1: give a longer text or lower --seq-len")
        calib_data, eval_data = windows[:calib_batches], windows[calib_batches:]

        def run(m: nn.Module) -> None:
            device = next(m.parameters()).device
            for w in calib_data:
                m(input_ids=w.to(device))

        float_score = perplexity(model, eval_data)
        metric = "perplexity"
    else:
        batches = sentence_batches(tokenizer, text, batch_size)
        if len(batches) < calib_batches + 1:
            raise ValueError(f"--text holds {len(batches)} batches of {batch_size} sentences (lines); calibration "
                             f"needs {calib_batches} and evaluation at least 1")
        calib_data, eval_data = batches[:calib_batches], batches[calib_batches:calib_batches + eval_batches]

        def run(m: nn.Module) -> None:
            device = next(m.parameters()).device
            for b in calib_data:
                m(**{k: v.to(device) for k, v in b.items()})

        ref = embeddings(model, eval_data)
        float_score = 1.0
        metric = "cosine"

    sel = select_layers(model, base)
    if not len(sel):
        raise ValueError(f"no Linear layer inside numbered blocks ({BLOCK_LINEARS}) in this checkpoint")
    gptq = any(registry.rounding(r).needs_activations for r in roundings)
    with torch.no_grad():
        calib = calibrate(model, dict(sel.modules), run, max_tokens=base.calib_tokens, seed=base.seed,
                          hessian=gptq)
    setup = time.perf_counter() - t0

    rows, transforms = [], {}
    from duquant.report import permutation_note, row_permutations, variant_label

    runs = [(b, m, p, r, c) for b in bits for m in methods for p in row_permutations(m, permutations, base.permute)
            for r in roundings for c in calibrations]
    for (wbits, abits), method, perm, rounding, mode in tqdm(runs, desc="report", disable=not progress):
        sequential = mode == "sequential"
        cfg = base.replace(method=method, wbits=wbits, abits=abits, weight_rounding=rounding, sequential=sequential,
                           permute=perm or base.permute)
        originals = dict(sel.modules)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                rep = quantize(model, cfg, calibrate=run if sequential else None, calibration=calib,
                               progress=False, verbose=False, transforms=transforms)
            quant_s = time.perf_counter() - start
            if kind == "causal-lm":
                score = perplexity(model, eval_data)
                extra = {"ppl_ratio": score / float_score}
            else:
                cos = (embeddings(model, eval_data) * ref).sum(-1)
                score = float(cos.mean())
                extra = {"cosine_min": float(cos.min())}
        finally:
            for name, module in originals.items():
                _set_module(model, name, module)
        rows.append({"method": method, "weight_rounding": rounding, "calibration": mode, "permutation": perm,
                     **permutation_note(rep),
                     "label": variant_label(method, rounding, mode, perm), "bits": f"w{wbits}a{abits}", "wbits": wbits,
                     "abits": abits, "num_layers": len(rep.layers), metric: score, **extra,
                     "quant_seconds": round(quant_s, 2)})
        if on_row is not None:  # e.g. print each row as it comes (a real model takes minutes per row on a CPU)
            on_row(rows[-1], float_score)
    info = {"metric": metric, "float": float_score, "setup_seconds": round(setup, 2),
            "calibrated_layers": len(sel), "calib_batches": len(calib_data), "eval_batches": len(eval_data),
            "seq_len": seq_len if kind == "causal-lm" else None}
    return rows, info


def to_markdown(doc: dict) -> str:
    metric, bits = doc["info"]["metric"], list(dict.fromkeys(r["bits"] for r in doc["rows"]))
    labels = list(dict.fromkeys(r["label"] for r in doc["rows"]))
    cell = {(r["label"], r["bits"]): r for r in doc["rows"]}
    fl = doc["info"]["float"]
    head = f"{metric} (float {fl:.4g})" if metric == "perplexity" else "embedding cosine to float"
    lines = [f"# duquant report ({doc['model']['checkpoint']}, {doc['model']['kind']})", "",
             f"{head}; text {doc['data']['text']}, {doc['info']['calib_batches']} calibration and "
             f"{doc['info']['eval_batches']} held-out batches. Per-channel weights, per-token activations"
             + "".join(f"; {k} {v}" for k, v in (doc.get("settings") or {}).items()) + ".", "",
             "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    for lab in labels:
        vals = []
        for b in bits:
            r = cell.get((lab, b))
            if r is None:
                vals.append("")
            elif metric == "perplexity":
                vals.append(f"{r['perplexity']:.3f} ({r['ppl_ratio']:.3f}×)")
            else:
                vals.append(f"{r['cosine']:.4f} (min {r['cosine_min']:.3f})")
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
    from duquant.report import permutation_legend

    lines += permutation_legend([{**r, "part": "all"} for r in doc["rows"]])
    lines += ["", f"Total {doc['timing']['total_seconds']} s."]
    return "\n".join(lines) + "\n"


def run_report_cli(args) -> int:
    from duquant.report import METHODS, _atomic_text, parse_bits, parse_permutations, parse_variants
    from duquant.workflows import parse_dtype

    t_start = time.perf_counter()
    if not getattr(args, "text", None):
        raise ValueError("a transformers checkpoint is scored on a text file: pass --text FILE (perplexity for a "
                         "causal LM; embedding cosine on its sentences for an encoder)")
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    methods = [s for s in args.methods.split(",") if s]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    roundings, modes = parse_variants(args)
    permutations = parse_permutations(args)
    model, tokenizer, kind = load_checkpoint(args.checkpoint, device=args.device, dtype=parse_dtype(args.dtype))
    base_kwargs = {}
    if args.block_size:
        base_kwargs["block_size"] = args.block_size
    if args.rotation_steps is not None:
        base_kwargs["rotation_steps"] = args.rotation_steps
    # The shared settings (weight clip, GPTQ damping / act-order, activation clip, ...) come from the
    # OPENPI_DUQUANT_* variables, as for `duquant quantize`; method, bits, rounding, calibration mode and the layer
    # selection are the report's own (per row / numbered blocks), so those variables are not read.
    env = DuQuantConfig.from_env(**base_kwargs)
    base = DuQuantConfig(**{k: getattr(env, k) for k in SHARED_SETTINGS})
    rows, info = run_rows(model, tokenizer, kind, text, methods=methods, bits=parse_bits(args.bits),
                          roundings=roundings, calibrations=modes, seq_len=args.seq_len,
                          calib_batches=args.calib_batches, eval_batches=args.eval_batches,
                          base=base, progress=not args.quiet, permutations=permutations)
    changed = {k: getattr(base, k) for k in SHARED_SETTINGS if getattr(base, k) != getattr(DuQuantConfig(), k)}
    doc = {"schema_version": 1, "duquant_version": __version__,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": {"checkpoint": str(args.checkpoint), "kind": kind, "dtype": args.dtype, "device": args.device},
           "data": {"text": str(args.text)}, "settings": changed, "info": info, "rows": rows,
           "environment": {"torch": torch.__version__, "python": platform.python_version()},
           "timing": {"total_seconds": round(time.perf_counter() - t_start, 1)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "report.json", json.dumps(doc, indent=2))
    md = to_markdown(doc)
    _atomic_text(out / "report.md", md)
    print(md)
    print(f"wrote {out / 'report.json'}, report.md")
    return 0
