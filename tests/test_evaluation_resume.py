"""`tesla evaluate` resumes: a run killed mid-training (SIGKILL) and run again continues from
its checkpoint and gives, bit for bit, the result of an uninterrupted run; a checkpoint of
other settings or other inputs, or a damaged one, is not resumed (a fresh start, saying why);
two evaluations never share a checkpoint.

Both sides of a bitwise comparison run as subprocesses with OMP_NUM_THREADS=1, or in this
process under the `one_thread` fixture. Time budget: about 30 s on two cores.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_evaluation import tiny, write_split  # noqa: F401 (tiny: a fixture)

import tesla.evaluation
from tesla import cli
from tesla.errors import TeslaError
from tesla.group_checkpoint import CHECKPOINT_FORMAT
from tesla.locks import acquire

pytestmark = pytest.mark.usefixtures("one_thread")

#: 36 images in batches of 4: 9 SGD steps (and DSA draws) per epoch, a decay at epoch 20
EPOCHS = 40


@pytest.fixture(scope="module")
def splits(tiny):
    """test_evaluation's tiny splits (3 classes of 12 training images), and other training images."""
    return {**tiny, "other_train": write_split(tiny["dir"] / "other_train.h5", "train", 12, 7)}


def argv(splits, out: Path, mode: str, *extra: str, train: str = "train", epochs: int = EPOCHS) -> list[str]:
    return ["evaluate", "--random", "--train", str(splits[train]), "--ipc", "12", "--test", str(splits["test"]),
            "--arch", "convnet_d1", "--runs", "2", "--epochs", str(epochs), "--batch-size", "4", "--group-mode", mode,
            "--device", "cpu", "--out", str(out), *extra]


def results(path: Path) -> list[dict]:
    """The per-run rows without their timing (the one column that differs between two runs)."""
    with open(path) as f:
        f.readline()
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def tesla_command() -> str:
    return shutil.which("tesla", path=str(Path(sys.executable).parent))


def one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("mode", ["sequential", "vmap"])
def test_a_killed_evaluation_resumes_bitwise(splits, tmp_path, mode):
    """SIGKILL soon after the first checkpoint, then the same command: it says where it
    resumed, ends with the result of an uninterrupted run (which saves no checkpoint: a
    run's result does not depend on whether it checkpoints) and removes its checkpoint."""
    out, ckpt = tmp_path / "runs.csv", tmp_path / "runs.csv.ckpt"
    reference = tmp_path / "reference.csv"
    whole = subprocess.Popen([tesla_command(), *argv(splits, reference, mode)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=one_thread_env())  # meanwhile, on the other core
    command = [tesla_command(), *argv(splits, out, mode, "--checkpoint-every", "0")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread_env())
    try:
        deadline = time.monotonic() + 180
        while not ckpt.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    again = subprocess.run(command, capture_output=True, text=True, env=one_thread_env())
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"resumed from \S+: run 1/2 at epoch (\d+), run 2/2 at epoch (\d+)", again.stderr)
    assert resumed, again.stderr
    assert 0 < sum(map(int, resumed.groups())) < 2 * EPOCHS  # killed mid-training
    assert not ckpt.exists() and not Path(f"{ckpt}.lock").exists() and not list(tmp_path.glob(".runs.csv.ckpt.*"))
    whole_err = whole.communicate()[1]
    assert whole.returncode == 0, whole_err
    assert "training from epoch 0" in whole_err and "tesla evaluate: saved " not in whole_err, whole_err
    assert results(out) == results(reference)


def leave_checkpoint(splits, out: Path, monkeypatch, *extra: str, train: str = "train") -> Path:
    """An evaluation that trains to the end and dies while writing its output: its
    checkpoint (every run at its last epoch) stays."""
    def dies(path, rows):
        raise KeyboardInterrupt

    out.unlink(missing_ok=True)
    monkeypatch.setattr(tesla.evaluation, "write_runs", dies)
    assert cli.main(argv(splits, out, "sequential", "--checkpoint-every", "0", *extra, train=train, epochs=3)) == 130
    monkeypatch.undo()
    ckpt = Path(f"{out}.ckpt")
    assert ckpt.exists() and not out.exists()
    return ckpt


