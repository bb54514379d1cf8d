"""The Snakemake workflow: config validation, the early raw-data check, rerun rules.

Every test works on a copy of workflow/ and config/ in a temporary folder and runs
the real ``snakemake`` of this environment. Rerun rules need the metadata that Snakemake
records only for jobs it executes, so the workflow is executed once (module fixture) with
a stand-in ``tesla`` command first on PATH that writes each output a stage would write
(the stages themselves are tested in their own files and end to end in
tests/test_workflow_demo.py); then each test edits a copy of the config and asks
``snakemake --dry-run`` which jobs would run.

Time budget: about 30 s on 2 cores.
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from workflow_support import (
    ROOT,
    SNAKEMAKE,
    dry_run,
    install_fake_tesla,
    load_config,
    make_workdir,
    planned_jobs,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")


# --------------------------------------------------------------------------------------
# (a) config validation
# --------------------------------------------------------------------------------------
#: schema violations, all in one config (every problem is reported at once):
#: edit -> texts that must appear in the error
SCHEMA_BREAKAGES = {
    "unknown key": ["config key datasets.demo.experts.epoch: unknown key", "epochs"],
    "wrong type": ["config key datasets.demo.experts.lr: 'fast' is not of type 'number'"],
    "negative ipc": ["config key datasets.demo.distill.-1: invalid key name", "positive integer"],
    "zero runs": ["config key datasets.demo.evaluate.runs: 0 is less than the minimum of 1"],
    "unknown top-level key": ["config key device_name: unknown key"],
    "bad source": ["config key datasets.demo.source: 'imagenet21k' is not one of", "folder"],
    "missing source": ["config key datasets.mnist: 'source' is a required property"],
    "bad batch_syn": ["config key datasets.demo.distill.1.batch_syn: -5 is less than the minimum of 1"],
    "nan lr_img": ["config key datasets.demo.distill.1.lr_img: nan is not a finite number"],
    "inf lr_lr": ["config key datasets.demo.distill.1.lr_lr: inf is not a finite number"],
    "nan max_lr": ["config key datasets.demo.distill.3.max_lr: nan is not a finite number"],
    "resolution too large": ["config key datasets.demo.resolution: 2000 is greater than the maximum of 1024", "(4-1024)"],
}
#: problems between keys, and names only the package's registries know, found after the
#: schema passes (each names its key and the valid names)
CROSS_BREAKAGES = {
    "unknown default dataset": ["config key default_datasets: 'cifar11' is not a configured dataset"],
    "snapshots too few": ["config key datasets.demo.distill.1: reads expert snapshots up to epoch 6 (max_start_epoch 4 + "
                          "expert_epochs 2), but datasets.demo.experts.keep_snapshots is 3",
                          "lower datasets.demo.distill.1.expert_epochs or datasets.demo.distill.1.max_start_epoch "
                          "(their sum to at most 3), or raise datasets.demo.experts.keep_snapshots to 6"],
    "expert_epochs beyond the experts": ["config key datasets.demo.distill.3: reads expert snapshots up to epoch 24 "
                                         "(max_start_epoch 4 + expert_epochs 20)",
                                         "or raise datasets.demo.experts.epochs and keep_snapshots to 24"],
    "batch_syn beyond the set": ["config key datasets.demo.distill.1.batch_syn: 50 is more than the synthetic set "
                                 "(1 x 10 classes = 10 images)"],
}
NAME_BREAKAGES = {
    "misspelt model": ["config key datasets.demo.model: unknown network 'convnet_dd1'", "convnet_d1, "],
    "misspelt architecture": ["config key datasets.demo.evaluate.architectures[1]: unknown network 'resnet99'",
                              "resnet18"],
    "architecture too big for 8 px": ["config key datasets.demo.evaluate.architectures[0]: convnet_d5 cannot take 8x8"],
    "misspelt augmentation": ["config key datasets.demo.experts.dsa:", "'rotat'", "rotate"],
    "misspelt engine": ["config key datasets.demo.distill.3.engine: unknown engine 'exakt'", "exact, tesla, unroll"],
    "misspelt normalisation": ["config key datasets.demo.normalize: unknown normalisation 'cifar'", "cifar10"],
    "misspelt convention": ["config key datasets.demo.distill.1.lr_img_convention: unknown convention 'tesla'",
                            "tesla-published"],
}


def _break(cfg: dict, edits) -> dict:
    cfg = copy.deepcopy(cfg)
    demo = cfg["datasets"]["demo"]
    for edit in edits:
        if edit == "unknown key":
            demo["experts"]["epoch"] = 3  # misspelt 'epochs'
        elif edit == "wrong type":
            demo["experts"]["lr"] = "fast"
        elif edit == "negative ipc":
            demo["distill"][-1] = dict(demo["distill"][1])
        elif edit == "zero runs":
            demo["evaluate"]["runs"] = 0
        elif edit == "unknown top-level key":
            cfg["device_name"] = "cuda"
        elif edit == "bad source":
            demo["source"] = "imagenet21k"
        elif edit == "missing source":
            del cfg["datasets"]["mnist"]["source"]
        elif edit == "bad batch_syn":
            demo["distill"][1]["batch_syn"] = -5
        elif edit == "nan lr_img":
            demo["distill"][1]["lr_img"] = float("nan")
        elif edit == "inf lr_lr":
            demo["distill"][1]["lr_lr"] = float("inf")
        elif edit == "nan max_lr":
            demo["distill"][3]["max_lr"] = float("nan")
        elif edit == "resolution too large":
            demo["resolution"] = 2000
        elif edit == "expert_epochs beyond the experts":
            demo["distill"][3]["expert_epochs"] = 20
        elif edit == "batch_syn beyond the set":
            demo["distill"][1]["batch_syn"] = 50
        elif edit == "unknown default dataset":
            cfg["default_datasets"] = ["demo", "cifar11"]
        elif edit == "snapshots too few":
            demo["experts"]["keep_snapshots"] = 3
        elif edit == "misspelt model":
            demo["model"] = "convnet_dd1"
        elif edit == "misspelt architecture":
            demo["evaluate"]["architectures"] = ["convnet_d1", "resnet99"]
        elif edit == "architecture too big for 8 px":
            demo["evaluate"]["architectures"] = ["convnet_d5", "resnet99"]
        elif edit == "misspelt augmentation":
            demo["experts"]["dsa"] = "color_crop_rotat"
        elif edit == "misspelt engine":
            demo["distill"][3]["engine"] = ["exact", "exakt"]
        elif edit == "misspelt normalisation":
            demo["normalize"] = "cifar"
        elif edit == "misspelt convention":
            demo["distill"][1]["lr_img_convention"] = "tesla"
        else:  # pragma: no cover
            raise ValueError(edit)
    return cfg


@pytest.fixture(scope="module")
def plain_workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("wf-plain"))


def test_shipped_config_is_valid_and_the_default_target_is_the_demo(plain_workdir):
    jobs = dry_run(plain_workdir)
    cfg = load_config(plain_workdir)
    demo = cfg["datasets"]["demo"]
    ipcs = sorted(demo["distill"])
    assert len(ipcs) >= 2
    archs = demo["evaluate"]["architectures"]
    assert len(archs) >= 2
    assert jobs["prepare"] == {"resources/demo/train.h5", "resources/demo/test.h5", "resources/demo/prepare_report.txt"}
    assert jobs["expert"] == {f"results/demo/experts/split/expert_{k}.h5" for k in range(demo["experts"]["count"])}
    assert {f"results/demo_ipc{i}/acc.csv" for i in ipcs} == jobs["results"]
    assert {f"results/demo_ipc{i}/eval/exact_{a}.csv" for i in ipcs for a in archs} == jobs["evaluate_synthetic"]
    assert {f"results/demo_ipc{i}/eval/random_{a}.csv" for i in ipcs for a in archs} == jobs["evaluate_random"]
    assert {f"results/demo_ipc{i}/exact/{f}" for i in ipcs for f in ("curves.png", "grid.png")} == jobs["report"]
    # everything a run makes is under resources/ (prepared inputs) and results/
    assert all(f.startswith(("resources/demo/", "results/demo")) for files in jobs.values() for f in files)
    # no other dataset is touched by the default target
    assert all("demo" in f for files in jobs.values() for f in files)


@pytest.mark.parametrize(
    "breakages", [SCHEMA_BREAKAGES, CROSS_BREAKAGES, NAME_BREAKAGES], ids=["schema", "cross-key", "registry names"]
)
def test_broken_config_is_refused_naming_every_key(plain_workdir, breakages):
    cfg = _break(load_config(plain_workdir), breakages)
    write_config(plain_workdir, cfg, "broken.yaml")
    # --replace-workflow-config: the broken file is the whole config (a deleted key stays deleted)
    result = snakemake(
        plain_workdir, "--dry-run", "--cores", "1", "--replace-workflow-config", "--configfile", "broken.yaml"
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "invalid configuration" in text
    for edit, needles in breakages.items():
        for needle in needles:
            assert needle in text, f"{edit}: {needle!r} not in:\n{text}"
    assert not (plain_workdir / "results").exists()


@pytest.mark.parametrize("edit", ["nan lr_img", "inf lr_lr", "nan max_lr"])
def test_a_non_finite_number_alone_is_refused(plain_workdir, edit):
    """YAML's .nan passes every bound of the schema (NaN compares False): refused by key anyway."""
    write_config(plain_workdir, _break(load_config(plain_workdir), [edit]), "nan.yaml")
    assert ".nan" in (plain_workdir / "nan.yaml").read_text() or ".inf" in (plain_workdir / "nan.yaml").read_text()
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "--configfile", "nan.yaml")
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid configuration" in text, text
    for needle in SCHEMA_BREAKAGES[edit]:
        assert needle in text, text


