"""bench/reproduce_published.py (the driver of bench/gpu_reproduce.sh): the rows it reads from
config/config.yaml, its stage runner's time cap, and a run over two commands at micro size (a
distillation stopped by its time cap in the first, resumed, stopped again and written from its
checkpoint in the second, then evaluated: about a minute on 2 cores). The GPU script itself runs
at toy size with `TOY=1 bash bench/gpu_reproduce.sh` (minutes; docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tesla.distill_settings import DistillRow
from tesla.settings import declared

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
    assert (one.settings["iterations"], ten.settings["iterations"]) == (10000, 5000)  # TESLA's and MTT's defaults
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


def _class_folder_tar(path: Path, classes: int = 10, per_split: int = 4) -> Path:
    """A CIFAR-shaped class-folder tar of random 32 x 32 JPEGs (train/<class>/, test/<class>/)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for split in ("train", "test"):
            for c in range(classes):
                for i in range(per_split):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/class{c}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


@pytest.mark.slow
def test_a_run_spans_two_commands_and_reports_the_iterations_and_seconds_of_both(tmp_path):
    data, work = _class_folder_tar(tmp_path / "tiny.tar"), tmp_path / "work"
    common = ["--data", str(data), "--work", str(work), "--ipc", "1", "--engines", "exact", "--device", "cpu",
              "--experts", "1", "--iterations", "100000", "--max-start-epoch", "1", "--syn-steps", "2", "--eval-epochs", "2",
              "--eval-runs", "1", "--model", "convnet_d1", "--cross-archs", "--checkpoint-every", "1", "--max-loss", "1e9",
              "--jobs", "2", "--budget", "900", "--validation-per-class", "1", "--keep-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def command(out: str, *extra: str) -> str:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce_published.py"), *common, "--out", str(tmp_path / out), *extra],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return (tmp_path / out / "reproduce.md").read_text()

    first = command("out1", "--until", "distill", "--distill-cap", "15")
    assert "distill ipc1 exact: killed at the distill cap" in first  # 100,000 iterations cannot fit: stopped, not failed
    assert "of 100,000 (published 10,000, distilling)" in first and "not run" in first
    assert not (work / "ipc1" / "exact" / "synthetic.h5").exists()
    second = command("out2", "--distill-cap", "5")
    assert "finalise ipc1 exact: ok" in second and (work / "ipc1" / "exact" / "synthetic.h5").exists()
    reached = rp.iterations_reached(work / "ipc1" / "exact" / "synthetic.h5")
    assert reached >= 1 and f"| {reached:,} of 100,000 (published 10,000, BELOW the 1,000 minimum) |" in second
    assert "over 2 command(s)" in second and "experts " in second and "distill " in second
    distill_seconds = second.split("distill ")[1].split(",")[0]
    assert distill_seconds.count("+") == 1  # one value per command
    assert "| 1 | exact | cifar10 |" in second and "48.5 +- 0.8" in second and "the FINAL ones" in second
    row = [line for line in second.splitlines() if line.startswith("| 1 | exact")][0]
    assert row.split("|")[5].strip().endswith("(1)")  # our accuracy, 1 run
    # the three numbers: final (above), best by validation and best by test among the kept sets
    kept = len(list((work / "ipc1" / "exact" / "synthetic.kept").glob("iteration_*.h5")))
    assert kept == reached // 3 + (reached % 3 > 0)
    by_val, by_test = row.split("|")[6].strip(), row.split("|")[7].strip()
    assert by_val.endswith(f" of {kept} kept)") and by_test.endswith(f" of {kept} kept)"), row
    assert "best by test (published protocol: selected on the test set)" in second
    assert (work / "data" / "val.h5").exists()
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["acc_ipc1.csv", "logs.tar.gz", "reproduce.md"]


