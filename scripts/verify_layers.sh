#!/usr/bin/env bash
# Same as examples/libero/verify_layers.sh (kept at the path the openpi DuQuant scripts use).
exec "$(dirname "$0")/../examples/libero/verify_layers.sh" "$@"
