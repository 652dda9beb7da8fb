"""`duquant serve`: an openpi-compatible policy server for a built-in config or a user's checkpoint, quantized
at start-up when any quantization flag or OPENPI_DUQUANT_* variable is given (the same ones as `duquant
quantize`)."""

from __future__ import annotations

import argparse
import logging
import sys

CONFIG_CHOICES = ("pi0", "pi05", "pi0-tiny", "pi05-tiny")


def _quant_dests() -> set[str]:
    from duquant.config import add_cli_args

    probe = argparse.ArgumentParser(add_help=False)
    add_cli_args(probe)
    return {a.dest for a in probe._actions} - {"help"}


def register(subparsers) -> None:
    from duquant.config import add_cli_args

    p = subparsers.add_parser(
        "serve",
        help="serve a (quantized) pi0 / pi0.5 over openpi's WebSocket protocol (openpi-client compatible)",
        description=__doc__,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--config",
        choices=CONFIG_CHOICES,
        help="built-in config (default pi0-tiny; with --checkpoint: detected from the weights)",
    )
    m.add_argument(
        "--checkpoint", help="openpi or LeRobot pi0 / pi0.5 checkpoint directory (model.safetensors)"
    )
    m.add_argument(
        "--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda when available)"
    )
    m.add_argument(
        "--dtype", default="auto", help="float32 | bfloat16 | auto (bfloat16 on cuda, else float32)"
    )
    m.add_argument("--model-seed", type=int, default=0, help="seed of a built-in config's random weights")
    t = p.add_argument_group("transforms (defaults: openpi's pi0_libero / pi05_libero)")
    t.add_argument(
        "--robot",
        choices=("libero", "generic"),
        default="libero",
        help="libero: openpi's LIBERO keys, 7 action dims; generic: model camera names, all dims",
    )
    t.add_argument(
        "--norm-stats", help="norm_stats.json (default: <checkpoint>/assets/<asset_id>/norm_stats.json)"
    )
    t.add_argument(
        "--asset-id",
        help="asset id under <checkpoint>/assets (default physical-intelligence/libero, "
        "or the only one present)",
    )
    t.add_argument("--norm", choices=("auto", "zscore", "quantile", "none"), default="auto",
                   help="auto: z-score for pi0, quantile for pi0.5 (openpi); none: no normalisation")
    t.add_argument(
        "--delta",
        choices=("auto", "on", "off"),
        default="auto",
        help="add the state back to the first 6 action dims (auto: on for pi0, off for pi0.5 on LIBERO)",
    )
    t.add_argument("--action-dims", type=int, help="action dims returned (LIBERO 7; 0 = all)")
    t.add_argument("--discrete-state-input", action=argparse.BooleanOptionalAction, default=None,
                   help="pi0.5: write the discretised state into the prompt (pi05_libero: off)")
    t.add_argument("--default-prompt", help="prompt used when a request has none")
    t.add_argument(
        "--tokenizer",
        help="PaliGemma's paligemma_tokenizer.model ('fallback': a stand-in for tiny models and smoke tests)",
    )
    t.add_argument("--noise-seed", type=int, help="seed the flow-matching noise (reproducible actions)")
    t.add_argument("--state-pad", choices=("error", "zero"), default="error",
                   help="a state shorter than the policy expects (LIBERO: 8): error (default) refuses the "
                   "request; zero pads the missing dims with zeros after normalisation")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--batch-window-ms", type=float, default=0.0, help="gather concurrent requests for this "
                   "long and run them as one batch (default %(default)s: no batching)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="largest batch with --batch-window-ms (default %(default)s)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for the model at most, then senders wait (default %(default)s)")
    s.add_argument("--max-request-mb", type=float, default=64.0,
                   help="largest request accepted, in MiB; larger ones are refused with close code 1009 "
                   "(default %(default)s)")
    s.add_argument("--no-warmup", action="store_true", help="listen before the first inference")
    q = p.add_argument_group("calibration (when quantizing)")
    q.add_argument(
        "--calib", help="observation file (duquant record libero); default: synthetic observations"
    )
    q.add_argument("--calib-batch-size", type=int, default=2, help="observations per calibration batch "
                   "(default %(default)s); --calib-steps counts these batches")
    q.add_argument(
        "--float", action="store_true", help="serve in float even if OPENPI_DUQUANT_* variables are set"
    )
    add_cli_args(p)
    p.set_defaults(func=cmd_serve)


def quantization_from_args(args):
    """The DuQuantConfig to apply, or None (float): on when a quantization flag or OPENPI_DUQUANT_* is
    given."""
    from duquant.config import env_is_active, from_args

    if getattr(args, "float", False):
        return None
    flags = {d for d in _quant_dests() if getattr(args, d, None) is not None} - {"packdir"}
    if not flags and not env_is_active():
        return None
    return from_args(args)


def spec_from_args(args, quantize):
    from duquant.serve.policy import PolicySpec

    return PolicySpec(
        config=args.config,
        checkpoint=args.checkpoint,
        robot=args.robot,
        device=args.device,
        dtype=args.dtype,
        norm_stats=args.norm_stats,
        asset_id=args.asset_id,
        norm=args.norm,
        delta=args.delta,
        action_dims=args.action_dims,
        discrete_state_input=args.discrete_state_input,
        default_prompt=args.default_prompt,
        tokenizer=args.tokenizer,
        noise_seed=args.noise_seed,
        model_seed=args.model_seed,
        quantize=quantize,
        calib=args.calib,
        calib_batch_size=args.calib_batch_size,
        state_pad=args.state_pad,
    )


def cmd_serve(args) -> int:
    from duquant.models.checkpoints import CheckpointError
    from duquant.serve.policy import create_policy
    from duquant.serve.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is ours
    log = logging.getLogger("duquant.serve").info
    quantize = quantization_from_args(args)
    try:
        policy = create_policy(spec_from_args(args, quantize), log=log)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"duquant serve: {err}", file=sys.stderr)
        return 2
    qmeta = policy.metadata["duquant"]["quantization"]
    if qmeta and qmeta.get("dryrun"):
        for line in qmeta["lines"]:
            print(line)
        print(f"Matched Linear layers: {len(qmeta['lines'])}")
        return 0
    log("serving " + ("float" if quantize is None else f"quantized ({qmeta['method']} {qmeta['bits']}, "
                                                         f"{qmeta['layers']} layers)"))
    server = PolicyServer(policy, host=args.host, port=args.port, batch_window_ms=args.batch_window_ms,
                          max_batch=args.max_batch, max_queue=args.max_queue,
                          max_request_bytes=int(args.max_request_mb * (1 << 20)), warmup=not args.no_warmup)

    def ready(port: int) -> None:
        shown = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
        print(f"duquant serve: listening on ws://{shown}:{port} (health: http://{shown}:{port}/healthz)",
              flush=True)

    server.serve_forever(ready=ready)
    print(
        f"duquant serve: stopped after {server.stats['requests']} requests ({server.stats['errors']} failed)",
        flush=True,
    )
    return 0
