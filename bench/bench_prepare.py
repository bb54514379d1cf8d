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
   ``--workers``, also with ``--full-decode`` at the largest W;
4. the same for a **parquet** file holding the same images (struct image column with
   ``bytes`` and ``path``, Hugging Face layout, ``--row-group`` rows per row group, one
   train and one validation file): reading the image column's bytes, and ``prepare`` on
   W workers (images are put in class order through the temporary class-sorting file).

Each measurement is repeated ``--repeats`` times; the median is reported. The table gives,
per row, the wall time, images/s, the CPU time of all processes, the main process's CPU per
image (what caps the pipeline at many workers: it lists the tar, hands out the tasks, writes
the HDF5 file and hashes the pixels) and, for the prepare rows, the speed-up over the same
pipeline on 1 worker (when 1 is among ``--workers``), e.g. ``--workers 1 2 4 8 16``.

``--cold`` drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every
run of every measurement, so "read the bytes from the tar" is the disk's read rate and the
prepare rows include reading the tar from disk (Linux as root only; otherwise the script
stops with a message). Without it the tar is read once first and every run reads from
memory. ``--no-parquet`` leaves out the parquet rows (building the parquet copy takes time).
``--copies`` makes the tar bigger (runs of seconds, not milliseconds, on many cores).