def test_an_entry_that_leaves_expert_and_evaluation_keys_unset_gets_the_commands_defaults(tmp_path):
    """The mnist entry sets no experts.lr, experts.batch_size or evaluate.lr_decay_epoch (the
    workflow's defaults apply): the driver builds its expert and evaluation commands all the same,
    leaving those options to the commands' own defaults, which are the workflow's."""
    from tesla.cli import build_parser

    a = rp.parse(["--data", str(tmp_path / "mnist.tar"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                  "--dataset", "mnist", "--channels", "1", "--ipc", "1", "10"])
    run = rp.Run(a)
    space = next(iter(run.spaces))
    experts = build_parser(only="experts").parse_args(run.expert_args(space, 0, tmp_path / "expert_0.h5"))
    assert (experts.epochs, experts.lr, experts.batch_size, experts.keep_snapshots) == (20, 0.01, 256, 12)
    job = run.eval_job(run.rows[0], "exact", "convnet", ["--synthetic", str(tmp_path / "s.h5")])
    evaluate = build_parser(only="evaluate").parse_args(job.args)
    assert (evaluate.epochs, evaluate.lr_decay_epoch) == (1000, None)  # tesla evaluate: epochs // 2
    toy = rp.Run(rp.parse([*map(str, ["--data", tmp_path / "m.tar", "--work", tmp_path / "w2", "--out", tmp_path / "o2"]),
                           "--dataset", "mnist", "--ipc", "1", "--eval-epochs", "4"]))
    toy_job = toy.eval_job(toy.rows[0], "exact", "convnet", ["--synthetic", str(tmp_path / "s.h5")])
    toy_eval = build_parser(only="evaluate").parse_args(toy_job.args)
    assert (toy_eval.epochs, toy_eval.lr_decay_epoch) == (4, None)


def test_the_experts_and_evaluation_commands_carry_every_setting_of_the_entry(tmp_path):
    """Keys of the experts and evaluate blocks beyond the schedule (here the experts' augmentation
    and storage type, the evaluation's batch size) reach the commands, as the workflow writes them, and
    so does the config's seed."""
    import yaml
    from tesla.cli import build_parser

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["datasets"]["mnist"]["experts"].update(dsa="none", dtype="float16")
    config["datasets"]["mnist"]["evaluate"]["batch_size"] = 128
    config["seed"] = 7
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = rp.Run(rp.parse(["--data", str(tmp_path / "mnist.tar"), "--work", str(tmp_path / "work"), "--out",
                           str(tmp_path / "out"), "--dataset", "mnist", "--ipc", "1", "--config", str(tmp_path / "config.yaml")]))
    experts = build_parser(only="experts").parse_args(run.expert_args(next(iter(run.spaces)), 0, tmp_path / "e.h5"))
    assert (experts.dsa, experts.dtype, experts.seed) == ("none", "float16", [7])  # the config's seed + k
    job = run.eval_job(run.rows[0], "exact", "convnet", ["--synthetic", str(tmp_path / "s.h5")])
    evaluate = build_parser(only="evaluate").parse_args(job.args)
    assert (evaluate.batch_size, evaluate.seed) == (128, 7)


#: a row's keys that are not settings of `tesla distill` (tesla.distill_settings.DistillRow, and the
#: script's own iterations_max): read by the other stages of the run
NOT_DISTILL_KEYS = {d.config_key for d in declared(DistillRow)} | {"iterations_max"}


def _reached(tmp_path, config: Path, dataset: str, ipcs: list[int]) -> int:
    """Check that every key of every row reaches its distillation's command; the keys checked."""
    from tesla.cli import build_parser
    from tesla.distill import settings_from_args
    from tesla.distill_settings import DistillSettings
    from tesla.settings import declared

    a = rp.parse(["--data", str(tmp_path / "data.tar"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                  "--config", str(config), "--dataset", dataset, "--ipc", *map(str, ipcs)])
    run = rp.Run(a)
    keys = {d.config_key: d for d in declared(DistillSettings) if d.config_key}
    checked = 0
    for row in run.rows:
        for engine in row.engines:
            args = run.distill_args(row, engine, 7)
            s = settings_from_args(build_parser(only="distill").parse_args(args))
            assert (s.ipc, s.engine, s.iterations, s.zca is not None) == (row.ipc, engine, 7, row.zca)
            for key, value in row.settings.items():
                if key in ("engine", "iterations"):
                    continue  # one engine per command; this run's iterations (above)
                assert key in keys or key in NOT_DISTILL_KEYS, f"{dataset}.distill.{row.ipc}.{key} reaches no command"
                if key in keys:
                    d = keys[key]
                    if d.setting.skip is not None and d.setting.skip(row.settings):
                        continue  # a setting this row does not use (the labels' or the init snapshot's)
                    expected = d.setting.from_config(value) if d.setting.from_config else value
                    if key == "checkpoint_every":
                        expected = a.checkpoint_every  # this run's interval
                    assert getattr(s, d.name) == expected, f"{dataset}.distill.{row.ipc}.{key}"
                    checked += 1
    return checked


@pytest.mark.parametrize("dataset, ipcs", [("cifar10", [1, 10, 50]), ("cifar100", [1, 10, 50]), ("in1k", [1, 2, 10, 50])])
def test_every_key_of_a_published_row_reaches_the_distill_command(tmp_path, dataset, ipcs):
    assert _reached(tmp_path, ROOT / "config" / "config.yaml", dataset, ipcs) > 0


def test_every_distill_setting_of_a_row_reaches_the_distill_command(tmp_path):
    """Rows that set what the published rows leave at their defaults: learned and TESLA labels
    (true/false too), the moving window, real-correct images, dsa, batch_syn, the guard."""
    import json

    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    rows = json.loads((ROOT / "tests" / "distill_params.json").read_text())["hand_made"]["distill"]
    entry = config["datasets"]["cifar10"]
    entry["distill"] = {int(ipc): {**entry["distill"][1], **row} for ipc, row in rows.items()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert _reached(tmp_path, tmp_path / "config.yaml", "cifar10", sorted(entry["distill"])) > 100
