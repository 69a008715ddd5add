#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine with an NVIDIA GPU whose Python already
# has jax (CUDA), flax, optax, orbax-checkpoint, absl-py, torch (CUDA) and matplotlib:
#
#     bash experiments/bench/gpu_device_run.sh [OUTDIR [more gpu.py flags]]
#
# from the repository root. Wheels found in .whl/ (git-ignored; docs/design-notes.md,
# "The GPU benchmark", gives the pip download command that makes them) are installed
# first, into .whl/site. Then experiments/bench/gpu.py runs under a hard time limit
# (LIMIT_S, default 540 s: margin inside a 10-minute call) with its own budget (BUDGET_S,
# default 420 s, compilation included), writing runs/bench_gpu/benchmark_gpu.json and
# BENCHMARKS-gpu.md; both and the log are copied to OUTDIR (default: $OUT, else
# runs/bench_gpu). The JSON is saved after every section, so a run cut by the limit keeps
# what it measured (render the page from it with gpu.py --render_only). Exit status: gpu.py's.
set -u
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-runs/bench_gpu}}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out" runs/bench_gpu
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .whl/site .whl/*.whl || { echo "error: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=$PWD/.whl/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/nvidia_smi.txt" 2>&1
timeout "${LIMIT_S:-540}" python3 -m experiments.bench.gpu --outdir=runs/bench_gpu \
  --markdown=BENCHMARKS-gpu.md --budget_s="${BUDGET_S:-420}" "$@" > "$out/gpu_stdout.json" \
  2> >(tee "$out/gpu_log.txt" >&2)
status=$?
cp runs/bench_gpu/benchmark_gpu.json BENCHMARKS-gpu.md "$out/" 2>/dev/null
[ "$status" = 124 ] && echo "error: gpu.py ran past ${LIMIT_S:-540} s; its saved sections are in $out" >&2
exit "$status"
