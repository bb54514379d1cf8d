"""bench/project_cost.py: the arithmetic of the cost projection against a hand computation on a
tiny config, the refusal of a missing rate, and the conversion of the GPU parts' tables."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tesla.errors import TeslaError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("project_cost", ROOT / "bench" / "project_cost.py")
project_cost = sys.modules["project_cost"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project_cost)

ENTRY = {
    "model": "m",
    "normalize": "none",
    "experts": {"count": 2, "epochs": 10, "keep_snapshots": "auto"},
    "distill": {
        # the target row: K = max(3 + 2, 5 + 1) over the rows of its input space = 6
        1: {"syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 3, "iterations": 5, "batch_syn": None,
            "soft_labels": True, "engine": ["exact", "tesla"], "eval_runs": 2},
        2: {"syn_steps": 4, "expert_epochs": 1, "max_start_epoch": 5, "iterations": 5},
        # another input space (ZCA): its 7 + 2 must not count
        3: {"syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 7, "iterations": 5, "zca": True},
    },
    "evaluate": {"architectures": ["m", "a2"], "runs": 3, "epochs": 7, "random_baseline": True},
}
RATES = {
    "prepare_images_per_cpu_second": 100.0,
    "train_images_per_second.m": 1000.0,
    "forward_images_per_second.m": 4000.0,
    "student_step_image_seconds.m": 0.001,
    "train_images_per_second.a2": 500.0,
    "forward_images_per_second.a2": 2000.0,
}


def write_rates(path: Path, rates: dict, assumed: tuple = ()) -> Path:
    doc = {"format": "tesla-rates", "format_version": 1, "machine": "test",
           "rates": {k: {"value": v, "source": "test", "assumed": k in assumed} for k, v in rates.items()}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_projection_equals_a_hand_computation(tmp_path):
    rates = project_cost.Rates(write_rates(tmp_path / "r.yaml", RATES, assumed=("train_images_per_second.a2",)))
    stages = {s.name: s for s in project_cost.project(ENTRY, "tiny", 1, rates, train_images=600, test_images=200, classes=10)}
    # prepare: (600 + 200) images / 100 per CPU-second
    assert stages["prepare"].hours * 3600 == pytest.approx(8.0)
    # experts: 2 experts x 6 epochs x (600 / 1000 train + 200 / 4000 test)
    assert stages["experts"].hours * 3600 == pytest.approx(2 * 6 * (0.6 + 0.05))
    # distill: 2 engines x 5 iterations x (4 steps x 10 images x 0.001 + soft labels 10 / 4000)
    assert stages["distill"].hours * 3600 == pytest.approx(2 * 5 * (0.04 + 0.0025))
    # evaluate: (2 sets + random) x eval_runs 2 x per arch (7 epochs x 10 images / train + 200 / forward)
    assert stages["evaluate"].hours * 3600 == pytest.approx(3 * 2 * ((0.07 + 0.05) + (0.14 + 0.1)))
    assert stages["evaluate"].assumed == ["train_images_per_second.a2"]
    assert "the longest job: a2, 0.0 h" in stages["evaluate"].work  # one set of a2: 2 x 0.24 s (what a job's runtime must cover)
    table = project_cost.render(list(stages.values()), rates, "results/tiny_ipc1/acc.csv", 12.0)
    assert "train_images_per_second.a2*" in table and "Assumed rates" in table


def test_train_to_end_and_fixed_keep_snapshots_change_the_expert_epochs():
    space = ("none", False)
    assert project_cost.expert_epochs_trained(ENTRY, space) == 6
    assert project_cost.expert_epochs_trained(ENTRY, ("none", True)) == 9
    assert project_cost.expert_epochs_trained(dict(ENTRY, experts={"count": 1, "epochs": 10, "keep_snapshots": "auto",
                                                                   "train_to_end": True}), space) == 10
    assert project_cost.expert_epochs_trained(dict(ENTRY, experts={"count": 1, "epochs": 10, "keep_snapshots": 4}), space) == 4


def test_a_missing_rate_is_refused_with_its_name_and_user(tmp_path):
    rates = project_cost.Rates(write_rates(tmp_path / "r.yaml", {k: v for k, v in RATES.items() if k != "train_images_per_second.a2"}))
    with pytest.raises(TeslaError, match=r"no rate 'train_images_per_second.a2', which evaluate \(a2\) needs"):
        project_cost.project(ENTRY, "tiny", 1, rates, train_images=600, test_images=200, classes=10)


def test_the_command_line_refuses_a_missing_rate_cleanly(tmp_path):
    rates = write_rates(tmp_path / "r.yaml", {k: v for k, v in RATES.items() if k != "student_step_image_seconds.m"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"tiny": ENTRY}}))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "project_cost.py"), "--rates", str(rates), "--config", str(config),
                        "--dataset", "tiny", "--ipc", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "no rate 'student_step_image_seconds.m', which distill (m) needs" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_rate_without_source_or_a_wrong_format_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"format": "tesla-rates", "format_version": 1, "rates": {"x": {"value": 3}}}))
    with pytest.raises(TeslaError, match="rate 'x' needs a positive 'value' and a 'source'"):
        project_cost.Rates(bad)
    bad.write_text(yaml.safe_dump({"format": "other", "rates": {}}))
    with pytest.raises(TeslaError, match="not a tesla-rates version 1 file"):
        project_cost.Rates(bad)


ENGINE_MD = """**in1k-ipc50**: convnet_d4 width 128, 3x64x64, 1000 classes, 50000 images (ipc 50), batch_syn 1000, N = 30, 2,496,360 parameters