# --------------------------------------------------------------------------------------
# (c) a requested dataset whose raw data is missing fails before any job
# --------------------------------------------------------------------------------------
def test_missing_imagenet_path_fails_at_once_naming_the_key(plain_workdir):
    result = snakemake(plain_workdir, "--cores", "1", "results/in1k_ipc50/acc.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.in1k.input is not set" in text
    assert "ILSVRC2012_img_train.tar" in text and "<wnid>/*.JPEG" in text  # the accepted layouts
    assert "--configfile" in text  # how to set it
    assert not (plain_workdir / "resources" / "in1k").exists()
    assert not (plain_workdir / "results").exists()  # no job started


def test_wrong_imagenet_path_fails_at_once_naming_the_key(plain_workdir, tmp_path):
    override = tmp_path / "site.yaml"
    override.write_text(yaml.safe_dump({"datasets": {"in1k": {"input": str(tmp_path / "no" / "ILSVRC2012_img_train.tar")}}}))
    result = snakemake(plain_workdir, "results/in1k_ipc1/acc.csv", "--cores", "1", "--configfile", str(override))
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.in1k.input" in text and "does not exist" in text
    assert not (plain_workdir / "results").exists()


def _imagenet_tree(root: Path, flat_val: bool = False) -> Path:
    """A two-class ImageNet-style tree: train/<wnid>/ (and val/, flat or in class folders)."""
    for wnid in ("n00000001", "n00000002"):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(b"not decoded by a dry run")
        val = root / "val" if flat_val else root / "val" / wnid
        val.mkdir(parents=True, exist_ok=True)
        (val / f"val_{wnid}.JPEG").write_bytes(b"not decoded by a dry run")
    return root


#: (in1k keys -> paths under the temporary folder, or values) -> the error's text, or None: plans
IMAGENET_LAYOUTS = {
    "train folder alone": ({"input": "sorted/train"}, "config key datasets.in1k.test_input is not set, and "),
    "train tar of class tars alone": ({"input": "train.tar"}, "config key datasets.in1k.test_input is not set"),
    "flat val without labels": ({"input": "flat/train", "test_input": "flat/val"},
                                "config key datasets.in1k.test_labels is not set, but "),
    "flat val with labels": ({"input": "flat/train", "test_input": "flat/val", "test_labels": "labels.txt"}, None),
    "sorted val": ({"input": "sorted/train", "test_input": "sorted/val"}, None),
    "folder holding train and val": ({"input": "sorted"}, None),
    "hold-out": ({"input": "sorted/train", "test_fraction": 0.5}, None),
}


@pytest.mark.parametrize("layout", list(IMAGENET_LAYOUTS))
def test_imagenet_inputs_that_need_each_other_are_checked_before_any_job(plain_workdir, tmp_path, layout):
    """An ImageNet entry whose input has no test split and no test_input (or whose flat test
    folder has no labels) fails before any job, naming the key to set; complete layouts plan."""
    _imagenet_tree(tmp_path / "sorted")
    _imagenet_tree(tmp_path / "flat", flat_val=True)
    (tmp_path / "labels.txt").write_text("val_n00000001.JPEG n00000001\nval_n00000002.JPEG n00000002\n")
    with tarfile.open(tmp_path / "train.tar", "w") as outer:
        for wnid in ("n00000001", "n00000002"):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                inner.add(tmp_path / "sorted" / "train" / wnid / f"{wnid}_1.JPEG", arcname=f"{wnid}_1.JPEG")
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))
    keys, error = IMAGENET_LAYOUTS[layout]
    entry = {k: (str(tmp_path / v) if isinstance(v, str) else v) for k, v in keys.items()}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({"datasets": {"in1k": entry}}))
    result = snakemake(plain_workdir, "results/in1k_ipc1/acc.csv", "--dry-run", "--cores", "1", "--configfile",
                       str(tmp_path / "site.yaml"))
    text = result.stdout + result.stderr
    if error is None:
        assert result.returncode == 0, text
        assert "resources/in1k/train.h5" in text
    else:
        assert result.returncode != 0 and error in text, text
        assert "datasets.in1k.test_fraction" in text or "LOC_val_solution.csv" in text  # the way out
    assert not (plain_workdir / "results").exists()


