#!/usr/bin/env bash
# The report's sweeps on a GPU, before and after packing the rules: the clip ablation's
# grid (experiments/configs/clip_ablation.py) and the stability map
# (experiments/configs/stability.py), each trained with one program per (cell, optimizer)
# (--pack_rules, today) and with one per (rule, cell, optimizer) (--nopack_rules, before),
# and the grid's program count and compile time in both layouts (bench_packing.py
# --compile_grid). From the repository root, on a machine whose Python has jax (CUDA),
# flax, optax, orbax-checkpoint, absl-py, ml-collections and matplotlib:
#
#     bash experiments/bench/gpu_sweeps.sh [OUTDIR [PART ...]]
#
# PART: compile, ablation, stability (default: all three, in that order). Each training
# runs under LIMIT_S (default 280 s) so that a part fits a 10-minute call with both
# layouts; a run cut by the limit is recorded as such (status 124). Writes
# OUTDIR/gpu_sweeps.jsonl (default OUTDIR: $OUT, else runs/gpu_sweeps): one line per
# (part, layout) with its wall seconds, exit status and the GPU's name, and each
# training's own outputs (clip_ablation.json: the training seconds) under OUTDIR.
set -u
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-runs/gpu_sweeps}}
shift $(( $# > 0 ? 1 : 0 ))
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(compile ablation stability)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
record() {  # part layout seconds status
  printf '{"part": "%s", "layout": "%s", "seconds": %s, "status": %s, "device": "%s"}\n' \
    "$1" "$2" "$3" "$4" "${gpu:-none}" >> "$out/gpu_sweeps.jsonl"
}
train() {  # part layout config...
  local part=$1 layout=$2
  shift 2
  local start=$SECONDS
  timeout "${LIMIT_S:-280}" python3 -m experiments.science.clip_ablation \
    --outdir="$out/$part-$layout" --plateau_factor=1 "--$layout" "$@" \
    > "$out/$part-$layout.log" 2>&1
  record "$part" "$layout" $((SECONDS - start)) $?
}
for part in "${parts[@]}"; do
  case $part in
    compile)
      start=$SECONDS
      python3 -m experiments.bench.bench_packing --outdir="$out" --compile_grid \
        > "$out/bench_packing.log" 2>&1
      record compile both $((SECONDS - start)) $? ;;
    ablation)
      for layout in pack_rules nopack_rules; do train ablation "$layout"; done ;;
    stability)
      for layout in pack_rules nopack_rules; do
        train stability "$layout" --config=experiments/configs/stability.py
      done ;;
    *) echo "error: unknown part $part; choose from compile, ablation, stability" >&2; exit 2 ;;
  esac
done
cat "$out/gpu_sweeps.jsonl"