| column | first call s (build) | s per iteration | before / this | / floor | graphs | dL/dX vs off | dL/dalpha vs off |
|---|---|---|---|---|---|---|---|
| before | 10.00 | 6.0000 | 1.00x | 3.00 | - | 0.0e+00 | 0.0e+00 |
| off | 10.00 | 5.0000 | 1.20x | 2.50 | - | - | - |
| cudagraph | 12.00 | 3.0000 | 2.00x | 1.50 | 2 | 1.0e-03 | 1.0e-04 |
| inductor-cudagraph | failed: RuntimeError: x | | | | | | |
| floor | 2.00 | 2.0000 | 3.00x | 1.00 | - | - | - |
"""

TRAINING_MD = """
convnet_d4 (64 x 64 x 3, 1000 classes):

| configuration | images/s, all networks (wall) | vs today | images per CPU-second | vs today |
|---|---|---|---|---|
| today | 20000.0 | 1.00x | 20100.0 | 1.00x |
| streams K=4 bf16 | 35000.5 | 1.75x | 30000.0 | 1.49x |
"""


def test_the_gpu_parts_tables_convert_into_a_rates_file(tmp_path):
    (tmp_path / "e.md").write_text(ENGINE_MD)
    (tmp_path / "t.md").write_text(TRAINING_MD)
    base = write_rates(tmp_path / "base.yaml", RATES)
    doc = project_cost.convert([tmp_path / "e.md"], [tmp_path / "t.md"], base, "H200 test")
    r = doc["rates"]
    # fastest column other than before/floor: cudagraph, 3.0 s / (30 x 1000)
    assert r["student_step_image_seconds.convnet_d4"]["value"] == pytest.approx(3.0 / 30000)
    assert "cudagraph" in r["student_step_image_seconds.convnet_d4"]["source"]
    assert r["train_images_per_second.convnet_d4"]["value"] == pytest.approx(35000.5)
    assert r["train_images_per_second.m"]["source"].startswith("carried over from base.yaml")
    out = tmp_path / "new.yaml"
    out.write_text(yaml.safe_dump(doc))
    assert project_cost.Rates(out).get("student_step_image_seconds.convnet_d4", "test")[0] == pytest.approx(1e-4)


@pytest.mark.parametrize("labels, relabelled", [(True, True), ("tesla", True), (False, False), ("none", False),
                                                ("learned", False)])
def test_only_teslas_labels_cost_a_labelling_pass_per_iteration(tmp_path, labels, relabelled):
    """The config's soft_labels as a kind (none/tesla/learned) or a boolean of older configs:
    only TESLA's labels are recomputed every iteration (a string 'none' is not true)."""
    rates = project_cost.Rates(write_rates(tmp_path / "r.yaml", RATES))
    entry = {**ENTRY, "distill": {**ENTRY["distill"], 1: {**ENTRY["distill"][1], "soft_labels": labels}}}
    stages = {s.name: s for s in project_cost.project(entry, "tiny", 1, rates, train_images=600, test_images=200, classes=10)}
    per_iteration = 0.04 + (0.0025 if relabelled else 0.0)
    assert stages["distill"].hours * 3600 == pytest.approx(2 * 5 * per_iteration)