def test_unset_paths_of_datasets_not_requested_do_not_matter(plain_workdir):
    # in1k, cifar10, ... have no path in the shipped config, yet the demo plans fine
    jobs = dry_run(plain_workdir, None, "results/demo_ipc1/acc.csv")
    assert "prepare" in jobs


def test_unconfigured_ipc_is_refused_with_the_key_to_add(plain_workdir):
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "results/demo_ipc7/acc.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.demo.distill.7" in text


# --------------------------------------------------------------------------------------
# (b) rerun only what changed
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[Path, Path]:
    """The demo workflow executed once with the stand-in tesla (records Snakemake's metadata)."""
    base = tmp_path_factory.mktemp("wf-executed")
    workdir = make_workdir(base / "work")
    fake = install_fake_tesla(base / "bin")
    result = snakemake(workdir, "--cores", "2", path_prefix=fake)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "results" / "demo_ipc1" / "acc.csv").exists()
    return workdir, fake


def _edited(workdir: Path, change) -> dict:
    cfg = load_config(workdir)
    change(cfg)
    return cfg


def test_editing_nothing_reruns_nothing(executed):
    workdir, _ = executed
    assert dry_run(workdir) == {}
    # the same config written out again (other key order, same values) changes nothing either
    assert dry_run(workdir, load_config(workdir)) == {}


