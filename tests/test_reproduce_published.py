"""bench/reproduce_published.py (the driver of bench/gpu_reproduce.sh): the rows it reads from
config/config.yaml and its stage runner's time cap. The whole script runs at toy size with
`TOY=1 bash bench/gpu_reproduce.sh` (minutes; docs/benchmarks.md), not here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce_published", ROOT / "bench" / "reproduce_published.py")
rp = sys.modules["reproduce_published"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rp)


def test_cifar10_rows_are_the_published_ones_with_their_input_spaces():
    entry, rows = rp.config_rows(ROOT / "config" / "config.yaml", "cifar10", [1, 10], None, None)
    one, ten = rows
    assert (one.space, one.engines, one.eval_runs, one.zca) == ("cifar10", ["exact", "tesla"], 3, False)
    assert (one.settings["syn_steps"], one.settings["lr_img"], one.settings["lr_img_convention"]) == (50, 1000, "tesla-published")
    assert (ten.space, ten.engines, ten.eval_runs, ten.zca) == ("none+zca-eps0.1", ["exact"], 5, True)
    assert (ten.settings["syn_steps"], ten.settings["max_start_epoch"], ten.settings["lr_teacher"]) == (30, 20, 0.001)
    assert entry["evaluate"]["epochs"] == 1001 and entry["evaluate"]["lr_decay_epoch"] == 502
    _, toy = rp.config_rows(ROOT / "config" / "config.yaml", "cifar10", [10], 2, 4)
    assert (toy[0].settings["max_start_epoch"], toy[0].settings["syn_steps"]) == (2, 4)


def test_a_stage_kills_what_outlives_its_cap_and_keeps_what_finished(tmp_path):
    quick = rp.Job("quick", ["print('done')"], tmp_path / "quick.log", program=(sys.executable, "-c"))
    slow = rp.Job("slow", ["import time; time.sleep(60)"], tmp_path / "slow.log", program=(sys.executable, "-c"))
    fails = rp.Job("fails", ["raise SystemExit(3)"], tmp_path / "fails.log", program=(sys.executable, "-c"))
    seconds: dict[str, float] = {}
    rp.run_stage("test", [quick, slow, fails], cap_s=3, max_parallel=3, stage_seconds=seconds)
    assert quick.status == "ok" and "done" in quick.log.read_text()
    assert fails.status == "exit status 3"
    assert slow.status.startswith("killed at the test cap") and slow.proc.returncode is not None
