"""Throughput of `tesla prepare` on real ImageNet JPEGs, side by side in one run.

Builds, in a temporary folder, an uncompressed tar in the ImageNet layout from the shared
sample (``$TESLA_DATASETS/imagenet-sample``): ``train/<wnid>/`` with every sample image
``--copies`` times (distinct member names, same bytes) and ``test/<wnid>/`` with it once.
Then measures images/s for

1. **read**: reading the same member bytes from the tar (positional reads, page cache warm);
2. **naive**: a one-image-at-a-time loop: read member, full decode, convert to RGB, box
   resize to S x S (no pool, no reduced-size decoding);
3. **prepare, W workers**: the whole ``prepare_dataset`` pipeline (listing the tar,
   decoding in a pool with reduced-size decoding, HDF5 writing, statistics) for each W in
   ``--workers``, also with ``--full-decode`` at the largest W.

Each measurement is repeated ``--repeats`` times; the median is reported.

    TESLA_DATASETS=/work/shared/datasets .venv/bin/python bench/bench_prepare.py --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tesla.data.imaging import read_bytes  # noqa: E402
from tesla.data.sources import SourceOptions, plan_source  # noqa: E402
from tesla.data.sources.tree import list_container  # noqa: E402
from tesla.prepare import prepare_dataset  # noqa: E402


def build_tar(sample: Path, tar_path: Path, copies: int) -> int:
    n = 0
    with tarfile.open(tar_path, "w") as tar:
        for cls in sorted(p for p in sample.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                for k in range(copies):
                    tar.add(f, arcname=f"train/{cls.name}/{f.stem}_{k}{f.suffix}")
                    n += 1
                tar.add(f, arcname=f"test/{cls.name}/{f.name}")
                n += 1
    return n


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def median_time(fn, repeats: int) -> tuple[float, float, float]:
    """Median wall seconds, CPU seconds (all processes) and CPU seconds of this (the main) process."""
    walls, cpus, mains = [], [], []
    for _ in range(repeats):
        c0, m0, t0 = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
        mains.append(own_cpu_seconds() - m0)
    return statistics.median(walls), statistics.median(cpus), statistics.median(mains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=None, help="imagenet-sample/train folder (default: $TESLA_DATASETS/imagenet-sample/train)")
    parser.add_argument("--copies", type=int, default=2, help="train copies of each sample image in the tar")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sample = args.sample or Path(os.environ.get("TESLA_DATASETS", "../shared/datasets")) / "imagenet-sample" / "train"
    if not sample.is_dir():
        sys.exit(f"{sample}: not found; set TESLA_DATASETS or pass --sample")
    size = args.resolution
    load0 = os.getloadavg()
    results: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "resolution": size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tar_path = tmp / "imagenet_sample.tar"
        n = build_tar(sample, tar_path, args.copies)
        refs = [e.ref for e in list_container(tar_path, "--input") if e.ref is not None]
        nbytes = sum(r.size for r in refs)
        results.update(images=n, megabytes=nbytes / 1e6, tar_megabytes=tar_path.stat().st_size / 1e6)

        def read_all():
            total = 0
            for r in refs:
                total += len(read_bytes(r))
            assert total == nbytes

        read_all()  # warm the page cache: every measurement below reads from memory
        t_read, c_read, m_read = median_time(read_all, args.repeats)

        def naive():
            with open(tar_path, "rb") as f:
                for r in refs:
                    f.seek(r.offset)
                    img = Image.open(io.BytesIO(f.read(r.size))).convert("RGB")
                    np.asarray(img.resize((size, size), Image.Resampling.BOX))

        t_naive, c_naive, m_naive = median_time(naive, args.repeats)
        rows = [
            ("read the bytes from the tar", 1, t_read, c_read, m_read),
            ("naive loop: full decode + RGB + box resize", 1, t_naive, c_naive, m_naive),
        ]

        def pipeline(workers: int, full: bool):
            def go():
                plan = plan_source("imagenet", SourceOptions(input=tar_path))
                prepare_dataset(plan, tmp / "out", resolution=size, workers=workers, reduced=not full, progress=False)

            return go

        for w in args.workers:
            rows.append((f"tesla prepare, {w} worker(s)", w, *median_time(pipeline(w, False), args.repeats)))
        w = max(args.workers)
        rows.append((f"tesla prepare --full-decode, {w} worker(s)", w, *median_time(pipeline(w, True), args.repeats)))

    print(f"{n} images ({nbytes / 1e6:.1f} MB of JPEG) -> {size}x{size}; median of {args.repeats} runs; {os.cpu_count()} CPUs visible")
    print(f"load average before: {load0}, after: {os.getloadavg()}")
    print("| what | processes | wall s | images/s | vs naive (wall) | CPU s, all | images per CPU-second | main-process CPU ms/image |")
    print("|---|---|---|---|---|---|---|---|")
    results["rows"] = []
    for name, procs, t, c, m in rows:
        rate = n / t
        print(f"| {name} | {procs} | {t:.3f} | {rate:.0f} | {t_naive / t:.2f}x | {c:.3f} | {n / c:.0f} | {1000 * m / n:.3f} |")
        results["rows"].append(
            dict(what=name, processes=procs, seconds=t, cpu_seconds=c, main_cpu_seconds=m, images_per_s=rate, images_per_cpu_s=n / c)
        )
    print(f"bare read rate: {nbytes / t_read / 1e9:.2f} GB/s (page cache)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
