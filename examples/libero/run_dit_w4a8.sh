#!/usr/bin/env bash
# DuQuant W4A8 on the Gemma 300M action expert (126 Linear layers in full-size pi0 / pi0.5).
# Sets the OPENPI_DUQUANT_* variables the openpi DuQuant scripts use, then runs the duquant CLI with them.
#   examples/libero/run_dit_w4a8.sh                                  # quantize the built-in tiny pi0
#   examples/libero/run_dit_w4a8.sh quantize --checkpoint CKPT_DIR   # your checkpoint
#   examples/libero/run_dit_w4a8.sh serve --checkpoint CKPT_DIR      # serve it to openpi-client / LIBERO
#   examples/libero/run_dit_w4a8.sh layers --config pi0              # dry run: list the layers, change nothing
# Any variable already set in the environment wins over these defaults.
set -euo pipefail
PRESET_NAME=dit
PRESET_SCOPE="paligemma_with_expert.gemma_expert.model."
source "$(dirname "$0")/_w4a8_preset.sh"