def test_one_ipc_distill_setting_reruns_that_distillation_and_its_evaluations(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    archs = cfg["datasets"]["demo"]["evaluate"]["architectures"]
    ipc = sorted(cfg["datasets"]["demo"]["distill"])[-1]

    def change(c):
        c["datasets"]["demo"]["distill"][ipc]["lr_img"] *= 2

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"distill", "evaluate_synthetic", "results", "report"}
    run = f"results/demo_ipc{ipc}"
    assert jobs["distill"] == {f"{run}/exact/synthetic.h5", f"{run}/exact/metrics.csv", f"{run}/exact/grids"}
    assert jobs["evaluate_synthetic"] == {f"{run}/eval/exact_{a}.csv" for a in archs}
    assert jobs["results"] == {f"results/demo_ipc{ipc}/acc.csv"}


def test_expert_setting_reruns_experts_and_everything_downstream(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    demo = cfg["datasets"]["demo"]

    def change(c):
        c["datasets"]["demo"]["experts"]["lr"] *= 2

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"expert", "distill", "evaluate_synthetic", "results", "report"}
    assert len(jobs["expert"]) == demo["experts"]["count"]
    assert len(jobs["results"]) == len(demo["distill"])
    assert len(jobs["evaluate_synthetic"]) == len(demo["distill"]) * len(demo["evaluate"]["architectures"])
    # neither the data nor the random-image baselines depend on the experts


def test_adding_an_architecture_runs_only_its_evaluations(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    ipcs = sorted(cfg["datasets"]["demo"]["distill"])

    def change(c):
        c["datasets"]["demo"]["evaluate"]["architectures"].append("vgg11_bn")  # (vgg11 cannot take 8 px)

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}
    assert jobs["evaluate_synthetic"] == {f"results/demo_ipc{i}/eval/exact_vgg11_bn.csv" for i in ipcs}
    assert jobs["evaluate_random"] == {f"results/demo_ipc{i}/eval/random_vgg11_bn.csv" for i in ipcs}


def test_adding_an_expert_trains_only_it_and_redoes_what_uses_the_pool(executed):
    workdir, _ = executed
    count = load_config(workdir)["datasets"]["demo"]["experts"]["count"]

    def change(c):
        c["datasets"]["demo"]["experts"]["count"] = count + 1

    jobs = dry_run(workdir, _edited(workdir, change))
    assert jobs["expert"] == {f"results/demo/experts/split/expert_{count}.h5"}
    assert "prepare" not in jobs and "evaluate_random" not in jobs


def test_evaluation_protocol_change_reruns_evaluations_only(executed):
    workdir, _ = executed

    def change(c):
        c["datasets"]["demo"]["evaluate"]["epochs"] += 1

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}


def test_settings_that_do_not_change_results_rerun_nothing(executed):
    workdir, _ = executed

    def change(c):
        c["device"] = "cpu"  # where it runs, not what it computes
        c["datasets"]["demo"]["distill"][1]["checkpoint_every"] += 7
        c["datasets"]["demo"]["evaluate"]["checkpoint_every"] = 60  # how often an evaluation saves its state
        c["datasets"]["mnist"]["experts"]["epochs"] += 1  # another dataset
        c["datasets"]["in1k"]["distill"][50]["lr_img"] = 500

    assert dry_run(workdir, _edited(workdir, change)) == {}