def test_only_a_checkpoint_of_the_same_settings_and_inputs_is_resumed(splits, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference.csv"
    assert cli.main(argv(splits, reference, "sequential", epochs=3)) == 0
    out = tmp_path / "runs.csv"
    leave_checkpoint(splits, out, monkeypatch, "--seed", "1")
    capsys.readouterr()
    assert cli.main(argv(splits, out, "sequential", epochs=3)) == 0  # another seed
    err = capsys.readouterr().err
    assert "belongs to another evaluation (settings differ: seed); starting from epoch 0" in err, err
    assert "resumed" not in err and results(out) == results(reference)

    leave_checkpoint(splits, out, monkeypatch, train="other_train")
    capsys.readouterr()
    assert cli.main(argv(splits, out, "sequential", epochs=3)) == 0  # other training images
    err = capsys.readouterr().err
    assert "belongs to another evaluation (inputs differ: training data)" in err and "resumed" not in err, err
    assert results(out) == results(reference)

    ckpt = leave_checkpoint(splits, out, monkeypatch)
    capsys.readouterr()
    assert cli.main(argv(splits, out, "sequential", "--checkpoint-every", "1e9", epochs=3)) == 0  # the interval may change
    err = capsys.readouterr().err
    assert f"resumed from {ckpt}: run 1/2 at epoch 3, run 2/2 at epoch 3" in err, err
    assert results(out) == results(reference) and not ckpt.exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_checkpoint_starts_afresh_saying_why(splits, tmp_path, monkeypatch, capsys, damage):
    reference = tmp_path / "reference.csv"
    assert cli.main(argv(splits, reference, "vmap", epochs=3)) == 0
    out = tmp_path / "runs.csv"
    ckpt = leave_checkpoint(splits, out, monkeypatch)
    if damage == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    else:
        ckpt.write_text("not a checkpoint\n")
    stale = ckpt.with_name(f".{ckpt.name}.99999.tmp")  # what a save killed half-way leaves
    stale.write_bytes(b"partial")
    capsys.readouterr()
    assert cli.main(argv(splits, out, "vmap", epochs=3)) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is unreadable (" in err and "starting from epoch 0" in err, err
    assert results(out) == results(reference) and not ckpt.exists() and not stale.exists()


def test_two_evaluations_never_share_a_checkpoint(splits, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    with acquire(f"{out}.ckpt.lock", stage="tesla evaluate", protects="a test"):
        assert cli.main(argv(splits, out, "sequential", epochs=1)) == 2
    err = capsys.readouterr().err
    assert "is in use by another 'tesla evaluate' run" in err and not out.exists()
    with pytest.raises(TeslaError, match="is the --out file"):
        from tesla.evaluation import checkpoint_path

        checkpoint_path(cli.build_parser(only="evaluate").parse_args(argv(splits, out, "sequential", "--checkpoint", str(out))))


def test_the_checkpoint_records_its_format_and_identity(splits, tmp_path, monkeypatch):
    import json

    import torch

    ckpt = leave_checkpoint(splits, tmp_path / "runs.csv", monkeypatch)
    payload = torch.load(ckpt, weights_only=True)
    assert (payload["format"], payload["format_version"]) == (CHECKPOINT_FORMAT, 1)
    identity = json.loads(payload["identity"])
    assert identity["settings"]["runs"] == 2 and identity["settings"]["protocol"]["epochs"] == 3
    assert [n["epoch"] for n in payload["networks"]] == [3, 3]
    assert len(payload["networks"][0]["history"]) == 3 and set(payload["generators"]) == {"cpu", "cuda"}


def test_a_synthetic_sets_fingerprint_is_its_content(tiny, tmp_path):
    """The checkpoint's `inputs`: the same set in another file resumes, a changed one does not."""
    from test_evaluation import make_set

    from tesla.evaluation import synthetic_subject

    def fingerprint(name: str, **changes) -> str:
        return synthetic_subject(make_set(tiny, tmp_path / name, **changes), "cpu").fingerprint

    first = fingerprint("a.h5")
    assert first == fingerprint("b.h5")
    assert first not in {fingerprint("c.h5", lr=0.06), fingerprint("d.h5", ipc=3), fingerprint("e.h5", dsa="flip")}


def test_a_checkpoint_of_this_evaluation_that_does_not_fit_is_refused(splits, tmp_path, monkeypatch, capsys):
    """Its key is this evaluation's, yet a network's state lacks a tensor (a file edited by
    hand): the networks may be partly restored, so the run stops and says how to start over."""
    import torch

    out = tmp_path / "runs.csv"
    ckpt = leave_checkpoint(splits, out, monkeypatch)
    payload = torch.load(ckpt, weights_only=True)
    payload["networks"][1]["model"].pop(next(iter(payload["networks"][1]["model"])))
    torch.save(payload, ckpt)
    capsys.readouterr()
    assert cli.main(argv(splits, out, "sequential", epochs=3)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: its state does not fit these networks" in err and "delete it" in err, err
    assert ckpt.exists() and not out.exists()
