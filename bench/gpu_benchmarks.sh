#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md: one entry point, one PART per command, on any
# machine with one CUDA GPU (torch >= 2.9), from the repository root. Each part stops on its own
# within 10 minutes and writes at most 8 files into the output folder DIR (default bench_out/);
# its tables are rewritten after each measurement, so a step stopped by its time cap keeps what it
# measured. docs/benchmarks.md ("How to run the GPU measurements") gives the order.
#
#   bash bench/gpu_benchmarks.sh PART --out DIR [PART's options]
#   TOY=1 bash bench/gpu_benchmarks.sh PART --out DIR    # the same steps at toy size on the CPU (checks only)
#
# PART        script                 measures                                            minutes  needs first
# reproduce   bench/gpu_reproduce.sh a published CIFAR-10 row from nothing, ours next to     <= 9.8   .device/cifar10.tar.gz
#                                    the paper's: --row ipc10 (MTT's row, default; give it            (bench/make_device_data.sh)
#                                    two commands: --until distill, then again) or --row ipc1
#                                    (TESLA's row, both engines)
# engine      bench/gpu_engine.sh    the compiled student step against the eager engine     <= 9.5   .device/matching_before.py
#                                    and the engine before it, 3 settings; CUDA tests of               where the tree has no .git
#                                    matching                                                          (bench/make_device_data.sh)
# training    bench/gpu_training.sh  several networks per process (group modes x precision  ~5       -
#                                    x memory format x TF32), ConvNet-3 and ConvNetD4;
#                                    ResNet-18, VGG-11, AlexNet at 64 px; evaluation
#                                    groups; CUDA tests of training, augmentation, inputs
# baseline    bench/gpu_baseline.sh  the first GPU figures (training loop vs DataLoader;    ~8-9     a prepared CIFAR-10 train.h5
#                                    distillation memory per engine at ImageNet-1K scale)              as $CIFAR_TRAIN
#
# Nothing is downloaded: the package runs from the tree (PYTHONPATH), with
# torch, torchvision, numpy, pillow, h5py, pandas, pyyaml, tqdm importable by python3 ($PYTHON).
# bench/project_cost.py turns the engine and training parts' tables into the rates file of the
# cost projection (docs/benchmarks.md).
set -u
here=$(cd "$(dirname "$0")" && pwd)
part=${1:-}
[ $# -gt 0 ] && shift
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_benchmarks.sh: --out needs a folder" >&2; exit 2; }; export OUT=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
export OUT=${OUT:-bench_out}
case "$part" in
  reproduce) exec bash "$here/gpu_reproduce.sh" "${rest[@]}" ;;
  engine) exec bash "$here/gpu_engine.sh" "${rest[@]}" ;;
  training)
    # gpu_training.sh names its toy switch TESLA_BENCH_TOY
    if [ "${TOY:-0}" = 1 ]; then export TESLA_BENCH_TOY=1; fi
    exec bash "$here/gpu_training.sh" "${rest[@]}" ;;
  baseline)
    if [ "${TOY:-0}" = 1 ]; then echo "gpu_benchmarks.sh: the baseline part has no toy size" >&2; exit 2; fi
    exec bash "$here/gpu_baseline.sh" "${rest[@]}" ;;
  *)
    echo "usage: bash bench/gpu_benchmarks.sh {reproduce|engine|training|baseline} --out DIR   (header: what each measures)" >&2
    exit 2 ;;
esac