def test_summary_names_the_changed_params(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    ipc = sorted(cfg["datasets"]["demo"]["distill"])[0]
    cfg["datasets"]["demo"]["distill"][ipc]["iterations"] += 1
    write_config(workdir, cfg, "edited.yaml")
    result = snakemake(workdir, "--summary", "--cores", "1", "--configfile", "edited.yaml")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"results/demo_ipc{ipc}/exact/synthetic.h5")]
    assert lines and "params" in lines[0], result.stdout
    others = [line for line in result.stdout.splitlines() if line.startswith("results/demo/experts/split/expert_0.h5")]
    assert others and "ok" in others[0], result.stdout


def test_distill_advice_speaks_in_config_keys_and_guard_limits_rerun_nothing(executed):
    workdir, _ = executed
    # the stand-in tesla wrote its command line into the output
    command = (workdir / "results" / "demo_ipc1" / "exact" / "synthetic.h5").read_text()
    assert "--config-key-prefix datasets.demo.distill.1 " in command
    assert "--checkpoint-dir results/demo_ipc1/exact " in command  # tesla names the checkpoint in it
    assert "--max-lr" not in command  # null in the config: tesla's defaults

    def change(c):
        c["datasets"]["demo"]["distill"][1].update(max_lr=0.5, max_image_growth=50, max_loss=20)

    assert dry_run(workdir, _edited(workdir, change)) == {}  # limits decide when a run stops, not its result
    result = snakemake(
        workdir, "results/demo_ipc1/exact/synthetic.h5", "--forcerun", "distill", "--dry-run", "--printshellcmds",
        "--cores", "1", "--configfile", "edited.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--max-lr 0.5 --max-image-growth 50 --max-loss 20 " in result.stdout


# --------------------------------------------------------------------------------------
# (d) input spaces, engines, method versions
# --------------------------------------------------------------------------------------
def _shell_commands(workdir: Path, cfg: dict, *targets: str) -> str:
    write_config(workdir, cfg, "edited.yaml")
    result = snakemake(workdir, *targets, "--dry-run", "--printshellcmds", "--cores", "1", "--configfile", "edited.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rows_of_one_input_space_share_experts_and_others_get_their_own(plain_workdir):
    """The published protocol switches ZCA per row: a row with another normalisation or ZCA
    trains its own experts (in a folder named by its input space), fitted ZCA included; rows of
    one space share theirs; the random baseline sees the inputs of its row's experts."""
    cfg = load_config(plain_workdir)
    demo = cfg["datasets"]["demo"]
    demo["distill"][1].update(normalize="none", zca=True)
    demo["distill"][3]["normalize"] = "split"  # = the dataset's: shares the default pool
    demo["distill"][5] = dict(demo["distill"][3], normalize="none", zca=False)
    text = _shell_commands(plain_workdir, cfg, *(f"results/demo_ipc{i}/acc.csv" for i in (1, 3, 5)))
    jobs = planned_jobs(text)
    count = demo["experts"]["count"]
    pools = {"none+zca-eps0.1", "split", "none"}
    assert jobs["expert"] == {f"results/demo/experts/{p}/expert_{k}.h5" for p in pools for k in range(count)}
    assert jobs["zca"] == {"resources/demo/zca_none.h5"}
    assert "tesla zca --train resources/demo/train.h5 --out resources/demo/zca_none.h5 --normalize none --eps 0.1" in text
    lines = text.splitlines()
    zca_expert = next(line for line in lines if "--out results/demo/experts/none+zca-eps0.1/expert_0.h5" in line)
    assert "--zca resources/demo/zca_none.h5" in zca_expert and "--normalize" not in zca_expert  # the file fixes it
    plain_expert = next(line for line in lines if "--out results/demo/experts/none/expert_0.h5" in line)
    assert "--normalize none" in plain_expert and "--zca" not in plain_expert
    split_expert = next(line for line in lines if "--out results/demo/experts/split/expert_0.h5" in line)
    assert "--normalize" not in split_expert and "--zca" not in split_expert
    distill_1 = next(line for line in lines if "tesla distill " in line and "demo_ipc1/" in line)
    assert "results/demo/experts/none+zca-eps0.1/expert_0.h5" in distill_1 and "--zca resources/demo/zca_none.h5" in distill_1
    random_1 = next(line for line in lines if "--random" in line and "demo_ipc1/" in line)
    assert "--normalize none" in random_1 and "--zca resources/demo/zca_none.h5" in random_1
    random_5 = next(line for line in lines if "--random" in line and "demo_ipc5/" in line)
    assert "--normalize none" in random_5 and "--zca" not in random_5


def test_a_row_with_two_engines_distils_two_sets_from_the_same_experts(plain_workdir):
    cfg = load_config(plain_workdir)
    demo = cfg["datasets"]["demo"]
    demo["distill"][1].update(engine=["exact", "tesla"], lr_img_convention="tesla-published")
    text = _shell_commands(plain_workdir, cfg, "results/demo_ipc1/acc.csv")
    jobs = planned_jobs(text)
    base = "results/demo_ipc1"
    assert {f for f in jobs["distill"] if f.endswith("synthetic.h5")} == {f"{base}/exact/synthetic.h5", f"{base}/tesla/synthetic.h5"}
    archs = demo["evaluate"]["architectures"]
    assert jobs["evaluate_synthetic"] == {f"{base}/eval/{e}_{a}.csv" for e in ("exact", "tesla") for a in archs}
    distills = [line for line in text.splitlines() if "tesla distill " in line]
    assert len(distills) == 2 and all("--lr-img-convention tesla-published" in line for line in distills)
    assert {line.split("--engine ")[1].split()[0] for line in distills} == {"exact", "tesla"}
    experts = [sorted(w for w in line.split() if "/experts/" in w) for line in distills]
    assert experts[0] == experts[1]  # the same expert pool
    results = next(line for line in text.splitlines() if "tesla results " in line)
    assert all(f"{base}/eval/{e}_{a}.csv" in results for e in ("exact", "tesla", "random") for a in archs)


def _dry_run_after(patch: str, workdir: Path, tmp_path: Path) -> dict[str, set[str]]:
    """A dry run whose Snakemake first runs `patch` (a sitecustomize on its PYTHONPATH), as a
    new release of the package would change it."""
    (tmp_path / "sitecustomize.py").write_text(patch)
    import os

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *([old] if old else [])])
    try:
        return dry_run(workdir)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def test_a_new_method_version_reruns_that_stage_and_what_follows(executed, tmp_path):
    """tesla.registries.METHOD_VERSIONS is a param of every job: a bumped version (here of
    `evaluate`) reruns the evaluations and the tables, nothing before them."""
    workdir, _ = executed
    jobs = _dry_run_after("import tesla.registries as r\nr.METHOD_VERSIONS['evaluate'] += 1\n", workdir, tmp_path)
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}