``--downsampled-rows R --downsampled-batches B`` instead measures the peak resident memory
of ``tesla prepare imagenet-downsampled`` (a child process, ``ru_maxrss`` from ``wait4``) on
B synthetic 64 x 64 pickle batches of R rows each (random pixels, labels 1..1000), plus a
``val_data`` of R/4 rows: the full train split is 10 batches of ~128,000 rows.

    TESLA_DATASETS=/work/shared/datasets .venv/bin/python bench/bench_prepare.py --workers 1 2
    python3 bench/bench_prepare.py --sample DIR --workers 1 2 4 8 16 --copies 20 --no-parquet --cold --json out.json
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
    """Every copy is written as a regular member with its own bytes (``tar.add`` would write a
    hard-link entry, without data, for a source file that has several links)."""
    n = 0
    with tarfile.open(tar_path, "w") as tar:
        for cls in sorted(p for p in sample.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                data = f.read_bytes()
                names = [f"train/{cls.name}/{f.stem}_{k}{f.suffix}" for k in range(copies)] + [f"test/{cls.name}/{f.name}"]
                for name in names:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), int(f.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                    n += 1
    return n


def build_parquet(refs, tar_path: Path, folder: Path, row_group: int) -> None:
    """train-00000-of-00001.parquet and validation-00000-of-00001.parquet with the tar's images
    (struct image column {bytes, path}, int64 label = sorted-wnid index, class names in the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    wnids = sorted({Path(r.name).parent.name for r in refs})
    index = {w: i for i, w in enumerate(wnids)}
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": wnids, "_type": "ClassLabel"}}}}
    rng = np.random.default_rng(0)
    with open(tar_path, "rb") as f:
        for split, stem in (("train", "train"), ("test", "validation")):
            chosen = [r for r in refs if f"/{split}/" in r.name]
            chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # classes mixed, as on the hub
            images, labels = [], []
            for r in chosen:
                f.seek(r.offset)
                images.append({"bytes": f.read(r.size), "path": Path(r.name).name})
                labels.append(index[Path(r.name).parent.name])
            table = pa.table({"image": pa.array(images), "label": pa.array(labels, pa.int64())})
            table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
            pq.write_table(table, folder / f"{stem}-00000-of-00001.parquet", row_group_size=row_group)


def downsampled_rss(rows: int, batches: int, side: int = 64) -> None:
    import pickle
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for b in range(1, batches + 2):
            n = rows if b <= batches else rows // 4
            labels = rng.integers(1, 1001, n)
            labels[: min(n, 1000)] = np.arange(1, min(n, 1000) + 1)
            data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
            name = f"train_data_batch_{b}" if b <= batches else "val_data"
            with open(tmp / name, "wb") as f:
                pickle.dump({"data": data, "labels": labels.tolist(), "mean": data[:1000].mean(0)}, f, protocol=4)
            del data
        batch_mb = (tmp / "train_data_batch_1").stat().st_size / 1e6
        cmd = [sys.executable, "-m", "tesla.cli", "prepare", "imagenet-downsampled", "--input", str(tmp), "--out-dir",
               str(tmp / "out"), "--workers", "1", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            sys.exit(f"prepare failed with status {status}")
        print(f"imagenet-downsampled: {batches} x {rows} rows at {side}x{side} ({batch_mb:.0f} MB per batch pickle) + val {rows // 4}: "
              f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB, wall {wall:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s")


def stop_fork_server() -> None:
    """End Python's fork server, which started the pool's workers and reaped them: its CPU time
    and theirs then count among this process's reaped children (:func:`cpu_seconds`), and the
    next run starts a server of its own, as every `tesla prepare` command does. (``_stop`` is
    the standard library's own, private, way to end it.)"""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers and
    the fork server that started them, once :func:`stop_fork_server` has ended it)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def check_can_drop_caches() -> None:
    """Exit with a message unless the page cache can be dropped (Linux, as root)."""
    if not sys.platform.startswith("linux") or not DROP_CACHES.exists():
        sys.exit("--cold: dropping the page cache needs Linux (/proc/sys/vm/drop_caches); run without --cold")
    if os.geteuid() != 0:
        sys.exit("--cold: dropping the page cache needs root (echo 3 > /proc/sys/vm/drop_caches); run as root or without --cold")
    drop_caches()


def drop_caches() -> None:
    """sync; echo 3 > /proc/sys/vm/drop_caches (file pages, dentries and inodes leave memory)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        sys.exit(f"--cold: cannot write {DROP_CACHES} ({exc}); in a container it may be read-only: run without --cold")


def median_time(fn, repeats: int, before=None) -> tuple[float, float, float]:
    """Median wall seconds, CPU seconds (all processes) and CPU seconds of this (the main) process;
    ``before()`` (e.g. dropping the page cache) runs before every run, outside the timing."""
    walls, cpus, mains = [], [], []
    for _ in range(repeats):
        if before is not None:
            before()
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
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to measure, e.g. 1 2 4 8 16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-group", type=int, default=64, help="rows per parquet row group")
    parser.add_argument("--downsampled-rows", type=int, help="measure the peak memory of imagenet-downsampled instead (rows per batch)")
    parser.add_argument("--downsampled-batches", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (Linux, root): disk read rates")
    parser.add_argument("--no-parquet", action="store_true", help="leave out the parquet rows")
    args = parser.parse_args()
    if any(w < 1 for w in args.workers):
        sys.exit("--workers: give pool sizes of at least 1, e.g. 1 2 4 8 16")
    if args.cold:
        check_can_drop_caches()
    before = drop_caches if args.cold else None
    if args.downsampled_rows:
        downsampled_rss(args.downsampled_rows, args.downsampled_batches)
        return
    sample = args.sample or Path(os.environ.get("TESLA_DATASETS", "../shared/datasets")) / "imagenet-sample" / "train"
    if not sample.is_dir():
        sys.exit(f"{sample}: not found; set TESLA_DATASETS or pass --sample")
    size = args.resolution
    load0 = os.getloadavg()
    results: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "resolution": size, "cold": args.cold,
                     "numpy": np.__version__, "copies": args.copies, "repeats": args.repeats}
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

        if not args.cold:
            read_all()  # warm the page cache: every measurement below reads from memory
        t_read, c_read, m_read = median_time(read_all, args.repeats, before)

        def naive():
            with open(tar_path, "rb") as f:
                for r in refs:
                    f.seek(r.offset)
                    img = Image.open(io.BytesIO(f.read(r.size))).convert("RGB")
                    np.asarray(img.resize((size, size), Image.Resampling.BOX))

        t_naive, c_naive, m_naive = median_time(naive, args.repeats, before)
        # (what, processes, wall s, CPU s, main CPU s, group and workers of a prepare row)
        rows = [
            ("read the bytes from the tar", 1, t_read, c_read, m_read, None),
            ("naive loop: full decode + RGB + box resize", 1, t_naive, c_naive, m_naive, None),
        ]

        def pipeline(workers: int, full: bool):
            def go():
                plan = plan_source("imagenet", SourceOptions(input=tar_path))
                prepare_dataset(plan, tmp / "out", resolution=size, workers=workers, reduced=not full, progress=False)
                stop_fork_server()

            return go

        for w in args.workers:
            rows.append((f"tar: tesla prepare, {w} worker(s)", w, *median_time(pipeline(w, False), args.repeats, before), ("tar", w)))
        w = max(args.workers)
        rows.append((f"tar: tesla prepare --full-decode, {w} worker(s)", w, *median_time(pipeline(w, True), args.repeats, before), None))

        if not args.no_parquet:
            rows += parquet_rows(refs, tar_path, tmp, args, nbytes, size, before)

    print(f"{n} images ({nbytes / 1e6:.1f} MB of JPEG) -> {size}x{size}; median of {args.repeats} runs; {os.cpu_count()} CPUs visible; "
          + ("page cache dropped before every run" if args.cold else "page cache warm"))
    print(f"load average before: {load0}, after: {os.getloadavg()}")
    print("| what | processes | wall s | images/s | vs naive (wall) | speed-up vs 1 worker | CPU s, all | images per CPU-second | main-process CPU ms/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    one_worker = {row[5][0]: row[2] for row in rows if row[5] is not None and row[5][1] == 1}
    results["rows"] = []
    for name, procs, t, c, m, group in rows:
        rate = n / t
        speedup = one_worker[group[0]] / t if group is not None and group[0] in one_worker else None
        shown = f"{speedup:.2f}x" if speedup is not None else ""
        print(f"| {name} | {procs} | {t:.3f} | {rate:.0f} | {t_naive / t:.2f}x | {shown} | {c:.3f} | {n / c:.0f} | {1000 * m / n:.3f} |")
        results["rows"].append(
            dict(what=name, processes=procs, seconds=t, cpu_seconds=c, main_cpu_seconds=m, images_per_s=rate, images_per_cpu_s=n / c,
                 main_cpu_ms_per_image=1000 * m / n, speedup_vs_1_worker=speedup)
        )
    print(f"bare read rate: {nbytes / t_read / 1e9:.2f} GB/s ({'disk, page cache dropped' if args.cold else 'page cache'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def parquet_rows(refs, tar_path: Path, tmp: Path, args, nbytes: int, size: int, before) -> list[tuple]:
    """The parquet rows: the same images as parquet shards (train + validation files, Hugging Face layout)."""
    import pyarrow.parquet as pq

    pq_dir = tmp / "parquet"
    build_parquet(refs, tar_path, pq_dir, args.row_group)

    def read_parquet():
        total = 0
        for f in sorted(pq_dir.glob("*.parquet")):
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                col = pf.read_row_group(rg, columns=["image"]).column(0).combine_chunks().field("bytes")
                total += sum(len(b) for b in col.to_pylist())
        assert total == nbytes

    if before is None:
        read_parquet()
    rows = [("parquet: read the image bytes (row group by row group)", 1, *median_time(read_parquet, args.repeats, before), None)]

    def pipeline_parquet(workers: int):
        def go():
            plan = plan_source("parquet", SourceOptions(input=pq_dir))
            prepare_dataset(plan, tmp / "out_pq", resolution=size, workers=workers, progress=False)
            stop_fork_server()

        return go

    for w in args.workers:
        rows.append((f"parquet: tesla prepare, {w} worker(s)", w, *median_time(pipeline_parquet(w), args.repeats, before), ("parquet", w)))
    return rows


if __name__ == "__main__":
    main()
