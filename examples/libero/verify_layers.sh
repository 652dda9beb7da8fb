#!/usr/bin/env bash
# Check that every preset selects exactly the layers it should, on full-size pi0 and pi0.5 built on the meta
# device (no weights, no downloads). Exits non-zero on the first mismatch.
#   examples/libero/verify_layers.sh                      # built-in configs
#   examples/libero/verify_layers.sh --checkpoint DIR     # your checkpoint
set -euo pipefail
configs=(pi0 pi05)
if [ $# -gt 0 ]; then configs=(""); fi
for config in "${configs[@]}"; do
  for preset in llm dit vision llm+dit full; do
    echo "== ${config:-checkpoint} / ${preset}"
    duquant verify ${config:+--config "$config"} --preset "$preset" "$@"
  done
done
echo "all presets verified"