def test_a_new_network_version_reruns_only_the_jobs_that_train_it(executed, tmp_path):
    """A network whose construction changed (tesla.models.model_version, here convnet_d2, one of
    the demo's evaluation architectures) reruns its evaluations and the tables; the other
    architecture's evaluations, the experts and the distillations stay."""
    workdir, _ = executed
    patch = ("import dataclasses, tesla.models as m\n"
             "m._REGISTRY['convnet_d2'] = dataclasses.replace(m._REGISTRY['convnet_d2'], version=2)\n")
    jobs = _dry_run_after(patch, workdir, tmp_path)
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}
    evaluated = jobs["evaluate_synthetic"] | jobs["evaluate_random"]
    assert evaluated and all(f.endswith("_convnet_d2.csv") for f in evaluated), evaluated
    patch = patch.replace("convnet_d2", "convnet_d1")  # the experts' network: everything after prepare
    assert {"expert", "distill", "evaluate_synthetic", "results"} <= set(dry_run_after := _dry_run_after(patch, workdir, tmp_path))
    assert "prepare" not in dry_run_after


def test_the_workflow_passes_snakemake_lint(plain_workdir):
    result = snakemake(plain_workdir, "--lint", "--cores", "1")
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# several experts per job; the evaluation's momentum restart and arithmetic
# --------------------------------------------------------------------------------------
def _per_job(cfg: dict, per_job: int) -> dict:
    cfg["datasets"]["demo"]["experts"]["per_job"] = per_job
    return cfg


def test_experts_per_job_trains_each_group_in_one_command(plain_workdir):
    cfg = _per_job(load_config(plain_workdir), 2)
    count = cfg["datasets"]["demo"]["experts"]["count"]
    text = _shell_commands(plain_workdir, cfg, "results/demo_ipc1/acc.csv")
    jobs = planned_jobs(text)
    assert "expert" not in jobs
    groups = [list(range(k, min(k + 2, count))) for k in range(0, count, 2)]
    assert {rule: files for rule, files in jobs.items() if rule.startswith("expert_group_")} == {
        f"expert_group_demo_split_{g[0]}": {f"results/demo/experts/split/expert_{k}.h5" for k in g} for g in groups
    }
    for g in groups:
        outs = " ".join(f"results/demo/experts/split/expert_{k}.h5" for k in g)
        line = next(line for line in text.splitlines() if f"--out {outs} " in line)
        assert f"--seed {' '.join(map(str, g))} " in line and "tesla experts " in line


