#!/usr/bin/env bash
# The first GPU measurements recorded in docs/benchmarks.md (training loop, distillation memory
# per engine at ImageNet-1K scale), in one go (about 8-9 minutes on an H100): the `baseline` part
# of bench/gpu_benchmarks.sh (which was this file until the parts were split).
# Run from the repository root on a CUDA machine; the package need not be installed
# (PYTHONPATH is set here). Results go to $OUT (default: bench_out/).
#   CIFAR_TRAIN: a prepared CIFAR-10 train.h5 (or a class-balanced subset of one)
set -u
OUT=${OUT:-bench_out}
CIFAR_TRAIN=${CIFAR_TRAIN:-data/cifar10/train.h5}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import sys, torch, torchvision, numpy, h5py; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'h5py', h5py.__version__)"
  nproc
} 2>&1 | tee "$OUT/machine.txt"

# 1. the training loop against a DataLoader loop: ConvNet-3 on CIFAR-10
timeout 150 $py bench/bench_training.py --device cuda --train "$CIFAR_TRAIN" --images 12800 --rounds 3 \
  --workers 0 4 8 16 2>&1 | tee "$OUT/training_cifar10.md"
# 2. the same at ImageNet-1K sizes (ConvNetD4, 64 x 64, 1000 classes; random pixels: no ImageNet here)
timeout 110 $py bench/bench_training.py --device cuda --synthetic --model convnet_d4 --resolution 64 --classes 1000 \
  --images 12800 --rounds 2 --workers 0 8 16 --strategies color_crop_cutout_flip_scale_rotate none --no-data-only \
  2>&1 | tee "$OUT/training_in1k64.md"
# 3. distillation memory and time per engine at ImageNet-1K scale, TESLA's IPC 1 setting (batch_syn 100)
timeout 130 $py bench/bench_distill.py --device cuda --model convnet_d4 --width 128 --resolution 64 --classes 1000 \
  --ipc 1 --batch-syn 100 --steps 10 20 40 80 --time-steps 10 --repeats 3 --out "$OUT/distill_in1k_ipc1.md" \
  2>&1 | tail -40
# 4. IPC 50 at ImageNet-1K scale (50,000 synthetic images), batch_syn 500
timeout 190 $py bench/bench_distill.py --device cuda --model convnet_d4 --width 128 --resolution 64 --classes 1000 \
  --ipc 50 --batch-syn 500 --steps 10 20 --time-steps 10 --repeats 2 --out "$OUT/distill_in1k_ipc50.md" \
  2>&1 | tail -40
