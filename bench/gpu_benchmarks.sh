#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md: one entry point, one PART per command, each PART at
# most 10 minutes on one H200/H100 (the lent machine's limit for one command).
#
#   bash bench/gpu_benchmarks.sh PART            # on the GPU machine, from the repository root
#   TOY=1 bash bench/gpu_benchmarks.sh PART      # the same steps at toy size on the CPU (checks only)
#
# PART        script                   answers                                        device min  carry
# engine      bench/gpu_engine.sh      the compiled student step (--compile): every    <= 9.5      none
#                                      mode against the engine before it, CIFAR-10
#                                      IPC 10 and ImageNet-1K IPC 10/50; which mode
#                                      `auto` should be; the CUDA tests of matching
# training    bench/gpu_training.sh    several experts/evaluation runs per process      ~4          none
#                                      (group modes x precision x memory format x TF32),
#                                      ConvNet-3 and ConvNetD4; the CUDA training tests
# reproduce   bench/gpu_reproduce.sh   CIFAR-10 IPC 1 and 10 at the published settings  <= 9.5      .device
#                                      (reduced budget), both engines from the same       (bench/make_device_data.sh
#                                      experts, published evaluation, random real          first, here)
# baseline    bench/gpu_baseline.sh    the first GPU figures (training loop vs           ~8-9        a prepared CIFAR-10
#                                      DataLoader; distillation memory per engine at                   train.h5 as
#                                      ImageNet-1K scale)                                              $CIFAR_TRAIN
#
# Add the machine start (a minute or more) to each. Every part writes its tables and logs to
# $OUT (default bench_out/; at most 8 files come back from the lent machine) and prints its
# table last. Where the machine's copy of the tree has no .git, the engine part needs
# bench/matching_before.py first (see bench/gpu_engine.sh). bench/project_cost.py turns the
# engine and training parts' outputs into the rates file of the cost projection (docs/benchmarks.md).
set -u
here=$(cd "$(dirname "$0")" && pwd)
part=${1:-}
[ $# -gt 0 ] && shift
case "$part" in
  engine) exec bash "$here/gpu_engine.sh" "$@" ;;
  training)
    # gpu_training.sh names its toy switch TESLA_BENCH_TOY
    if [ "${TOY:-0}" = 1 ]; then export TESLA_BENCH_TOY=1; fi
    exec bash "$here/gpu_training.sh" "$@" ;;
  reproduce) exec bash "$here/gpu_reproduce.sh" "$@" ;;
  baseline)
    if [ "${TOY:-0}" = 1 ]; then echo "gpu_benchmarks.sh: the baseline part has no toy size" >&2; exit 2; fi
    exec bash "$here/gpu_baseline.sh" "$@" ;;
  *)
    echo "usage: bash bench/gpu_benchmarks.sh {engine|training|reproduce|baseline}   (header: what each measures)" >&2
    exit 2 ;;
esac
