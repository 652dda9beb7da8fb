#!/usr/bin/env bash
# DuQuant W4A8 on vision encoder + language model + action expert (414 Linear layers in full-size pi0 / pi0.5).
# Sets the OPENPI_DUQUANT_* variables the openpi DuQuant scripts use, then runs the duquant CLI with them.
#   examples/libero/run_full_w4a8.sh                                  # quantize the built-in tiny pi0
#   examples/libero/run_full_w4a8.sh quantize --checkpoint CKPT_DIR   # your checkpoint
#   examples/libero/run_full_w4a8.sh serve --checkpoint CKPT_DIR      # serve it to openpi-client / LIBERO
#   examples/libero/run_full_w4a8.sh layers --config pi0              # dry run: list the layers, change nothing
# Any variable already set in the environment wins over these defaults.
set -euo pipefail
export OPENPI_DUQUANT_SCOPE="${OPENPI_DUQUANT_SCOPE-}"
export OPENPI_DUQUANT_WBITS_DEFAULT="${OPENPI_DUQUANT_WBITS_DEFAULT:-4}"
export OPENPI_DUQUANT_ABITS="${OPENPI_DUQUANT_ABITS:-8}"
export OPENPI_DUQUANT_BLOCK="${OPENPI_DUQUANT_BLOCK:-128}"
export OPENPI_DUQUANT_PERMUTE="${OPENPI_DUQUANT_PERMUTE:-1}"
export OPENPI_DUQUANT_LS="${OPENPI_DUQUANT_LS:-0.6}"
export OPENPI_DUQUANT_PACKDIR="${OPENPI_DUQUANT_PACKDIR:-duquant_packs/full_w4a8_b${OPENPI_DUQUANT_BLOCK}_p${OPENPI_DUQUANT_PERMUTE}}"
if [ $# -eq 0 ]; then set -- quantize; fi
exec duquant "$@"
