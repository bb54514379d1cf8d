#!/usr/bin/env bash
# Build the CIFAR-10 data that travels to the lent GPU machine (bench/gpu_reproduce.sh reads it).
#
#   TESLA_DATASETS=../shared/datasets bash bench/make_device_data.sh      # on the development machine
#
# The shared cifar10-jpg.tar (88 MiB) is larger than the 64 MiB working tree that travels, so this
# writes a class-balanced subset: the first TRAIN_PER_CLASS train and TEST_PER_CLASS test JPEGs of
# every class in file-name order (default 1000 and 1000: 10,000 train images, i.e. 20% of the
# training split, and the whole 10,000-image test split), as a gzip-compressed tar in the layout
# `tesla prepare folder` reads (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg). Gzip removes the
# tar's 512-byte headers and padding (a 920-byte JPEG takes 1,536 bytes in a tar): 6.2 MiB at the
# defaults (measured; the whole 60,000-image tar would be about 3x that and would travel too, but
# 50,000 training images cost 5x the expert time of 10,000 on the GPU). The GPU script unpacks it with `gzip -dc` before `tesla prepare`.
# Output: .device/cifar10-subset.tar.gz (.device/ is git-ignored; name it in the run's `carry`).
# TOY=1 writes .device/cifar10-toy.tar.gz instead (20 train, 20 test per class), for
# `TOY=1 bash bench/gpu_reproduce.sh` on the CPU.
set -euo pipefail
src=${TESLA_DATASETS:?set TESLA_DATASETS to the folder holding cifar10-jpg.tar}/cifar10-jpg.tar
[ -f "$src" ] || { echo "make_device_data.sh: $src not found (TESLA_DATASETS=$TESLA_DATASETS)" >&2; exit 1; }
if [ "${TOY:-0}" = 1 ]; then
  TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-20}; TEST_PER_CLASS=${TEST_PER_CLASS:-20}; name=cifar10-toy
else
  TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-1000}; TEST_PER_CLASS=${TEST_PER_CLASS:-1000}; name=cifar10-subset
fi
mkdir -p .device
out=.device/$name.tar.gz
python3 - "$src" "$out" "$TRAIN_PER_CLASS" "$TEST_PER_CLASS" <<'PY'
import collections, gzip, io, os, sys, tarfile
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
