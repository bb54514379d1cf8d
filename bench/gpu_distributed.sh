#!/usr/bin/env bash
# The distillation over 1, 2, 4, 8 GPUs of one machine (NCCL over NVLink), at the in1k_ipc50 row's
# sizes (ConvNetD4, 64 px, 1000 classes, IPC 50, batch_syn 1000, N = 30, exact): seconds per
# iteration at each G (bench/bench_distributed.py, one torchrun launch per G, each its own timeout)
# and the speed-up against G = 1, to set beside `python bench/project_cost.py --gpus 1 2 4 8`.
# Results (Markdown tables, logs) go to $OUT (default: bench_out/).
#
#   bash bench/gpu_distributed.sh             # on the multi-GPU machine, from the repository root
#   TOY=1 bash bench/gpu_distributed.sh       # the same steps at toy size on the CPU (gloo, G = 1, 2)
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ "${TOY:-0}" = 1 ]; then
  sizes=(--device cpu --model convnet --width 8 --resolution 8 --classes 4 --ipc 4 --batch-syn 8 --syn-steps 2 --repeats 1)
  counts=(1 2); limit=300
else
  sizes=(--device cuda --model convnet_d4 --width 128 --resolution 64 --classes 1000 --ipc 50 --batch-syn 1000
         --syn-steps 30 --repeats 3)
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  counts=(); for g in 1 2 4 8; do [ "$g" -le "$gpus" ] && counts+=("$g"); done
  limit=600
fi
{
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  nvidia-smi topo -m 2>/dev/null || true
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
} 2>&1 | tee "$OUT/machine_distributed.txt"

for g in "${counts[@]}"; do
  timeout $limit $py -m torch.distributed.run --standalone --nproc-per-node "$g" bench/bench_distributed.py \
    "${sizes[@]}" --no-single --out "$OUT/distributed_g$g.md" > "$OUT/distributed_g$g.log" 2>&1
  echo "exit status $? (G = $g)"
done

# the speed-up table: seconds per iteration at G against G = 1
$py - "$OUT" "${counts[@]}" <<'PY' | tee "$OUT/distributed_speedup.md"
import re, sys
from pathlib import Path
out, counts = Path(sys.argv[1]), sys.argv[2:]
seconds = {}
for g in counts:
    path = out / f"distributed_g{g}.md"
    m = re.search(r"^\| \d+ \| ([\d.]+) \|", path.read_text(), re.M) if path.exists() else None
    if m:
        seconds[g] = float(m.group(1))
print("| GPUs | s / iteration | speed-up |\n|---|---|---|")
for g, s in seconds.items():
    print(f"| {g} | {s:.3f} | {seconds['1'] / s:.2f} |" if "1" in seconds else f"| {g} | {s:.3f} | - |")
PY
