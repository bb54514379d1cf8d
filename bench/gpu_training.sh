#!/usr/bin/env bash
# Several networks per GPU process, precision and memory format, and the training rates of the
# cross-architecture networks at 64 px: the measurements of docs/benchmarks.md ("Several networks
# per process: on a GPU"), in one go, in about 5 minutes on an H100/H200. Every step runs under
# `timeout`, and every table is rewritten after each measurement, so a step that hangs or
# reaches its cap keeps what it measured and cannot take the others with it.
#
#   bash bench/gpu_training.sh                    # from the repository root; results in $OUT
#   TESLA_BENCH_TOY=1 bash bench/gpu_training.sh  # the same steps at toy size, on the CPU
#
# Steps:
#   1. expert images/s of ConvNet-3 on CIFAR-10 shapes (32 x 32 x 3, 10 classes): today's path
#      (one expert per process, torch's default arithmetic) against group mode x K (1, 2, 4, 8)
#      x precision (float32, bf16) x memory format x TF32 (bench/bench_training.py --matrix);
#   2. the same for ConvNetD4 at 64 px with 1000 classes;
#   3. ResNet-18, VGG-11 and AlexNet at 64 px with 1000 classes (the evaluation networks of the
#      ImageNet-1K cost projection), float32, one and two networks per process;
#   4. the runs of one evaluation job per group mode, IPC 1, 10, 50 (bench/bench_evaluate.py --groups);
#   5. the CUDA-only tests of training, augmentation and the input space (CUDA_TESTS below).
# Output folder (8 files): machine.txt, convnet_float32.md, convnet_bf16.md, convnet_d4_float32.md,
# convnet_d4_bf16.md, models_64px.md, eval_groups.md, logs.tar.gz (every step's log and the tests'
# output). The package need not be installed (PYTHONPATH is set here); OUT defaults to bench_out/.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
LOGS=$(mktemp -d /tmp/tesla_training_logs.XXXXXX)
# the tests that skip without CUDA and belong to this part (tests/test_bench_scripts.py checks
# that every such test of the suite is run by some part)
CUDA_TESTS=(tests/test_training.py tests/test_augment.py tests/test_input_space.py -k "cuda")

if [ -n "${TESLA_BENCH_TOY:-}" ]; then   # toy size: checks the script, measures nothing
  DEVICE=${DEVICE:-cpu}; SCALE=10        # a loaded CPU: generous limits
  MODELS_1="convnet_d1:8:4"; MODELS_2="convnet_d1:8:4"; MODELS_64="convnet_d1:8:4 convnet_d2:8:4"
  IMAGES_1=8; IMAGES_2=8; IMAGES_64=8; BATCH=8; KS="1 2"; ROUNDS=1
  EVAL="--model convnet_d1 --runs 2 --epochs 1 --ipc 1 --rounds 1"
else
  DEVICE=${DEVICE:-cuda}; SCALE=1
  MODELS_1="convnet:32:10"; MODELS_2="convnet_d4:64:1000"; MODELS_64="resnet18:64:1000 vgg11:64:1000 alexnet:64:1000"
  IMAGES_1=5120; IMAGES_2=2560; IMAGES_64=1280; BATCH=256; KS="1 2 4 8"; ROUNDS=2
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
    --layouts contiguous channels_last --tf32 on off --out "$OUT/$1_float32.md" 2> "$LOGS/$1_float32.log"
  echo "exit status $? ($1, float32)"
  timeout $(($5 * SCALE)) $py bench/bench_training.py --matrix --device "$DEVICE" --matrix-models "$2" --images "$3" \
    --batch-size "$BATCH" --rounds "$ROUNDS" --k $KS --modes sequential streams vmap --precisions bf16 \
    --layouts contiguous channels_last --tf32 on --out "$OUT/$1_bf16.md" 2> "$LOGS/$1_bf16.log"
  echo "exit status $? ($1, bf16)"
}

# at most 50 + 30 + 60 + 30 + 90 + 30 + 60 s = 5.8 minutes (expected: about 4-5)
matrix convnet "$MODELS_1" "$IMAGES_1" 50 30
matrix convnet_d4 "$MODELS_2" "$IMAGES_2" 60 30
timeout $((90 * SCALE)) $py bench/bench_training.py --matrix --device "$DEVICE" --matrix-models $MODELS_64 --images "$IMAGES_64" \
  --batch-size "$BATCH" --rounds "$ROUNDS" --k 1 2 --modes sequential --precisions float32 --layouts contiguous channels_last \
  --tf32 on --out "$OUT/models_64px.md" 2> "$LOGS/models_64px.log"
echo "exit status $? (models at 64 px)"
timeout $((30 * SCALE)) $py bench/bench_evaluate.py --groups --device "$DEVICE" $EVAL --modes sequential streams vmap \
  2> "$LOGS/eval_groups.log" | tee "$OUT/eval_groups.md"
echo "exit status ${PIPESTATUS[0]} (evaluation groups)"
if [ -z "${TESLA_BENCH_TOY:-}" ]; then
  timeout 60 $py -m pytest -q -p no:cacheprovider -o addopts="" -rs "${CUDA_TESTS[@]}" > "$LOGS/tests_cuda.txt" 2>&1
  echo "exit status $? (CUDA tests)"
  tail -8 "$LOGS/tests_cuda.txt"
fi
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