def test_regrouping_experts_reruns_nothing_and_options_reach_the_commands(executed):
    """The experts were trained one per job: grouping them, or choosing how a group or the
    evaluation runs train together, reruns nothing; arithmetic and the momentum restart
    are settings of the results and rerun what they change."""
    workdir, _ = executed
    assert dry_run(workdir, _per_job(load_config(workdir), 2)) == {}

    def how(c):
        c["datasets"]["demo"]["experts"]["group_mode"] = "vmap"
        c["datasets"]["demo"]["evaluate"]["group_mode"] = "streams"

    assert dry_run(workdir, _edited(workdir, how)) == {}

    def momentum(c):
        c["datasets"]["demo"]["evaluate"]["reset_momentum_at_decay"] = True

    assert set(dry_run(workdir, _edited(workdir, momentum))) == {"evaluate_synthetic", "evaluate_random", "results"}
    text = _shell_commands(workdir, _edited(workdir, lambda c: (how(c), momentum(c))), "--forceall")
    evaluations = [line for line in text.splitlines() if "tesla evaluate " in line]
    assert evaluations and all("--reset-momentum-at-decay" in line and "--group-mode streams" in line for line in evaluations)
    for line in evaluations:  # each job its own checkpoint, beside (not among) its outputs
        out = re.search(r"--out (\S+\.csv) ", line).group(1)
        assert f"--checkpoint {out}.ckpt --checkpoint-every 300 " in line, line
    experts = [line for line in text.splitlines() if "tesla experts " in line]
    assert experts and all("--group-mode vmap" in line for line in experts)
    for line in evaluations + experts:
        _parses(line)

    def arithmetic(c):
        c["datasets"]["demo"]["experts"].update(precision="bf16", tf32=False, channels_last=True)

    jobs = dry_run(workdir, _edited(workdir, arithmetic))
    assert "expert" in jobs and "distill" in jobs
    line = next(x for x in _shell_commands(workdir, _edited(workdir, arithmetic), "--forceall").splitlines()
                if "tesla experts " in x)
    assert "--precision bf16" in line and "--no-tf32" in line and "--channels-last" in line
    _parses(line)


def _parses(line: str) -> None:
    """A generated `tesla ...` command line is one the package's parser takes."""
    import shlex

    from tesla.cli import build_parser

    words = shlex.split(line[line.index("tesla "):].split(" > ")[0])
    build_parser(only=words[1]).parse_args(words[1:])


@pytest.mark.parametrize("key, value, known", [
    ("experts.group_mode", "parallel", "sequential, streams, vmap"),
    ("evaluate.precision", "fp8", "float32, bf16"),
])
def test_unknown_group_mode_or_precision_is_refused_naming_the_key(plain_workdir, key, value, known):
    cfg = load_config(plain_workdir)
    stage, name = key.split(".")
    cfg["datasets"]["demo"][stage][name] = value
    write_config(plain_workdir, cfg, "edited.yaml")
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "--configfile", "edited.yaml")
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert f"config key datasets.demo.{key}: unknown" in log and known in log, log


