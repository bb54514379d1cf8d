#!/usr/bin/env bash
# Several networks per GPU process, precision and memory format: the measurements of
# docs/benchmarks.md ("Several networks per process: on a GPU"), in one go, in about
# 4 minutes on an H200 (16 cores, torch 2.11, Python 3.12). Every step runs under `timeout`,
# so one step that hangs or overruns cannot take the others with it.
#
#   bash bench/gpu_training.sh                    # from the repository root; results in $OUT
#   TESLA_BENCH_TOY=1 bash bench/gpu_training.sh  # the same steps at toy size, on the CPU
#
# Steps:
#   1. expert images/s of ConvNet-3 on CIFAR-10 shapes (32 x 32 x 3, 10 classes): today's path
#      (one expert per process, torch's default arithmetic) against group mode x K (1, 2, 4, 8)
#      x precision (float32, bf16) x memory format x TF32 (bench/bench_training.py --matrix);
#   2. the same for ConvNetD4 at 64 px with 1000 classes;
#   3. the runs of one evaluation job per group mode, IPC 1, 10, 50 (bench/bench_evaluate.py --groups);
#   4. the CUDA-only tests of the group modes (tests/test_training.py -k cuda).
# The package need not be installed (PYTHONPATH is set here); OUT defaults to bench_out/.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ -n "${TESLA_BENCH_TOY:-}" ]; then   # toy size: checks the script, measures nothing
  DEVICE=${DEVICE:-cpu}; SCALE=10        # a loaded CPU: generous limits
  MODELS_1="convnet_d1:8:4"; MODELS_2="convnet_d1:8:4"
  IMAGES_1=8; IMAGES_2=8; BATCH=8; KS="1 2"; ROUNDS=1
  EVAL="--model convnet_d1 --runs 2 --epochs 1 --ipc 1 --rounds 1"
else
  DEVICE=${DEVICE:-cuda}; SCALE=1
  MODELS_1="convnet:32:10"; MODELS_2="convnet_d4:64:1000"
  IMAGES_1=5120; IMAGES_2=2560; BATCH=256; KS="1 2 4 8"; ROUNDS=2
  EVAL="--runs 5 --epochs 20 --ipc 1 10 50 --rounds 2"
fi

{
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cores: $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"

matrix() {  # $1 name, $2 model, $3 images, $4 and $5 timeouts (s): float32 with TF32 on and off, then bf16
  timeout $(($4 * SCALE)) $py bench/bench_training.py --matrix --device "$DEVICE" --matrix-models "$2" --images "$3" \
    --batch-size "$BATCH" --rounds "$ROUNDS" --k $KS --modes sequential streams vmap --precisions float32 \
    --layouts contiguous channels_last --tf32 on off --out "$OUT/$1_float32.md" 2> "$OUT/$1_float32.log"
  echo "exit status $? ($1, float32)"
  timeout $(($5 * SCALE)) $py bench/bench_training.py --matrix --device "$DEVICE" --matrix-models "$2" --images "$3" \
    --batch-size "$BATCH" --rounds "$ROUNDS" --k $KS --modes sequential streams vmap --precisions bf16 \
    --layouts contiguous channels_last --tf32 on --out "$OUT/$1_bf16.md" 2> "$OUT/$1_bf16.log"
  echo "exit status $? ($1, bf16)"
}

# at most 50 + 30 + 60 + 30 + 30 + 40 s = 4 minutes (expected: about 3)
matrix convnet "$MODELS_1" "$IMAGES_1" 50 30
matrix convnet_d4 "$MODELS_2" "$IMAGES_2" 60 30
timeout $((30 * SCALE)) $py bench/bench_evaluate.py --groups --device "$DEVICE" $EVAL --modes sequential streams vmap \
  2> "$OUT/eval_groups.log" | tee "$OUT/eval_groups.md"
echo "exit status ${PIPESTATUS[0]} (evaluation groups)"
if [ -z "${TESLA_BENCH_TOY:-}" ]; then
  timeout 40 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_training.py -k cuda 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
fi
