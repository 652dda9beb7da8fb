"""`duquant` command line: layers | verify | quantize | report | bench | serve | eval | record.

Every quantization flag has an OPENPI_DUQUANT_* twin (flags win). Models: the built-in tiny pi0 by default,
`--config pi0|pi05|pi0-tiny|pi05-tiny` (full sizes are built on the meta device where no weights are needed), or a
user's checkpoint with `--checkpoint DIR`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from duquant import lerobot_data
from duquant.config import PRESETS, ConfigError, add_cli_args, from_args

CONFIG_CHOICES = ("pi0", "pi05", "pi0-tiny", "pi05-tiny")


def _add_model_args(p: argparse.ArgumentParser, default_config: str = "pi0-tiny") -> None:
    p.add_argument("--config", default=None, choices=CONFIG_CHOICES,
                   help=f"built-in model config (default {default_config}; with --checkpoint: detected)")
    p.add_argument("--checkpoint", help="directory (or model.safetensors) of a pi0 / pi0.5 PyTorch checkpoint")
    p.set_defaults(default_config=default_config)


def _model_for_listing(args):
    """Build on meta (no weights) unless a checkpoint is given."""
    from duquant.workflows import load_model

    if args.checkpoint:
        return load_model(args.config, args.checkpoint)
    return load_model(args.config or args.default_config, device="meta")


def cmd_layers(args) -> int:
    from duquant.api import check_layer_formats
    from duquant.selection import layer_line, select_layers, selection_summary

    cfg = from_args(args)
    model = _model_for_listing(args)
    sel = select_layers(model, cfg)
    if cfg.debug:
        print(selection_summary(model, sel, cfg))
    # settings a layer's format cannot take fail here, as they would in quantize; skipped ones warn on stderr
    for line in check_layer_formats(cfg, {n: cfg.layer_format_spec(n) for n in sel.names}):
        print(line, file=sys.stderr)
    for name, module in sel.modules.items():
        print(layer_line(name, module, cfg))
    print(f"Matched Linear layers: {len(sel)}")
    return 0


def cmd_verify(args) -> int:
    from duquant.selection import select_layers, verify_selection

    cfg = from_args(args)
    preset = cfg.preset or args.preset
    if preset is None:
        raise ConfigError("verify needs a preset: --preset " + "|".join(PRESETS) + " (or OPENPI_DUQUANT_PRESET)")
    model = _model_for_listing(args)
    sel = select_layers(model, cfg, allow_empty=True)
    result = verify_selection(sel, preset)
    print("\n".join(result.lines))
    print(f"Matched Linear layers: {len(sel)}")
    print("verify: OK" if result.ok else "verify: MISMATCH")
    return 0 if result.ok else 1


def _calibration_data(args, model, batches: int, seed: int) -> tuple[list, str]:
    """--calib as observation batches of --batch-size and a line saying where they came from: an observation file,
    or a LeRobot dataset directory (`duquant.lerobot_data`), of which `batches` batches of frames are read (or
    --calib-frames; random sampling draws them with `seed`)."""
    from duquant import lerobot_data
    from duquant import workflows as wf

    if Path(args.calib).is_dir():
        loaded = lerobot_data.load_from_args(args, model.config, batches=batches, seed=seed)
        return loaded.batches, loaded.source
    return wf.load_calibration_file(args.calib, args.batch_size), args.calib


def cmd_quantize(args) -> int:
    import torch

    from duquant import workflows as wf
    from duquant.api import quantize
    from duquant.quantizers import relative_error

    cfg = from_args(args)
    if cfg.dryrun:
        return cmd_layers(args)
    config_name = args.config or (None if args.checkpoint else args.default_config)
    dtype = wf.parse_dtype(args.dtype)
    t_start = time.perf_counter()
    model = wf.load_model(config_name, args.checkpoint, device=args.device, dtype=dtype, seed=args.model_seed)
    timing = {"model_load_seconds": time.perf_counter() - t_start}
    if cfg.packdir is None:
        cfg = cfg.replace(packdir=wf.default_packdir(config_name or "checkpoint", cfg))
    if args.calib:
        calib_obs, calib_source = _calibration_data(args, model, cfg.calib_steps, args.data_seed)
        if len(calib_obs) < cfg.calib_steps:
            print(f"duquant quantize: warning: {args.calib} holds {sum(o.batch_size for o in calib_obs)} observations "
                  f"({len(calib_obs)} batches of {args.batch_size}), fewer than --calib-steps {cfg.calib_steps}: "
                  f"calibrating on those {len(calib_obs)} batches", file=sys.stderr)
    else:
        calib_obs = wf.synthetic_observations(model, cfg.calib_steps, args.batch_size, seed=args.data_seed)
        calib_source = f"synthetic, seed {args.data_seed}"
    if args.eval_obs:
        held_out = wf.load_calibration_file(args.eval_obs, args.batch_size)
        eval_source = args.eval_obs
    else:
        held_out = wf.synthetic_observations(model, 2, args.batch_size, seed=args.data_seed + 10_000)
        eval_source = f"synthetic, seed {args.data_seed + 10_000}"
    used = calib_obs[: cfg.calib_steps]
    data = {"calibration": calib_source, "calib_observations": sum(o.batch_size for o in used),
            "evaluation": None if args.no_eval else eval_source,
            "eval_observations": None if args.no_eval else sum(o.batch_size for o in held_out)}
    print(f"calibration: {data['calib_observations']} observations from {calib_source}"
          + ("" if args.no_eval else f"; action error measured on {data['eval_observations']} from {eval_source}"))
    if args.eval_obs and args.calib and Path(args.eval_obs).resolve() == Path(args.calib).resolve():
        print("duquant quantize: warning: --eval-obs is the calibration file; the action error is not held out",
              file=sys.stderr)
    t = time.perf_counter()
    ref = wf.sample_actions(model, held_out) if not args.no_eval else None
    timing["reference_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    report = quantize(model, cfg, calibrate=wf.calibration_fn(calib_obs, cfg.calib_steps))
    timing["quantize_seconds"] = time.perf_counter() - t  # its phases: report.phase_seconds
    result = {"report": report.to_dict(), "packdir": cfg.packdir, "data": data, "timing": timing}
    if ref is not None:
        t = time.perf_counter()
        with torch.no_grad():
            pred = wf.sample_actions(model, held_out)
        timing["eval_seconds"] = time.perf_counter() - t
        result["action_rel_mse"] = relative_error(pred, ref)
        result["action_max_abs"] = wf.max_abs_error(pred, ref)
        print(f"action error vs float on {eval_source}: rel MSE {result['action_rel_mse']:.3e}, "
              f"max abs {result['action_max_abs']:.3e}")
    timing["total_seconds"] = time.perf_counter() - t_start  # from the model load; the imports come before
    timing = {k: round(v, 3) for k, v in timing.items()}
    result["timing"] = timing
    print("time: " + ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f} s" for k, v in timing.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    print(f"packs: {cfg.packdir} ({report.pack_hits} reused, {report.pack_misses} computed)")
    return 0


def cmd_report(args) -> int:
    # A transformers checkpoint gets the real-model report (perplexity / embedding cosine); pi0 the policy report.
    if args.checkpoint and Path(args.checkpoint, "config.json").is_file():
        from duquant import real_models

        if real_models.is_transformers_checkpoint(args.checkpoint):
            return real_models.run_report_cli(args)
    from duquant.report import run_report_cli

    return run_report_cli(args, load_calib=lambda model: _calibration_data(args, model, args.calib_batches, args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the layers a config selects (dry run); "
                                      "ends with 'Matched Linear layers: N'")
    _add_model_args(p)
    add_cli_args(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("verify", help="check the selected layers against a preset's count and kinds")
    _add_model_args(p, default_config="pi0")
    add_cli_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("quantize", help="calibrate, quantize and write packs; prints the action error vs float")
    _add_model_args(p)
    add_cli_args(p)
    p.add_argument("--calib", help="calibration observations (.safetensors/.npz, see docs/report.md) or a LeRobot "
                   "dataset directory (docs/report.md)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the built-in model's weights")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic observations")
    p.add_argument("--eval-obs", help="held-out observations for the action error, same format as --calib "
                   "(default: 2 synthetic batches)")
    p.add_argument("--no-eval", action="store_true", help="skip the action-error check")
    p.add_argument("--out", help="write the quantization report JSON here")
    lerobot_data.add_cli_args(p)
    p.set_defaults(func=cmd_quantize)

    from duquant import report as report_mod

    p = sub.add_parser("report", help="accuracy and memory of every method on every part of pi0 (the main job)")
    _add_model_args(p)
    report_mod.add_report_args(p)
    lerobot_data.add_cli_args(p)
    p.set_defaults(func=cmd_report)

    # Subcommands owned by optional parts register themselves. Their `register` modules import nothing beyond the
    # core install: the extras they need are imported when the command runs (see `missing_extra`).
    for module in REGISTERING_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Top-level package of an optional dependency -> the extra that installs it.
EXTRA_OF_PACKAGE = {
    "msgpack": "serve", "websockets": "serve", "PIL": "serve", "openpi_client": "serve",
    "sentencepiece": "tokenizer", "triton": "gpu", "ray": "cluster", "transformers": "hf",
    "libero": "libero", "robosuite": "libero", "mujoco": "libero", "imageio": "libero",
    "pyarrow": lerobot_data.EXTRA, "av": lerobot_data.EXTRA,
}
REGISTERING_MODULES = ("duquant.kernels.cli", "duquant.serve.cli", "duquant.eval.cli")


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The extra that provides the module an import failed on, or None when it is not an optional dependency."""
    top = (err.name or "").split(".")[0]
    return EXTRA_OF_PACKAGE.get(top)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:
        extra = missing_extra(err)
        if extra is None:
            raise
        print(f'duquant {args.command} needs the {extra} extra (no module named {err.name!r}): '
              f'pip install "duquant[{extra}]"', file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"duquant: configuration error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from duquant.packs import PackError
        from duquant.selection import SelectionError

        if isinstance(err, (SelectionError, PackError, FileNotFoundError, lerobot_data.DatasetError)):
            print(f"duquant: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
