# Sourced by run_{llm,dit,full}_w4a8.sh after they set PRESET_NAME and PRESET_SCOPE: exports the OPENPI_DUQUANT_*
# defaults the openpi DuQuant scripts use (a variable already set in the environment wins), then runs the duquant
# CLI with the script's arguments (default: quantize).
export OPENPI_DUQUANT_SCOPE="${OPENPI_DUQUANT_SCOPE-$PRESET_SCOPE}"
export OPENPI_DUQUANT_WBITS_DEFAULT="${OPENPI_DUQUANT_WBITS_DEFAULT:-4}"
export OPENPI_DUQUANT_ABITS="${OPENPI_DUQUANT_ABITS:-8}"
export OPENPI_DUQUANT_BLOCK="${OPENPI_DUQUANT_BLOCK:-128}"
export OPENPI_DUQUANT_PERMUTE="${OPENPI_DUQUANT_PERMUTE:-1}"
export OPENPI_DUQUANT_LS="${OPENPI_DUQUANT_LS:-0.6}"
export OPENPI_DUQUANT_PACKDIR="${OPENPI_DUQUANT_PACKDIR:-duquant_packs/${PRESET_NAME}_w4a8_b${OPENPI_DUQUANT_BLOCK}_p${OPENPI_DUQUANT_PERMUTE}}"
if [ $# -eq 0 ]; then set -- quantize; fi
exec duquant "$@"
