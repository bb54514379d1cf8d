#!/usr/bin/env bash
# Build what travels to a GPU machine that cannot reach the data or the repository's history, into
# .device/ (git-ignored; copy it along with the tree):
#   .device/cifar10.tar.gz        all 60,000 CIFAR-10 JPEGs of the shared cifar10-jpg.tar (50,000 train,
#                                 10,000 test), gzip-compressed: 18.5 MiB (the tar's 512-byte headers and
#                                 padding are most of its 88 MiB); bench/gpu_reproduce.sh reads it
#   .device/matching_before.py    tesla/matching.py of commit 6cb807c, the engine before the compiled
#                                 step: the "before" column of bench/gpu_engine.sh where the tree has no .git
#
#   TESLA_DATASETS=../shared/datasets bash bench/make_device_data.sh      # from the repository root
#
# The tar keeps the layout `tesla prepare folder` reads (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg).
# TRAIN_PER_CLASS / TEST_PER_CLASS (default: all) keep the first N JPEGs of every class in file-name
# order instead, as .device/cifar10-subset.tar.gz. TOY=1 writes .device/cifar10-toy.tar.gz (20 train,
# 20 test per class) for `TOY=1 bash bench/gpu_reproduce.sh` on the CPU.
set -euo pipefail
src=${TESLA_DATASETS:?set TESLA_DATASETS to the folder holding cifar10-jpg.tar}/cifar10-jpg.tar
[ -f "$src" ] || { echo "make_device_data.sh: $src not found (TESLA_DATASETS=$TESLA_DATASETS)" >&2; exit 1; }
if [ "${TOY:-0}" = 1 ]; then
  TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-20}; TEST_PER_CLASS=${TEST_PER_CLASS:-20}; name=cifar10-toy
elif [ -n "${TRAIN_PER_CLASS:-}${TEST_PER_CLASS:-}" ]; then
  TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-5000}; TEST_PER_CLASS=${TEST_PER_CLASS:-1000}; name=cifar10-subset
else
  TRAIN_PER_CLASS=5000; TEST_PER_CLASS=1000; name=cifar10
fi
mkdir -p .device
if git rev-parse --verify -q 6cb807c^{commit} > /dev/null 2>&1; then
  git show 6cb807c:tesla/matching.py > .device/matching_before.py.tmp && mv .device/matching_before.py.tmp .device/matching_before.py
  echo ".device/matching_before.py: tesla/matching.py of 6cb807c"
else
  echo "make_device_data.sh: no git history here: .device/matching_before.py not written" >&2
fi
out=.device/$name.tar.gz
python3 - "$src" "$out" "$TRAIN_PER_CLASS" "$TEST_PER_CLASS" <<'PY'
import collections, gzip, os, sys, tarfile
src, out, per_split = sys.argv[1], sys.argv[2], {"train": int(sys.argv[3]), "test": int(sys.argv[4])}
with tarfile.open(src) as tar:
    members = [m for m in tar.getmembers() if m.isfile()]
    chosen, counts = [], collections.Counter()
    for m in sorted(members, key=lambda m: m.name):
        split, cls = m.name.split("/")[:2]
        if counts[split, cls] < per_split.get(split, 0):
            counts[split, cls] += 1
            chosen.append(m)
    tmp = out + ".tmp"
    with gzip.open(tmp, "wb", compresslevel=6) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in chosen:
            dst.addfile(m, tar.extractfile(m))
    os.replace(tmp, out)
short = sorted((s, c) for (s, c), n in counts.items() if n < per_split[s])
if short:
    sys.exit(f"make_device_data.sh: classes with fewer images than asked: {short}")
per = collections.Counter(s for s, _ in counts.elements())
print(f"{out}: {per['train']} train + {per['test']} test images, {len({c for _, c in counts})} classes, "
      f"{os.path.getsize(out) / 2**20:.1f} MiB")
PY
