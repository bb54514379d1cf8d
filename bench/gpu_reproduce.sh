#!/usr/bin/env bash
# A published CIFAR-10 row on one GPU, from nothing: prepare (all 50,000 training and 10,000 test
# images), ZCA, experts, distillation, the published evaluation and the random-real baseline, then
# one table (reproduce.md in the output folder, also printed last): ours next to the paper's, the
# iterations reached and the seconds of every stage. Driver: bench/reproduce_published.py.
#
#   bash bench/gpu_reproduce.sh --out DIR [--row ipc10|ipc1] [--until distill] [driver options]
#
# --row ipc10 (default): MTT's row (CIFAR-10 IPC 10, `exact`, ZCA on pixels in [0, 1], eps 0.1),
#   5 experts trained to epoch 22 (the last snapshot the row reads), as many iterations as fit up
#   to MTT's 5,000 (the table flags fewer than 1,000), evaluated with the published protocol
#   (ConvNet-3, 1001 epochs, lr x0.1 from epoch 502, momentum restarted there, 5 runs).
# --row ipc1: TESLA's row (IPC 1, no ZCA, CIFAR-10 constants), both engines (`exact`, `tesla`) from
#   the same 5 experts (7 epochs), up to TESLA's 10,000 iterations, 3 evaluation runs.
# Eager distillation (--compile off): the compiled step has not been built on a GPU yet. `--compile
# auto` tries it and falls back to eager by itself where it cannot be built.
#
# Time: each command stops in time on its own: the script under `timeout $LIMIT` (default 585 s),
# the driver's --budget (default 555 s) ends the distillation early enough for what follows. Where
# one command cannot hold it all (e.g. where each command may run 10 minutes), run it twice on the
# same machine; the second goes on from the first's work folder (.work/reproduce-ROW) and its
# distillation checkpoint:
#   bash bench/gpu_reproduce.sh --out DIR --until distill   # prepare, ZCA, experts, distillation
#   bash bench/gpu_reproduce.sh --out DIR                   # more distillation, evaluation, table
# Without a time limit (your own GPU): LIMIT=0 BUDGET=14400 bash bench/gpu_reproduce.sh --out DIR
# runs the row's full iterations in one go.
#   estimated on an H100 (docs/benchmarks.md rates, not measured for this script): prepare + ZCA
#   ~40 s, 5 experts side by side ~2-5 min, an eager IPC-10 iteration ~0.5 s, evaluation ~1-2 min.
#   BUDGET (s per command) and LIMIT (the command's timeout) size each command.
#
# Data: $DATA, default .device/cifar10.tar.gz (all 60,000 JPEGs, 18.5 MiB; TESLA_DATASETS=... bash
# bench/make_device_data.sh builds it from the shared cifar10-jpg.tar; copy .device along with the tree). TOY=1: the
# same stages at toy size on the CPU (checks only; TOY=1 bash bench/make_device_data.sh first).
# Python: torch, torchvision, numpy, pillow, h5py, pandas, pyyaml, tqdm must be importable by
# python3 ($PYTHON); the package runs from the tree (PYTHONPATH). Nothing is downloaded.
# Output folder: reproduce.md, acc_ipc<N>.csv, logs.tar.gz (every process's output, the
# distillation metrics), machine.txt, reproduce.log: 5 files.
set -u
OUT=${OUT:-bench_out}
ROW=ipc10
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --row) ROW=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$ROW" in
  ipc10) row=(--ipc 10) ;;
  ipc1) row=(--ipc 1 --engines exact tesla) ;;
  *) echo "gpu_reproduce.sh: --row ipc10 or ipc1, not $ROW" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
toy=""; [ "${TOY:-0}" = 1 ] && toy=-toy
WORK=${WORK:-.work/reproduce-$ROW$toy}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cores: $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"
missing=$($py - <<'PY'
import importlib.util
need = ["torch", "torchvision", "numpy", "PIL", "h5py", "pandas", "yaml", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_reproduce.sh: $py lacks: $missing (install them first)" >&2
  exit 2
fi

if [ "${TOY:-0}" = 1 ]; then
  data=${DATA:-.device/cifar10-toy.tar.gz}
  # toy size, CPU: 2 ConvNet-1 experts, max_start_epoch 2 and syn_steps 4, 3 iterations, 4 evaluation
  # epochs, 2 runs (cross-architecture: ConvNet-2); the guard's loss limit lifted (toy experts take
  # 1 SGD step per epoch, the student 4). Checks the stages only.
  budget=(--device cpu --experts 2 --iterations 3 --min-iterations 2 --jobs 2 --budget ${BUDGET:-3000} --prepare-cap 900
          --evaluate-reserve 900 --cross-arch-min 60 --max-start-epoch 2 --syn-steps 4 --eval-epochs 4 --eval-runs 2
          --model convnet_d1 --cross-archs convnet_d2 --max-loss 1e9)
  LIMIT=${LIMIT:-3600}
else
  data=${DATA:-.device/cifar10.tar.gz}
  budget=(--device cuda --experts 5 --jobs 6 --budget ${BUDGET:-555} --compile ${COMPILE:-off})
  LIMIT=${LIMIT:-585}
fi
[ -f "$data" ] || { echo "gpu_reproduce.sh: $data not found: run bench/make_device_data.sh (TESLA_DATASETS set), and copy .device along where the tree travels" >&2; exit 2; }
mkdir -p "$WORK"
run=($py bench/reproduce_published.py --data "$data" --work "$WORK" --out "$OUT" "${row[@]}" "${budget[@]}" "${args[@]}")
if [ "$LIMIT" = 0 ]; then "${run[@]}" 2>&1 | tee -a "$OUT/reproduce.log"; else timeout "$LIMIT" "${run[@]}" 2>&1 | tee -a "$OUT/reproduce.log"; fi
status=${PIPESTATUS[0]}
echo "gpu_reproduce.sh: exit status $status, work folder $WORK" | tee -a "$OUT/reproduce.log"
exit "$status"
