#!/usr/bin/env bash
# Nsight Compute on one activation-transform launch, reduced to two small text files under $OUT: the details page
# (speed of light, occupancy, warp states, launch) and the SASS lines with the most stall samples.
#   bash bench/act_ncu.sh 816x2048 [fold|tile] [shuffle|zigzag]      (repository root, PYTHONPATH=src)
set -eu
shape="${1:-816x2048}"; kernel="${2:-fold}"; permute="${3:-shuffle}"
OUT="${OUT:-bench_out}"; mkdir -p "$OUT"
rep="$(mktemp -d)/rep"
ncu --set full -k regex:'_shuffle_act|_tile_act' -s 2 -c 1 -o "$rep" \
    python3 bench/act_ncu.py --kernel "$kernel" --permute "$permute" --shape "$shape" > /dev/null
tag="${kernel}_${shape}"
ncu -i "$rep.ncu-rep" --page details > "$OUT/ncu_${tag}.txt"
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv"
python3 bench/ncu_sass_top.py "$rep.csv" --top 30 > "$OUT/ncu_sass_${tag}.txt"
grep -E "Duration|Achieved Occupancy|Registers Per|Dynamic Shared|Grid Size|Block Size|Warp Cycles Per Issued" \
    "$OUT/ncu_${tag}.txt"
