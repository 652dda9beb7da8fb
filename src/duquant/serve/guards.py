"""What the policy server refuses, and what it serves with a warning, before a request reaches the model.

A policy server drives a robot, so a request it cannot serve correctly gets an error reply, never made-up
actions:
- a NaN or Inf anywhere in the state or in a float image: `InputError`;
- a state whose length differs from what the policy expects (LIBERO: 8; a generic robot: the length of the
  norm stats' state, when there are norm stats): `InputError`, unless the server was started with the
  documented pad policy `--state-pad zero`, which pads a shorter state with zeros after normalisation (the
  value openpi's PadStatesAndActions gives the dims past the robot's). A longer state is always refused.
Served, with a log line and an entry in the reply's `input_warnings`:
- a prompt longer than the tokenizer's limit is cut there (openpi's tokenizer cuts it too, silently);
- an image with a side below `MIN_IMAGE_SIDE` pixels is resized to the model's size as openpi does, which
  leaves little for the model to see.

Only numpy is imported (the eval client shares this package without torch).
"""

from __future__ import annotations

import copy
import logging

import numpy as np

logger = logging.getLogger("duquant.serve")

STATE_PAD_POLICIES = ("error", "zero")
LIBERO_STATE_DIM = 8  # eef position (3) + axis-angle (3) + gripper qpos (2), openpi's examples/libero/main.py
MIN_IMAGE_SIDE = 32  # pixels; smaller images are upscaled more than 7x to the 224 input
# Longest text handed to the tokenizer, per token of its limit: a SentencePiece piece is at most 16 characters,
# so text past this cannot fit anyway; it bounds the work a huge prompt costs.
CHARS_PER_TOKEN_BOUND = 64


class InputError(ValueError):
    """A request the server cannot serve correctly; the message names the field and the fix."""


def check_finite(name: str, array: np.ndarray) -> None:
    """InputError when a float array holds NaN or Inf (integer arrays cannot)."""
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            where = np.argwhere(bad)[:3].tolist()
            raise InputError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN/Inf), e.g. at index "
                             f"{where}; the server refuses non-finite input (check the sensor or the client's "
                             "preprocessing)")


def state_length(n: int, expected: int | None, policy: str, what: str) -> int:
    """The length a state of `n` dims is served at: `n` when it is what the policy expects (or nothing is
    known: `expected` None, a generic robot without norm stats), `expected` under the pad policy "zero";
    otherwise InputError. `what` names the expected layout in the error."""
    if policy not in STATE_PAD_POLICIES:
        raise ValueError(f"unknown state pad policy {policy!r}; choose one of {list(STATE_PAD_POLICIES)}")
    if expected is None or n == expected:
        return n
    if n > expected:
        raise InputError(f"state has {n} dims, the policy expects {expected} ({what}); the server does not "
                         "crop a state: send the robot's state as the policy was trained on it")
    if policy != "zero":
        raise InputError(f"state has {n} dims, the policy expects {expected} ({what}); send all of them, or "
                         "start the server with --state-pad zero to pad the missing dims with zeros after "
                         "normalisation (docs/serving.md)")
    return expected


def small_image_warning(camera: str, shape: tuple[int, ...]) -> str | None:
    """A warning text for an image below MIN_IMAGE_SIDE on a side; InputError for an empty one."""
    h, w = shape[0], shape[1]
    if h == 0 or w == 0:
        raise InputError(f"image {camera!r} is empty (shape {tuple(shape)}); send HxWx3 uint8 pixels")
    if min(h, w) < MIN_IMAGE_SIDE:
        return (f"image {camera!r} is {h}x{w} pixels, below {MIN_IMAGE_SIDE} on a side; it is resized to the "
                "model's input as openpi does, but the policy sees little (check the camera resolution)")
    return None


def tokenize_bounded(tokenizer, prompt: str, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(tokens, mask, warning): the tokenizer's output cut at its limit (`max_len`), as openpi's tokenizer cuts
    it, plus a warning when that cut anything. A tokenizer without `max_len` is called as is."""
    limit = getattr(tokenizer, "max_len", None)
    if limit is None:
        tokens, mask = tokenizer.tokenize(prompt, state)
        return tokens, mask, None
    text = prompt[: limit * CHARS_PER_TOKEN_BOUND]
    wide = copy.copy(tokenizer)  # same model, room for every token: count them, then cut as openpi does
    wide.max_len = limit + len(text.encode()) + 64 + 8 * (0 if state is None else state.size)
    tokens, mask = wide.tokenize(text, state)
    count = int(np.asarray(mask).sum())
    tokens, mask = np.asarray(tokens)[:limit], np.asarray(mask)[:limit]
    if count <= limit and len(text) == len(prompt):
        return tokens, mask, None
    shown = f" ({count} tokens)" if len(text) == len(prompt) else ""
    return tokens, mask, (f"prompt of {len(prompt)} characters{shown} was cut at the tokenizer's limit of "
                          f"{limit} tokens")


__all__ = ["InputError", "STATE_PAD_POLICIES", "LIBERO_STATE_DIM", "MIN_IMAGE_SIDE", "check_finite", "state_length",
           "small_image_warning", "tokenize_bounded"]
