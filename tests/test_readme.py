"""The README's commands, as the README writes them (read from its text, so that the test fails
when the README drifts):

* the Quick start's two commands: the demo's install puts `snakemake` on the path and runs the
  command tests/test_workflow_demo.py runs; the test command is the one `.ci/run` runs;
* the main job: every `site.yaml` of "The main job" (the official ILSVRC2012 files, Downsampled
  ImageNet, parquet shards) is written with its paths pointing at small files of that layout, and
  every `snakemake` command of the section runs as a dry run (`-n`) on them, the SLURM ones with
  the shipped SLURM profile: each plans the preparation of ImageNet-1K and the IPC 50 table;
* the main job's figures: the disk sizes follow from the `in1k` entry and the network, the
  GPU-hours are `bench/project_cost.py`'s output, the time limits the SLURM profile's.

The demo's accuracy table is checked against the workflow's own output in
tests/test_workflow_demo.py."""

from __future__ import annotations

import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from prepare_support import jpeg, pattern, write_devkit, write_shard
from workflow_support import ROOT, SNAKEMAKE, make_workdir, planned_jobs, snakemake

README = ROOT / "README.md"
#: the README's placeholder folder of the raw data, replaced by a temporary folder here
DATA = "/data/imagenet/"
#: the classes of the small files, with their ILSVRC2012 ids (not in sorted WordNet-id order)
IDS = {"n01440764": 449, "n01443537": 1, "n01484850": 391}
WNIDS = sorted(IDS)
#: the class (index into WNIDS) of validation image i + 1
VAL_CLASSES = [2, 0, 1, 1, 0, 2]


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def commands(text: str, program: str) -> list[str]:
    """The command lines of the section's bash blocks that start with `program`."""
    lines = [line.split(" #")[0].strip() for block in code_blocks(text, "bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith(program + " ")]


# --------------------------------------------------------------------------------------
# Quick start
# --------------------------------------------------------------------------------------
def quick_start() -> tuple[str, str]:
    blocks = [b.strip() for b in code_blocks(section("Quick start (a fresh machine, Python >= 3.10)"), "bash")]
    assert len(blocks) == 2, f"the Quick start has two commands, not {len(blocks)}: {blocks}"
    return blocks[0], blocks[1]


def test_the_test_command_is_the_one_ci_runs():
    _, tests = quick_start()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run does not run the README's test command {tests!r}"


def _installed_requirements(pip_target: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.fullmatch(r"\.(?:\[(.*)\])?", pip_target.strip("'\""))
    assert extras, f"the README installs {pip_target!r}, not the project"
    names = [e for e in (extras.group(1) or "").split(",") if e]
    return project["dependencies"] + [r for e in names for r in project["optional-dependencies"][e]]


def test_the_demo_command_installs_snakemake_and_runs_the_demo_as_its_test_does():
    demo, tests = quick_start()
    steps = [s.strip() for s in demo.split("&&")]
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], steps
    install = shlex.split(steps[2])
    assert install[:3] == ["pip", "install", "-e"], steps[2]
    requirements = _installed_requirements(install[3])
    assert any(re.match(r"snakemake\b(?!-)", r) for r in requirements), (
        f"the README's install ({steps[2]}) does not install snakemake, which its next step runs")
    # tests/test_workflow_demo.py runs exactly this (see its demo_run fixture)
    assert steps[3:] == ["snakemake --cores all"], steps
    assert "snakemake(workdir, \"--cores\", \"all\"" in (ROOT / "tests" / "test_workflow_demo.py").read_text()
    test_install = shlex.split(tests.split("&&")[2])
    assert any(r.startswith("pytest") for r in _installed_requirements(test_install[3]))


# --------------------------------------------------------------------------------------
# the main job: small files in each layout its site.yaml names
# --------------------------------------------------------------------------------------
def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def official_train_tar(path: Path) -> None:
    """ILSVRC2012_img_train.tar: a tar of <wnid>.tar, each holding that class's JPEGs."""
    work = path.parent / "train-classes"
    for k, wnid in enumerate(WNIDS):
        for j in range(2):
            jpeg(work / wnid / f"{wnid}_{j}.JPEG", pattern(10 * k + j), quality=90)
        with tarfile.open(work / f"{wnid}.tar", "w") as tar:
            tar.add(work / wnid, arcname=".")
    with tarfile.open(path, "w") as tar:
        for wnid in WNIDS:
            tar.add(work / f"{wnid}.tar", arcname=f"{wnid}.tar")


def official_val_tar(path: Path) -> None:
    """ILSVRC2012_img_val.tar: the flat ILSVRC2012_val_<n>.JPEG, numbered as the devkit's truth."""
    work = path.parent / "val-images"
    for i in range(1, len(VAL_CLASSES) + 1):
        jpeg(work / val_name(i), pattern(100 + i), quality=90)
    with tarfile.open(path, "w") as tar:
        for i in range(1, len(VAL_CLASSES) + 1):
            tar.add(work / val_name(i), arcname=val_name(i))


def devkit(path: Path) -> None:
    write_devkit(path.parent / "devkit-build", IDS, [IDS[WNIDS[c]] for c in VAL_CLASSES])
    shutil.move(path.parent / "devkit-build" / "ILSVRC2012_devkit_t12.tar.gz", path)


def downsampled(path: Path) -> None:
    """The Downsampled ImageNet download as extracted: <path>/Imagenet<S>_train/train_data_batch_1
    and <path>/Imagenet<S>_val/val_data, pickles of planar uint8 rows and 1-based devkit ids."""
    rng = np.random.default_rng(0)
    size = 8
    for folder, name, n in (("train", "train_data_batch_1", 12), ("val", "val_data", 6)):
        labels = [IDS[WNIDS[k % len(WNIDS)]] for k in range(n)]
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        out = path / f"Imagenet{size}_{folder}" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        obj = {"data": data, "labels": labels} | ({"mean": data.mean(axis=0)} if folder == "train" else {})
        out.write_bytes(pickle.dumps(obj))


def parquet_shards(path: Path) -> None:
    """The parquet layout: <path>/train-*.parquet and validation-*.parquet, encoded images, labels."""
    def rows(n: int, seed: int) -> list[tuple[bytes, str, int]]:
        out = []
        for k in range(n):
            buf = path.parent / f"shard-{seed}-{k}.png"
            Image.fromarray(np.asarray(pattern(seed + k))).save(buf)
            out.append((buf.read_bytes(), buf.name, k % len(WNIDS)))
        return out
    write_shard(path / "train-00000-of-00001.parquet", rows(6, 0), "struct", WNIDS)
    write_shard(path / "validation-00000-of-00001.parquet", rows(3, 50), "struct", WNIDS)


#: the file name a README path ends with -> a builder of a small file in that layout
BUILDERS = {
    "ILSVRC2012_img_train.tar": official_train_tar,
    "ILSVRC2012_img_val.tar": official_val_tar,
    "ILSVRC2012_devkit_t12.tar.gz": devkit,
    "Imagenet64": downsampled,
    "data": parquet_shards,
}


def main_job() -> str:
    return section("The main job: ImageNet-1K at IPC 50")


def site_configs() -> dict[str, str]:
    """The main job's site.yaml files: their first comment line -> the YAML text."""
    blocks = [b for b in code_blocks(main_job(), "yaml") if b.startswith("# site.yaml")]
    assert len(blocks) == 3, f"the README shows {len(blocks)} site.yaml files, the test expects three layouts"
    return {b.splitlines()[0]: b for b in blocks}


def build_layout(text: str, data: Path) -> dict:
    """The site config with the README's data folder replaced by `data`, where small files in
    the layout of every path it names are built."""
    entry = yaml.safe_load(text)["datasets"]["in1k"]
    for key, value in entry.items():
        if isinstance(value, str) and value.startswith(DATA):
            name = Path(value).name
            assert name in BUILDERS, f"the README's site.yaml names {value} ({key}); this test builds {sorted(BUILDERS)}"
            path = data / value[len(DATA):]
            path.parent.mkdir(parents=True, exist_ok=True)
            BUILDERS[name](path)
            entry[key] = str(path)
    return {"datasets": {"in1k": entry}}


@pytest.fixture(scope="module")
def main_job_workdir(tmp_path_factory) -> Path:
    workdir = make_workdir(tmp_path_factory.mktemp("readme-main-job"))
    shutil.copytree(ROOT / "profiles", workdir / "profiles")
    return workdir


def dry_runs(slurm: bool) -> list[list[str]]:
    """The section's snakemake commands (with or without the SLURM profile) as dry runs, each
    plan once: a command and its `-n` check plan the same jobs."""
    runs = []
    for command in commands(main_job(), "snakemake"):
        if ("--workflow-profile" in command) != slurm:
            continue
        args = [a for a in shlex.split(command)[1:] if a not in ("-n", "--dry-run")]
        if "--cores" in args:  # a dry run uses no cores
            del args[args.index("--cores"):args.index("--cores") + 2]
        if ["-n", *args] not in runs:
            runs.append(["-n", *args])
    assert runs, f"the main job shows no snakemake command {'with' if slurm else 'without'} the SLURM profile"
    return runs


def test_the_main_job_commands_are_the_ones_checked_here():
    lines = commands(main_job(), "snakemake")
    assert any("--workflow-profile profiles/slurm" in c for c in lines), lines
    for line in lines:
        assert "results/in1k_ipc50/acc.csv" in line and "--configfile site.yaml" in line, line


def check_plans(workdir: Path, runs: list[list[str]], what: str) -> None:
    for args in runs:
        result = snakemake(workdir, *args, timeout=180)
        text = result.stdout + result.stderr
        assert result.returncode == 0, f"{what}\nsnakemake {' '.join(args)}\n{text[-4000:]}"
        jobs = planned_jobs(text)
        assert "resources/in1k/train.h5" in jobs.get("prepare", set()), (args, sorted(jobs))
        assert "results/in1k_ipc50/acc.csv" in jobs.get("results", set()), (args, sorted(jobs))
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")
@pytest.mark.parametrize("layout", sorted(site_configs()))
def test_main_job_commands_plan_imagenet_from_each_layout(main_job_workdir, tmp_path, layout):
    site = build_layout(site_configs()[layout], tmp_path / "data")
    (main_job_workdir / "site.yaml").write_text(yaml.safe_dump(site))
    check_plans(main_job_workdir, dry_runs(slurm=False), layout)


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")
def test_slurm_commands_plan_imagenet_with_the_shipped_profile(main_job_workdir, tmp_path):
    """The profile's own checks (sbatch --test-only) run only when jobs are submitted: a dry run
    needs no cluster. The first layout stands for all (the data is the same for either profile)."""
    first = site_configs()[next(iter(site_configs()))]
    (main_job_workdir / "site.yaml").write_text(yaml.safe_dump(build_layout(first, tmp_path / "data")))
    check_plans(main_job_workdir, dry_runs(slurm=True), "the SLURM profile")


# --------------------------------------------------------------------------------------
# the main job's figures
# --------------------------------------------------------------------------------------
def _in1k() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["datasets"]["in1k"]


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def test_disk_figures_follow_from_the_config_and_the_network():
    from tesla.models import build_model

    text, entry = main_job(), _in1k()
    train_images, test_images, side = 1_281_167, 50_000, entry["resolution"]
    image = side * side * 3
    params = sum(p.numel() for p in build_model(entry["model"], channels=3, num_classes=1000, resolution=side).parameters())
    last = max(row["max_start_epoch"] + row["expert_epochs"] for row in entry["distill"].values())
    count, ipc = entry["experts"]["count"], 50
    expected = {
        "train split": (f"{train_images:,}", _gb(train_images * image)),
        "test split": (f"{test_images:,}", _gb(test_images * image)),
        "experts": (f"{count} expert trajectories: {last + 1} snapshots (epochs 0 to {last}) of {params:,} float32",
                    _gb(count * (last + 1) * params * 4)),
        "distilled set": (f"{ipc * 1000:,} float32 images", _gb(ipc * 1000 * image * 4)),
    }
    for what, needles in expected.items():
        for needle in needles:
            assert needle in text, f"README, main job, {what}: expected {needle!r}"


def test_time_figures_are_the_projection_and_the_profiles_limits():
    text = main_job()
    command = next(c for c in re.findall(r"`(python bench/project_cost\.py[^`]*)`", text))
    out = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    hours = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \|[^|]*\| ([0-9.]+) \|", out.stdout, re.MULTILINE)}
    total = re.search(r"\*\*total on the GPU\*\* \|[^|]*\| \*\*([0-9.]+)\*\*", out.stdout).group(1)
    longest = re.search(r"the longest job: (\w+), ([0-9.]+) h", out.stdout)
    assert f"{hours['prepare']} CPU-hours" in text
    for stage in ("experts", "distill"):
        assert re.search(rf"^\| {stage} \|[^|]*\| {re.escape(hours[stage])} GPU-hours", text, re.MULTILINE), stage
    assert f"{hours['evaluate']} GPU-hours in all" in text
    assert f"**{total} GPU-hours**" in text
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    assert f"about {words[round(float(total) / 24)]} days of wall time" in text  # on one GPU
    assert f"the longest: ResNet-18, {longest.group(2)} h" in text and longest.group(1) == "resnet18"
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    limits = profile["set-resources"]
    for stage, rule in (("prepare", "prepare"), ("experts", "expert"), ("distill", "distill"), ("evaluate", "evaluate_synthetic")):
        assert re.search(rf"^\| {stage} \|.*\| {limits[rule]['runtime']} min", text, re.MULTILINE), (stage, limits[rule])
    assert limits["evaluate_random"]["runtime"] == limits["evaluate_synthetic"]["runtime"]
    retries = profile["retries"]
    assert f"up to {retries + 1}" in text and f"{limits['evaluate_synthetic']['runtime'] * (retries + 1) // 60} hours" in text


def test_the_ipc50_settings_the_readme_states_are_the_configs():
    text, entry = main_job(), _in1k()
    row, experts, evaluate = entry["distill"][50], entry["experts"], entry["evaluate"]
    stated = re.search(r"\*\*IPC 50 on\s+ImageNet-1K is not\*\*: its row \((.*?)\)", text, re.DOTALL).group(1)
    values = dict(re.findall(r"(\w+) ([0-9.e-]+)", stated.replace("\n", " ")))
    for key in ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_teacher", "batch_syn"):
        assert float(values[key]) == float(row[key]), (key, values[key], row[key])
    engines = row.get("engine", "exact")  # the schema's default when the row names none
    engines = [engines] if isinstance(engines, str) else engines
    assert f"{row['iterations']:,} iterations" in stated and " ".join(f"`{e}`" for e in engines) in stated
    assert f"{experts['count']} ConvNetD4 experts (SGD, lr {experts['lr']}, batch {experts['batch_size']})" in text
    assert entry["model"] == "convnet_d4" and row["soft_labels"] == "tesla"
    assert (f"({evaluate['epochs']} epochs, lr x0.1 from epoch {evaluate['lr_decay_epoch']}, {evaluate['runs']} networks)"
            in text)
    names = {"convnet_d4": "ConvNetD4", "resnet18": "ResNet-18", "vgg11": "VGG-11", "alexnet": "AlexNet"}
    stated_archs = ", ".join(names[a] for a in evaluate["architectures"][:-1]) + f"\nand {names[evaluate['architectures'][-1]]}"
    assert stated_archs in text or stated_archs.replace("\n", " ") in text, stated_archs


def test_the_published_cifar10_numbers_are_those_the_reproduction_compares_with():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from reproduce_published import PAPER
    finally:
        sys.path.remove(str(ROOT / "bench"))
    row = next(line for line in README.read_text().splitlines() if line.startswith("| CIFAR-10 (ConvNet-3) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ipcs = [int(i) for i in cells[1].split(" / ")]
    for column, method in ((2, "TESLA"), (3, "MTT")):
        assert cells[column].split(" / ") == [PAPER[i][method] for i in ipcs], (method, cells[column])


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_readme_and_the_docs_resolve():
    pages = [README, ROOT / "config" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.MULTILINE)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
