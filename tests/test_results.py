"""``tesla results``: aggregation into acc.csv, the ``full`` row from expert files, errors.

Time budget of this file: about 3 s.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tesla import cli
from tesla.evaluation import RunResult, write_runs
from tesla.models import build_model, model_spec
from tesla.parameters import flatten_params, param_layout
from tesla.results import ACC_COLUMNS, build_table, full_data_rows, read_all_runs, read_runs, read_table, write_table
from tesla.trajectories import TrajectoryMeta, TrajectoryWriter


def run_rows(method: str, arch: str, accs, *, engine: str = "", ipc: int = 10, epochs: int = 300, seed: int = 0,
             lr: float = 0.01, dataset: str = "cifar10") -> list[RunResult]:
    return [
        RunResult(dataset=dataset, ipc=ipc, method=method, engine=engine, arch=arch, run=r, seed=seed + r,
                  epochs=epochs, lr_decay_epoch=epochs // 2, lr=lr, final_train_loss=0.5, test_acc=a, seconds=1.5,
                  labels="hard", dsa="color_crop_cutout_flip_scale_rotate", zca=False, input_space="split", num_images=100,
                  device="cpu", source="x.h5")
        for r, a in enumerate(accs)
    ]


def write_expert(path, acc: float, seed: int, epochs: int = 2, dataset: str = "cifar10"):
    """A real (tiny) expert trajectory file with a recorded final test accuracy (fraction)."""
    spec = model_spec("convnet", channels=3, num_classes=10, resolution=32)
    model = build_model("convnet", channels=3, num_classes=10, resolution=32)
    theta = flatten_params(model)
    with TrajectoryWriter(path, layout=param_layout(model)) as w:
        for _ in range(epochs + 1):
            w.append(theta)
        w.commit(TrajectoryMeta(model_spec=spec, dataset=dataset, dataset_fingerprint="f", seed=seed, lr=0.01,
                                batch_size=256, dsa="none", epochs=epochs, train_loss=[1.0] * epochs,
                                train_accuracy=[0.5] * epochs, final_test_accuracy=acc))
    return path


@pytest.fixture
def runs_files(tmp_path):
    tesla_accs, random_accs, vit_accs = [60.0, 62.0, 64.0], [30.0, 31.0, 32.0, 35.0], [40.0, 44.0]
    return [
        write_runs(tmp_path / "runs_tesla_convnet.csv", run_rows("tesla", "convnet", tesla_accs, engine="tesla", lr=0.0123)),
        write_runs(tmp_path / "runs_random_convnet.csv", run_rows("random", "convnet", random_accs)),
        write_runs(tmp_path / "runs_tesla_vit.csv", run_rows("tesla", "vit", vit_accs, engine="tesla")),
    ], {"tesla": tesla_accs, "random": random_accs, "vit": vit_accs}


def test_aggregation_means_population_std_and_order(runs_files):
    paths, accs = runs_files
    table = build_table(read_all_runs(paths))
    assert list(table.columns) == list(ACC_COLUMNS)
    assert list(zip(table["method"], table["arch"])) == [("tesla", "convnet"), ("tesla", "vit"), ("random", "convnet")]
    row = table.iloc[0]
    assert row["runs"] == 3 and row["engine"] == "tesla" and row["ipc"] == 10 and row["dataset"] == "cifar10"
    assert row["acc_mean"] == pytest.approx(62.0)
    assert row["acc_std"] == pytest.approx(np.sqrt(8 / 3))  # population std (ddof=0): sqrt(((-2)^2+0+2^2)/3)
    rnd = table.iloc[2]
    assert rnd["acc_mean"] == pytest.approx(np.mean(accs["random"]))
    assert rnd["acc_std"] == pytest.approx(np.std(accs["random"]))
    assert "learned lr 0.0123" in row["note"] and "300 epochs" in row["note"]
    assert "4 draws of random real images" in rnd["note"]


def test_trained_full_runs_have_no_ipc(runs_files, tmp_path):
    paths, _ = runs_files
    full = write_runs(tmp_path / "runs_full.csv", run_rows("full", "convnet", [80.0, 82.0]))
    assert full.read_text().splitlines()[2].startswith("cifar10,,full,,convnet,0,")
    table = build_table(read_all_runs([*paths, full]))
    row = table[table["method"] == "full"].iloc[0]
    assert row["ipc"] is pd.NA and row["runs"] == 2 and row["acc_mean"] == pytest.approx(81.0)
    assert "whole training split" in row["note"]


def test_full_row_from_expert_files(tmp_path):
    experts = [write_expert(tmp_path / f"e{i}.h5", acc, seed=i) for i, acc in enumerate([0.80, 0.84])]
    full = full_data_rows(experts)
    assert len(full) == 1
    row = full.iloc[0]
    assert (row["method"], row["arch"], row["runs"], row["engine"]) == ("full", "convnet", 2, "")
    assert row["acc_mean"] == pytest.approx(82.0) and row["acc_std"] == pytest.approx(2.0)
    assert row["note"].startswith("expert final test accuracy, 2 experts, 2 epochs")


def test_cli_writes_table_and_prints_summary(runs_files, tmp_path, capsys):
    paths, _ = runs_files
    experts = [write_expert(tmp_path / f"e{i}.h5", acc, seed=i) for i, acc in enumerate([0.85, 0.85])]
    out = tmp_path / "results" / "cifar10_ipc10" / "acc.csv"
    rc = cli.main(["results", "--runs", *map(str, paths), "--experts", *map(str, experts), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert out.read_text().startswith("# format: tesla-acc, format_version: 2")
    table = read_table(out)
    assert list(table["method"]) == ["tesla", "tesla", "random", "full"]
    assert table["ipc"].isna().tolist() == [False, False, False, True]  # the full row has no IPC
    full = table[table["method"] == "full"].iloc[0]
    assert full["acc_mean"] == pytest.approx(85.0) and "expert final test accuracy" in full["note"]
    assert "gain over random +30.00" in printed  # 62.0 - mean(30, 31, 32, 35) = 62.0 - 32.0
    assert "convnet" in printed and "62.00 +-" in printed
    assert [p.name for p in out.parent.iterdir()] == ["acc.csv"]


def test_bad_inputs(runs_files, tmp_path, capsys):
    paths, _ = runs_files
    out = tmp_path / "acc.csv"

    def refused(argv, match):
        rc = cli.main(["results", *argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err
        assert not out.exists()

    refused(["--runs", str(paths[0]), str(paths[0])], "appears twice")
    other = write_runs(tmp_path / "runs_more.csv", run_rows("tesla", "convnet", [70.0], engine="tesla", epochs=1000, seed=9))
    refused(["--runs", str(paths[0]), str(other)], "differ in epochs")
    plain = tmp_path / "plain.csv"
    plain.write_text("dataset,ipc\ncifar10,10\n")
    refused(["--runs", str(plain)], "not a tesla evaluation runs file")
    newer = tmp_path / "newer.csv"
    newer.write_text(paths[0].read_text().replace("format_version: 4", "format_version: 5", 1))
    refused(["--runs", str(newer)], "format version 5, this tesla reads versions 1, 2, 3, 4")
    expert = write_expert(tmp_path / "mnist_expert.h5", 0.9, seed=0, dataset="mnist")
    refused(["--runs", str(paths[0]), "--experts", str(expert)], "experts were trained on mnist")
    refused(["--runs", str(tmp_path / "missing.csv")], "no such runs file")


V1_COLUMNS = ["dataset", "ipc", "method", "engine", "arch", "run", "seed", "epochs", "lr", "final_train_loss",
              "test_acc", "seconds", "labels", "dsa", "zca", "num_images", "device", "source"]


def write_v1(path, rows: list[RunResult]):
    """A runs file as tesla-eval-runs v1 wrote it (no lr_decay_epoch, no input_space)."""
    frame = pd.DataFrame([r.row() for r in rows])[V1_COLUMNS]
    with open(path, "w", newline="") as f:
        f.write("# format: tesla-eval-runs, format_version: 1, tesla_version: 0.1.0\n")
        frame.to_csv(f, index=False)
    return path


def test_v1_runs_files_are_read_with_the_protocol_they_used(tmp_path):
    rows = run_rows("random", "convnet", [30.0, 32.0], epochs=1000)
    for r in rows:
        r.zca = True
    old = read_all_runs([write_v1(tmp_path / "v1.csv", rows)])
    assert list(old["lr_decay_epoch"]) == [500, 500] and list(old["input_space"]) == ["split+zca"] * 2
    table = build_table(old)
    assert "1000 epochs (lr x0.1 from epoch 500)" in table.iloc[0]["note"] and "inputs split+zca" in table.iloc[0]["note"]
    # runs of another schedule or input space are not averaged with them
    for change in (dict(lr_decay_epoch=502), dict(input_space="none+zca-eps0.1")):
        new = run_rows("random", "convnet", [31.0], epochs=1000, seed=7)
        for r in new:
            r.zca = True
            for k, v in change.items():
                setattr(r, k, v)
        mixed = read_all_runs([tmp_path / "v1.csv", write_runs(tmp_path / "v2.csv", new)])
        with pytest.raises(Exception, match=f"differ in {next(iter(change))}"):
            build_table(mixed)


def write_expert_stopped(path, acc: float, seed: int, epochs: int, requested: int):
    """An expert that stopped after its last needed snapshot: trained `epochs` of `requested`."""
    spec = model_spec("convnet", channels=3, num_classes=10, resolution=32)
    model = build_model("convnet", channels=3, num_classes=10, resolution=32)
    with TrajectoryWriter(path, layout=param_layout(model)) as w:
        for _ in range(epochs + 1):
            w.append(flatten_params(model))
        w.commit(TrajectoryMeta(model_spec=spec, dataset="cifar10", dataset_fingerprint="f", seed=seed, lr=0.01,
                                batch_size=256, dsa="none", epochs=epochs, epochs_requested=requested,
                                test_accuracy_epoch=epochs, train_loss=[1.0] * epochs, train_accuracy=[0.5] * epochs,
                                final_test_accuracy=acc))
    return path


def test_the_full_row_says_after_which_epoch_the_experts_were_tested(runs_files, tmp_path):
    paths, _ = runs_files
    stopped = [write_expert_stopped(tmp_path / f"s{i}.h5", acc, i, epochs=12, requested=50) for i, acc in enumerate([0.6, 0.7])]
    table = build_table(read_all_runs(paths), full_data_rows(stopped))
    assert list(table.columns) == list(ACC_COLUMNS) and "test_epoch" in ACC_COLUMNS
    full = table[table["method"] == "full"].iloc[0]
    assert full["test_epoch"] == 12 and full["acc_mean"] == pytest.approx(65.0)
    assert "12 of 50 epochs" in full["note"] and "stopped" in full["note"]
    assert list(table.loc[table["method"] != "full", "test_epoch"]) == [300, 300, 300]  # the runs' epochs
    out = tmp_path / "acc.csv"
    write_table(table, out)
    assert list(read_table(out)["test_epoch"]) == [300, 300, 300, 12]
    # experts tested after different epochs are not averaged
    mixed = [*stopped, write_expert(tmp_path / "end.h5", 0.8, seed=5, epochs=2)]
    with pytest.raises(Exception, match=r"after different epochs \(epoch 2: .*end\.h5; epoch 12: "):
        full_data_rows(mixed)


def test_a_v1_table_reads_without_test_epoch(runs_files, tmp_path):
    paths, _ = runs_files
    out = write_table(build_table(read_all_runs(paths)), tmp_path / "acc.csv")
    lines = out.read_text().splitlines()
    header = lines[1].split(",")
    i = header.index("test_epoch")
    old = [lines[0].replace("format_version: 2", "format_version: 1")] + [
        ",".join(f for j, f in enumerate(line.split(",")) if j != i) for line in lines[1:]
    ]
    (tmp_path / "v1.csv").write_text("\n".join(old) + "\n")
    table = read_table(tmp_path / "v1.csv")
    assert list(table.columns) == list(ACC_COLUMNS) and table["test_epoch"].isna().all()
    assert list(table["acc_mean"]) == list(read_table(out)["acc_mean"])


def test_v2_runs_files_read_as_float32_without_momentum_restart(runs_files, tmp_path):
    paths, _ = runs_files
    frame = pd.read_csv(paths[1], comment="#")
    v2 = frame.drop(columns=["reset_momentum_at_decay", "precision", "tf32", "memory_format", "group_mode"])
    with open(tmp_path / "v2.csv", "w", newline="") as f:
        f.write("# format: tesla-eval-runs, format_version: 2, tesla_version: 0.1.0\n")
        v2.to_csv(f, index=False)
    old = read_all_runs([tmp_path / "v2.csv"])
    assert list(old["precision"]) == ["float32"] * 4 and not old["reset_momentum_at_decay"].any()
    # averaged with v3 runs of the same protocol, refused with runs of another precision or momentum schedule
    same = write_runs(tmp_path / "same.csv", run_rows("random", "convnet", [33.0], seed=20))
    assert build_table(read_all_runs([tmp_path / "v2.csv", same])).iloc[0]["runs"] == 5
    for change in (dict(precision="bf16"), dict(reset_momentum_at_decay=True)):
        rows = run_rows("random", "convnet", [33.0], seed=30)
        for r in rows:
            for k, v in change.items():
                setattr(r, k, v)
        other = write_runs(tmp_path / f"other_{next(iter(change))}.csv", rows)
        with pytest.raises(Exception, match=f"differ in {next(iter(change))}"):
            build_table(read_all_runs([tmp_path / "v2.csv", other]))


def test_v3_runs_files_are_read_without_a_selection_and_a_selected_set_is_named(tmp_path):
    """v3 lacks iteration and selection (a set evaluated as given); a v4 row of a set chosen
    among kept sets says so in acc.csv's note."""
    rows = run_rows("tesla", "convnet", [60.0, 62.0], engine="exact")
    frame = pd.DataFrame([r.row() for r in rows]).drop(columns=["iteration", "selection"])
    v3 = tmp_path / "v3.csv"
    with open(v3, "w", newline="") as f:
        f.write("# format: tesla-eval-runs, format_version: 3, tesla_version: 0.1.0\n")
        frame.to_csv(f, index=False)
    df = read_runs(v3)
    assert set(df["iteration"]) == {""} and set(df["selection"]) == {""}
    assert "selected" not in build_table(df)["note"].iloc[0]
    for r in rows:
        r.iteration, r.selection = 150, "validation"
    table = build_table(read_runs(write_runs(tmp_path / "v4.csv", rows)))
    assert "the kept set of iteration 150, selected by its validation accuracy" in table["note"].iloc[0]