def test_a_group_of_experts_asks_slurm_for_the_expert_resources_once(plain_workdir, tmp_path):
    """Under the SLURM profile a job of P experts gets `set-resources: expert:` (one GPU, its
    partition, memory, threads) and P times its runtime."""
    workdir = make_workdir(tmp_path / "wf")
    shutil.copytree(ROOT / "profiles", workdir / "profiles")
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"]["expert"]
    cfg = _per_job(load_config(workdir), 3)
    write_config(workdir, cfg, "edited.yaml")
    result = snakemake(workdir, "results/demo/experts/split/expert_1.h5", "--dry-run", "--workflow-profile",
                       "profiles/slurm", "--configfile", "edited.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"^rule expert_group_demo_split_0:\n((?:[ \t]+.*\n)+)", result.stdout, re.MULTILINE).group(1)
    resources = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", job).group(1).split(", "))
    assert resources["gpu"] == "1" and resources["slurm_partition"] == profile["slurm_partition"]
    assert int(resources["runtime"]) == 3 * profile["runtime"] and int(resources["mem_mb"]) == profile["mem_mb"]
    assert int(resources["cpus_per_task"]) == profile["cpus_per_task"]


# --------------------------------------------------------------------------------------
# beyond TESLA: learned labels, a moving window, real-correct initialisation
# --------------------------------------------------------------------------------------
def test_learned_labels_a_moving_window_and_real_correct_reach_the_command(plain_workdir):
    cfg = load_config(plain_workdir)
    demo = cfg["datasets"]["demo"]
    row = demo["distill"][1]
    row.update(soft_labels="learned", label_temperature=2.0, lr_label=5.0, min_start_epoch=1,
               max_start_epoch_final=row["max_start_epoch"] + 3, window_iterations=50, init="real-correct",
               init_expert=1)
    demo["experts"]["keep_snapshots"] = "auto"
    text = _shell_commands(plain_workdir, cfg, "results/demo_ipc1/acc.csv")
    distill = next(line for line in text.splitlines() if "tesla distill " in line and "demo_ipc1/" in line)
    for flag in ("--soft-labels learned", "--label-temperature 2.0", "--lr-label 5.0", "--min-start-epoch 1",
                 f"--max-start-epoch-final {row['max_start_epoch_final']}", "--window-iterations 50",
                 "--init real-correct", "--init-expert 1"):
        assert flag in distill, (flag, distill)
    _parses(distill)
    expert = next(line for line in text.splitlines() if "tesla experts " in line)
    needed = max(row["max_start_epoch_final"], demo["distill"][3]["max_start_epoch"]) + row["expert_epochs"]
    assert f"--keep-snapshots {min(needed, demo['experts']['epochs'])} " in expert
    # TESLA's labels, spelt the old way or the new, are the same command (nothing reruns)
    for value in (True, "tesla"):
        row.update(soft_labels=value)
        line = next(x for x in _shell_commands(plain_workdir, cfg, "results/demo_ipc1/acc.csv").splitlines()
                    if "tesla distill " in x and "demo_ipc1/" in x)
        assert " --soft-labels " in line and "--soft-labels learned" not in line and "--label-temperature" not in line


@pytest.mark.parametrize("change, message", [
    (dict(soft_labels="learnt"), "datasets.demo.distill.1.soft_labels: unknown label kind 'learnt'"),
    (dict(init="correct"), "datasets.demo.distill.1.init: unknown initialisation 'correct'"),
    (dict(max_start_epoch_final=9), "a moving window needs both max_start_epoch_final and window_iterations"),
    (dict(init_expert=99), "datasets.demo.distill.1.init_expert: 99 is not an expert of the pool"),
    (dict(min_start_epoch=4), "datasets.demo.distill.1: min_start_epoch 4 must be >= 0 and below max_start_epoch 4"),
])
def test_bad_beyond_tesla_settings_are_refused_naming_the_key(plain_workdir, change, message):
    cfg = load_config(plain_workdir)
    cfg["datasets"]["demo"]["distill"][1].update(change)
    write_config(plain_workdir, cfg, "edited.yaml")
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "--configfile", "edited.yaml")
    log = result.stdout + result.stderr
    assert result.returncode != 0 and message in log, log[-3000:]


# --------------------------------------------------------------------------------------
# live curves (config `tracking`)
# --------------------------------------------------------------------------------------
def test_switching_tracking_on_reruns_nothing_and_its_options_reach_the_training_jobs(executed):
    workdir, _ = executed

    def wandb(c):
        c["tracking"] = {"tracker": "wandb", "wandb": {"project": "distill-runs", "mode": "offline"}}

    assert dry_run(workdir, _edited(workdir, wandb)) == {}  # tracking never changes a result
    text = _shell_commands(workdir, _edited(workdir, wandb), "--forceall")
    for stage, group in (("experts", "demo_experts"), ("distill", "demo_ipc1"), ("evaluate", "demo_ipc1")):
        lines = [line for line in text.splitlines() if f"tesla {stage} " in line and (stage == "experts" or "_ipc1/" in line)]
        assert lines and all(f"--tracker wandb --tracker-dir results --tracker-project distill-runs --tracker-group {group} "
                             "--tracker-mode offline" in line for line in lines), (stage, lines)

    def tensorboard(c):
        c["tracking"] = {"tracker": "tensorboard", "tensorboard": {"dir": "runs"}}

    text = _shell_commands(workdir, _edited(workdir, tensorboard), "--forceall")
    assert "--tracker tensorboard --tracker-dir runs/demo_ipc1/exact " in text
    assert "--tracker-dir runs/demo_ipc1/eval/random_convnet_d1 " in text
    assert "--tracker" not in _shell_commands(workdir, load_config(workdir), "--forceall")  # off by default


def test_a_tracker_whose_extra_is_missing_fails_the_dry_run_naming_the_extra(plain_workdir, tmp_path, monkeypatch):
    """Snakemake's Python without the wandb package (a sitecustomize hides it)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    cfg = load_config(plain_workdir)
    cfg["tracking"] = {"tracker": "wandb"}
    write_config(plain_workdir, cfg, "edited.yaml")
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "--configfile", "edited.yaml")
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "config key tracking.tracker" in text and "pip install -e '.[wandb]'" in text, text
