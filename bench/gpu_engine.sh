#!/usr/bin/env bash
# The compiled student step on one GPU (H200/H100, torch >= 2.9), in one go: at most 10 minutes
# wall including every compile warm-up; each step has its own timeout, so a slow compiler costs
# one table, not the run. Results (Markdown tables, logs) go to $OUT (default: bench_out/).
#
#   bash bench/gpu_engine.sh                 # on the CUDA machine, from the repository root
#   TOY=1 bash bench/gpu_engine.sh           # the same steps at toy size on the CPU (checks the script;
#                                            # timeouts x3: tracing alone takes a minute on 2 shared cores)
#
# What it measures (bench/bench_distill.py engine; docs/benchmarks.md says how to read it): seconds
# per distillation iteration of the engine before the compiled step ("before": tesla/matching.py of
# commit 6cb807c, cuDNN's default TF32 convolutions), the eager engine now (off: IEEE float32), each
# compile mode, and the floor (the same N plain forward+backward steps), side by side in one process,
# at three settings; each mode's dL/dX and dL/dalpha against off's; then the CUDA tests. Every table
# is rewritten after each measurement: a step stopped by its timeout keeps what it measured.
# The "before" engine is read from $BASELINE (default .device/matching_before.py, which
# bench/make_device_data.sh writes from the history: copy .device along where the tree travels without
# .git), else from git; without either that column is left out, and the script says so.
# STEPS="1 2 3 4" (default) chooses the steps below, e.g. STEPS=4 to run only the CUDA tests.
# Output folder (6 files): machine.txt, engine_cifar10_ipc10.md, engine_in1k_ipc50.md,
# engine_in1k_ipc10.md, tests_cuda.txt, logs.tar.gz.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
: > "$OUT/machine.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
started=$(date +%s)
LOGS=$(mktemp -d /tmp/tesla_engine_logs.XXXXXX)
# the tests that skip without CUDA and belong to this part (tests/test_bench_scripts.py checks
# that every such test of the suite is run by some part)
CUDA_TESTS=(tests/test_matching.py -k "cuda or gpu")
BASELINE=${BASELINE:-.device/matching_before.py}
if [ ! -f "$BASELINE" ]; then
  BASELINE=$(mktemp --suffix=_matching_before.py)
  git show 6cb807c:tesla/matching.py > "$BASELINE" 2>/dev/null \
    || { echo "gpu_engine.sh: no 'before' engine (no .device/matching_before.py, no git history): that column is left out" | tee -a "$OUT/machine.txt" >&2; BASELINE=""; }
fi
baseline=(--baseline-rev "")
[ -n "$BASELINE" ] && baseline=(--baseline "$BASELINE")

if [ "${TOY:-0}" = 1 ]; then
  device=(--device cpu --toy --threads 1); all_modes=(off trace); big_modes=(off trace); small_modes=(off trace); x=3
else
  device=(--device cuda); all_modes=(off cudagraph inductor inductor-cudagraph)
  big_modes=(off cudagraph inductor-cudagraph); small_modes=(off inductor-cudagraph); x=1
fi
engine=($py bench/bench_distill.py engine "${device[@]}" "${baseline[@]}")

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cores: $(nproc)"
} 2>&1 | tee -a "$OUT/machine.txt"

steps=" ${STEPS:-1 2 3 4} "
# 1. CIFAR-10 IPC 10 (ConvNet-3, 100 images, N = 30): launch-bound; target >= 4x "before"
[[ $steps == *" 1 "* ]] && timeout $((220 * x)) "${engine[@]}" --settings cifar10-ipc10 --modes "${all_modes[@]}" \
  --repeats 5 --out "$OUT/engine_cifar10_ipc10.md" 2>&1 | tee "$LOGS/engine_cifar10_ipc10.log" | grep -v "^W[0-9]"
# 2. ImageNet-1K IPC 50 (ConvNetD4, 64 px, 50,000 images, batch_syn 1000, N = 30): target >= 2x "before"
[[ $steps == *" 2 "* ]] && timeout $((220 * x)) "${engine[@]}" --settings in1k-ipc50 --modes "${big_modes[@]}" \
  --repeats 2 --out "$OUT/engine_in1k_ipc50.md" 2>&1 | tee "$LOGS/engine_in1k_ipc50.log" | grep -v "^W[0-9]"
# 3. ImageNet-1K IPC 10 (10,000 images, batch_syn 500, N = 20)
[[ $steps == *" 3 "* ]] && timeout $((90 * x)) "${engine[@]}" --settings in1k-ipc10 --modes "${small_modes[@]}" \
  --repeats 2 --out "$OUT/engine_in1k_ipc10.md" 2>&1 | tee "$LOGS/engine_in1k_ipc10.log" | grep -v "^W[0-9]"
# 4. correctness on the GPU: compiled == eager, no synchronisation inside the sweeps, with whatever time is left
left=$(( 570 * x - ($(date +%s) - started) ))
if [[ $steps != *" 4 "* ]]; then
  :
elif [ "$left" -gt 30 ]; then
  timeout "$left" $py -m pytest -q -p no:cacheprovider -o addopts="" -rs "${CUDA_TESTS[@]}" 2>&1 | tail -15 | tee "$OUT/tests_cuda.txt"
else
  echo "no time left for the CUDA tests" | tee "$OUT/tests_cuda.txt"
fi
echo "gpu_engine.sh: $(( $(date +%s) - started )) s" | tee -a "$OUT/machine.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
cat "$OUT"/engine_*.md 2>/dev/null