def test_a_moving_window_keeps_experts_training_to_its_final_bound():
    entry = {**ENTRY, "distill": {**ENTRY["distill"], 2: {**ENTRY["distill"][2], "max_start_epoch_final": 8,
                                                          "window_iterations": 3}}}
    assert project_cost.expert_epochs_trained(entry, ("none", False)) == 8 + 1


def test_the_training_parts_64px_table_gives_the_cross_architecture_rates():
    """models_64px.md of the training part (ResNet-18, VGG-11, AlexNet at 64 px; written by
    bench_training.py's matrix_table, here with one entry stopped at its cap before its second
    configuration) turns into measured training rates of those networks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training_tables", ROOT / "bench" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    configs = [{"name": "today: one expert per process", "k": 1}, {"name": "sequential, K=2, float32, contiguous, TF32", "k": 2}]
    text = []
    for arch, seconds in (("resnet18", [0.5, 0.25]), ("vgg11", [0.2, 0.1]), ("alexnet", [0.1])):
        walls = {c["name"]: ([s] if i < len(seconds) else []) for i, (c, s) in enumerate(zip(configs, seconds + [0.0]))}
        text += bench.matrix_table(f"{arch}:64:1000", configs, walls, walls, images=1280, rounds=1)
    rates = project_cost.training_rate("\n".join(text) + "\n")
    assert rates["train_images_per_second.resnet18"]["value"] == pytest.approx(2 * 1280 / 0.25)
    assert rates["train_images_per_second.vgg11"]["value"] == pytest.approx(2 * 1280 / 0.1)
    assert rates["train_images_per_second.alexnet"]["value"] == pytest.approx(1280 / 0.1)
    assert all(not r["assumed"] and "64 px, 1000 classes" in r["source"] for r in rates.values())


def test_distillation_over_gpus_equals_a_hand_computation(tmp_path):
    """--gpus: row 1 (exact + tesla, TESLA labels, 10 images, N = 4) with P = 100 parameters, 32 px."""
    rates = project_cost.Rates(write_rates(tmp_path / "r.yaml", RATES))
    calls, floats = project_cost.distill_traffic(ENTRY["distill"][1], 1, 10, 100, 3 * 32 * 32)
    # N (forward) + N (reverse of exact) parameter vectors; 10 touched rows x 3072 + dL/dalpha; 10 x 10 soft labels
    assert (calls, floats) == (4 + 4 + 1 + 1, 4 * 100 * 2 + 10 * 3072 + 1 + 10 * 10)
    rows = project_cost.scale_distill(ENTRY, 1, rates, 10, [1, 2, 16], params=100)
    per_iteration = 4 * 10 * 0.001 + 10 / 4000  # the one-GPU iteration of test_projection_equals_a_hand_computation
    repeated = 5 * 4 * 10 * 3072 / 2.5e12
    nvlink = 10 * 2 * 1 * 5e-6 + (2 * 1 / 2) * 4 * floats / 300e9
    infiniband = 10 * 2 * 15 * 10e-6 + (2 * 15 / 16) * 4 * floats / 40e9
    assert [r.nodes for r in rows] == [1, 1, 2]
    for row, network, g in zip(rows, (0.0, nvlink, infiniband), (1, 2, 16)):
        assert row.network == pytest.approx(network)
        assert row.hours * 3600 == pytest.approx(2 * 5 * (per_iteration / g + network + repeated))
    text = project_cost.render_scaling(rows, rates, "results/tiny_ipc1", (calls, floats), 100)
    assert "| 16 | 2 |" in text and "NVLink" in text and "InfiniBand" in text and "batch_syn / G" in text


def test_the_in1k_row_projects_at_least_six_times_faster_on_eight_gpus(capsys):
    assert project_cost.main(["--rates", str(ROOT / "bench" / "rates_h100_today.yaml"), "--gpus", "1", "8"]) == 0
    table = capsys.readouterr().out
    speed = float(re.search(r"^\| 8 \| 1 \| .* \| ([\d.]+)x \|$", table, re.M).group(1))
    assert speed >= 6
