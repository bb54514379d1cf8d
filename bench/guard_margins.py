"""How far the divergence guard's limits are from what the demo config's distillations reach,
and where the guard stops runs that diverge (PAPER.md section 9: exploding learning rate,
NaN losses).

Everything runs through the ``tesla`` command line with the settings of
``config/config.yaml`` (dataset ``demo``): prepare, the experts, then, for every configured
IPC, the distillation as configured (with ``--variants``, also with lr_img or lr_lr ten
times larger); then three settings that diverge (``--lr-lr 1e6``, ``--lr-teacher 100``,
``--lr-img 1e9``) at the first IPC. From each run's metrics CSV it reports the peaks of the guarded quantities
against their limits: the matching loss (limit ``max_loss``), alpha / lr_teacher (limit
``max_lr`` = 100 x lr_teacher) and the largest image RMS over its initial value (limit
``max_image_growth``), and for the stopped runs the iteration and the check that stopped them.

    python bench/guard_margins.py --work /tmp/guard-margins [--variants]

Prints a markdown table (``--out FILE`` also writes it to a file). The work folder is reused:
data and experts are made once, and a finished distillation of the same command is not rerun
(its seconds column then shows 0).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tesla.distill import DistillSettings, build_setup, fresh_state  # noqa: E402


def tesla(*args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tesla", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check and done.returncode != 0:
        sys.exit(f"tesla {args[0]} failed:\n{done.stderr[-3000:]}")
    return done


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for data, experts and runs (reused)")
    p.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    p.add_argument("--dataset", default="demo")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--variants", action="store_true", help="also run every IPC with lr_img x 10 and with lr_lr x 10")
    a = p.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    ds, seed = cfg["datasets"][a.dataset], int(cfg.get("seed", 0))
    ex = ds["experts"]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = work / "train.h5", work / "test.h5"
    if not train.exists():
        tesla("prepare", ds["source"], "--out-dir", work, "--quiet")
    experts = []
    for k in range(ex["count"]):
        path = work / f"expert_{k}.h5"
        if not path.exists():
            keep = ["--keep-snapshots", ex["keep_snapshots"]] if ex.get("keep_snapshots") is not None else []
            tesla("experts", "--train", train, "--test", test, "--out", path, "--seed", seed + k, "--model", ds["model"],
                  "--epochs", ex["epochs"], "--lr", ex["lr"], "--batch-size", ex["batch_size"], "--dsa", ex["dsa"],
                  "--device", "cpu", *keep)
        experts.append(path)

    def distill(ipc: int, d: dict, name: str, **change) -> dict:
        s = {**d, **change}
        out = work / f"{name}.h5"
        metrics, record = work / f"{name}.csv", work / f"{name}.cmd"
        opts = dict(ipc=ipc, syn_steps=s["syn_steps"], expert_epochs=s["expert_epochs"], max_start_epoch=s["max_start_epoch"],
                    lr_img=s["lr_img"], lr_lr=s["lr_lr"], lr_teacher=s["lr_teacher"], iterations=s["iterations"],
                    engine=s["engine"], seed=seed, checkpoint_every=s["checkpoint_every"])
        if s.get("batch_syn"):
            opts["batch_syn"] = s["batch_syn"]
        args = ["distill", "--train", train, "--experts", *experts, "--out", out, "--metrics", metrics, "--device", "cpu",
                "--no-progress", *(x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v))]
        command = " ".join(map(str, args))
        t0 = time.perf_counter()
        if out.exists() and metrics.exists() and record.exists() and record.read_text() == command:
            returncode, stderr = 0, ""  # a finished run of the same command: reused
        else:
            for stale in (out, Path(f"{out}.ckpt"), metrics, Path(f"{metrics}.partial"), record):
                stale.unlink(missing_ok=True)
            done = tesla(*args, check=False)
            returncode, stderr = done.returncode, done.stderr
            (work / f"{name}.err").write_text(stderr)  # the run's messages, in full
            if returncode == 0:
                record.write_text(command)
        secs = time.perf_counter() - t0
        rows = read_metrics(metrics if metrics.exists() else Path(f"{metrics}.partial"))
        settings = DistillSettings(train=str(train), experts=[str(e) for e in experts], out=str(out), device="cpu", **opts)
        rho0 = fresh_state(build_setup(settings)).start.largest_image_rms
        stop = ""
        if returncode != 0:
            err = stderr.strip().splitlines()[-1]
            stop = err.split("error: ", 1)[-1].split(". Most likely cause")[0]
            cause = err.split("Most likely cause: ", 1)[-1].split(" is too large")[0] if "Most likely cause" in err else "?"
            stop = f"{stop[:110]}{'...' if len(stop) > 110 else ''}; cause named: {cause}"
        return dict(
            name=name, ipc=ipc, rows=len(rows), secs=secs, stop=stop, lr_teacher=s["lr_teacher"],
            loss=max((float(r["loss"]) for r in rows), default=float("nan")),
            alpha=max((float(r["alpha"]) for r in rows), default=float("nan")) / s["lr_teacher"],
            growth=max((float(r["max_image_rms"]) for r in rows), default=float("nan")) / rho0,
            what=", ".join(f"{k} {v:g}" for k, v in change.items()) or "as configured",
        )

    results = []
    ipcs = sorted(ds["distill"], key=int)
    for ipc in ipcs:
        d = ds["distill"][ipc]
        results.append(distill(int(ipc), d, f"ipc{ipc}"))
        if a.variants:
            results.append(distill(int(ipc), d, f"ipc{ipc}_lrimg10", lr_img=10 * d["lr_img"]))
            results.append(distill(int(ipc), d, f"ipc{ipc}_lrlr10", lr_lr=10 * d["lr_lr"]))
    d = ds["distill"][ipcs[0]]
    results.append(distill(int(ipcs[0]), d, "issue_lr_lr", lr_lr=1e6))
    results.append(distill(int(ipcs[0]), d, "issue_lr_teacher", lr_teacher=100.0))
    results.append(distill(int(ipcs[0]), d, "issue_lr_img", lr_img=1e9))

    lines = [
        f"config {a.config}, dataset {a.dataset}: {ex['count']} {ds['model']} experts x {ex['epochs']} epochs; "
        "limits: loss <= 10, alpha <= 100 x lr_teacher, largest image RMS <= 100 x its initial value",
        "",
        "| IPC | settings | iterations run | peak loss | peak alpha / lr_teacher | peak largest image RMS / its initial value | stopped by the guard | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['ipc']} | {r['what']} | {r['rows']} | {r['loss']:.3g} | {r['alpha']:.3g} | {r['growth']:.3g} | "
            f"{r['stop'] or 'no'} | {r['secs']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
