# Helpers shared by the rules: config validation, wildcard constraints, the command-line
# options each stage receives, and the early check of raw-data paths.
#
# Rule parameters are the *command-line options* of a stage, built here as one string in a
# fixed order. Snakemake records them with every output it writes and reruns a job when
# they change (the default rerun triggers include `params`), so each rule gets exactly the
# settings that matter to it: a change reruns that job and everything downstream, nothing
# else.

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
CONFIG_FILE_HINT = "config/config.yaml (or a file given with --configfile)"

try:
    # the data sources of `tesla prepare` (their config keys, command line and accepted
    # layouts) are declared once, in the package
    from tesla.data.sources import workflow as data_sources
except ImportError as exc:
    raise WorkflowError(
        f"the tesla package is not importable by this Snakemake ({exc}); install it in the same "
        "environment (pip install -e . from the project root, or conda env create -f envs/tesla.yaml)"
    ) from None


# --------------------------------------------------------------------------------------
# configuration: normalise, validate, cross-check
# --------------------------------------------------------------------------------------
def _config_key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_errors(cfg) -> list[str]:
    """Every schema violation as 'config key <dotted.path>: <problem>', sorted by key."""
    import jsonschema

    with open(SCHEMA) as fh:
        schema = yaml.safe_load(fh)
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for err in sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path]):
        what = err.message
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = list(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(allowed), key=str):
                lines.append(
                    f"config key {_config_key(list(err.absolute_path) + [extra])}: unknown key "
                    f"(allowed here: {', '.join(allowed)})"
                )
            continue
        if "propertyNames" in err.schema_path:
            lines.append(
                f"config key {_config_key(list(err.absolute_path) + [err.instance])}: invalid key name, "
                f"{err.message} ({err.schema.get('description', 'see the schema')})"
            )
            continue
        elif err.schema.get("description"):
            what = f"{err.message} ({err.schema['description']})"
        lines.append(f"config key {_config_key(err.absolute_path)}: {what}")
    return lines


def _normalise_ipc_keys(cfg) -> None:
    """YAML reads `distill: {1: ...}` with integer keys; JSON schema needs string keys."""
    for ds in (cfg.get("datasets") or {}).values():
        if isinstance(ds, dict) and isinstance(ds.get("distill"), dict):
            ds["distill"] = {str(k): v for k, v in ds["distill"].items()}


def _cross_checks(cfg) -> list[str]:
    """Rules the schema cannot express: references between keys."""
    problems = []
    names = set(cfg["datasets"])
    for name, ds in cfg["datasets"].items():
        problems += data_sources.unused_keys(ds, f"datasets.{name}")
    for name in cfg["default_datasets"]:
        if name not in names:
            problems.append(
                f"config key default_datasets: '{name}' is not a configured dataset "
                f"(configured: {', '.join(sorted(names))})"
            )
    for name, ds in cfg["datasets"].items():
        ex = ds["experts"]
        kept = ex["keep_snapshots"] if ex["keep_snapshots"] is not None else ex["epochs"]
        if kept > ex["epochs"]:
            problems.append(
                f"config key datasets.{name}.experts.keep_snapshots: {kept} is more than the "
                f"{ex['epochs']} epochs trained (datasets.{name}.experts.epochs)"
            )
        for ipc, d in ds["distill"].items():
            need = d["max_start_epoch"] + d["expert_epochs"]
            if need > kept:
                key = "keep_snapshots" if ex["keep_snapshots"] is not None else "epochs"
                problems.append(
                    f"config key datasets.{name}.distill.{ipc}: max_start_epoch + expert_epochs = {need} "
                    f"needs expert snapshots up to epoch {need}, but datasets.{name}.experts.{key} is {kept}; "
                    f"raise it or lower max_start_epoch"
                )
    return problems


def load_and_validate_config(cfg) -> None:
    """Validate `config` against workflow/schemas/config.schema.yaml (filling defaults).

    Fails before any job with every problem listed as `config key a.b.c: problem`.
    """
    _normalise_ipc_keys(cfg)
    try:
        validate(cfg, str(SCHEMA))
    except WorkflowError:
        problems = _schema_errors(cfg) or ["(see the schema)"]
        raise WorkflowError(
            f"invalid configuration in {CONFIG_FILE_HINT}; the schema is {SCHEMA}:\n  "
            + "\n  ".join(problems)
        ) from None
    problems = _cross_checks(cfg)
    if problems:
        raise WorkflowError(f"invalid configuration in {CONFIG_FILE_HINT}:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------
# the `tesla` command
# --------------------------------------------------------------------------------------
def _put_tesla_on_path() -> None:
    """Rules call `tesla`. When snakemake runs from a virtual environment that was not
    activated (`.venv/bin/snakemake ...`), that environment's bin folder is not on PATH:
    add it, so the jobs use the tesla installed beside this snakemake."""
    if shutil.which("tesla"):
        return
    here = Path(sys.executable).parent
    if (here / "tesla").exists():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


# --------------------------------------------------------------------------------------
# lookups
# --------------------------------------------------------------------------------------
def dataset_cfg(name: str) -> dict:
    try:
        return config["datasets"][name]
    except KeyError:
        raise WorkflowError(
            f"dataset '{name}' is not configured; add it under datasets: in {CONFIG_FILE_HINT} "
            f"(configured: {', '.join(sorted(config['datasets']))})"
        ) from None


def configured_ipcs(name: str) -> list[int]:
    return sorted(int(k) for k in dataset_cfg(name)["distill"])


def distill_cfg(name: str, ipc) -> dict:
    settings = dataset_cfg(name)["distill"].get(str(int(ipc)))
    if settings is None:
        raise WorkflowError(
            f"no distillation settings for dataset '{name}' at IPC {int(ipc)}: add them as "
            f"datasets.{name}.distill.{int(ipc)} in {CONFIG_FILE_HINT} "
            f"(configured IPCs: {', '.join(map(str, configured_ipcs(name)))})"
        )
    return settings


def expert_files(wildcards) -> list[str]:
    n = dataset_cfg(wildcards.dataset)["experts"]["count"]
    return [f"experts/{wildcards.dataset}/expert_{k}.h5" for k in range(n)]


def zca_input(wildcards) -> list[str]:
    """data/<dataset>/zca.h5 when ZCA is on for this dataset, else nothing."""
    return [f"data/{wildcards.dataset}/zca.h5"] if dataset_cfg(wildcards.dataset)["zca"] else []


def zca_option(wildcards, input) -> str:
    return f"--zca {input.zca}" if input.get("zca") else ""


def _opt(name: str, value) -> str:
    return f"--{name} {value}"


# --------------------------------------------------------------------------------------
# raw data check (runs while the DAG is built, i.e. only for datasets actually requested)
# --------------------------------------------------------------------------------------
def _resolve(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def raw_data_problems(name: str) -> list[str]:
    """The missing raw-data paths of a dataset, the layouts its source accepts and how to
    set them (the paths each source takes come from tesla.data.sources)."""
    problems = data_sources.raw_data_problems(dataset_cfg(name), f"datasets.{name}", _resolve)
    if problems:
        problems.append(
            f"set the path(s) in {CONFIG_FILE_HINT}, e.g. a file my.yaml holding\n"
            f"      datasets: {{{name}: {{input: /path/to/data}}}}\n"
            f"    and run snakemake <target> --configfile my.yaml"
        )
    return problems


def check_raw_data(wildcards) -> list:
    """Input function of rule prepare: fail at DAG-building time when the raw data of a
    *requested* dataset is missing, unless its prepared splits already exist."""
    name = wildcards.dataset
    if all(Path(f"data/{name}/{split}.h5").exists() for split in ("train", "test")):
        return []
    problems = raw_data_problems(name)
    if problems:
        raise WorkflowError(
            f"cannot prepare dataset '{name}' (needed for the requested targets):\n  " + "\n  ".join(problems)
        )
    return []


# --------------------------------------------------------------------------------------
# stage options (the rules' params)
# --------------------------------------------------------------------------------------
def prepare_options(wildcards) -> str:
    """`tesla prepare` options of a dataset entry, generated from the data sources' declarations
    (defaults left implicit as before, so existing datasets are not re-prepared)."""
    return data_sources.prepare_command(dataset_cfg(wildcards.dataset), wildcards.dataset, _resolve)


def zca_options(wildcards) -> str:
    return _opt("eps", dataset_cfg(wildcards.dataset)["zca_eps"])


def expert_options(wildcards) -> str:
    """Everything that shapes one expert trajectory (not `count`: adding experts must not
    retrain the existing ones)."""
    ds = dataset_cfg(wildcards.dataset)
    ex = ds["experts"]
    opts = [
        _opt("model", ds["model"]),
        _opt("epochs", ex["epochs"]),
        _opt("lr", ex["lr"]),
        _opt("batch-size", ex["batch_size"]),
        _opt("dsa", ex["dsa"]),
        _opt("dtype", ex["dtype"]),
        _opt("seed", config["seed"] + int(wildcards.k)),
    ]
    if ex["keep_snapshots"] is not None:
        opts.append(_opt("keep-snapshots", ex["keep_snapshots"]))
    return " ".join(opts)


def distill_options(wildcards) -> str:
    """The settings of one (dataset, IPC) distillation and nothing else."""
    d = distill_cfg(wildcards.dataset, wildcards.ipc)
    opts = [
        _opt("ipc", int(wildcards.ipc)),
        _opt("syn-steps", d["syn_steps"]),
        _opt("expert-epochs", d["expert_epochs"]),
        _opt("max-start-epoch", d["max_start_epoch"]),
        _opt("lr-img", d["lr_img"]),
        _opt("lr-lr", d["lr_lr"]),
        _opt("lr-teacher", d["lr_teacher"]),
        _opt("iterations", d["iterations"]),
        _opt("engine", d["engine"]),
        _opt("seed", config["seed"]),
    ]
    if d["dsa"] is not None:
        opts.append(_opt("dsa", d["dsa"]))
    if d["batch_syn"] is not None:
        opts.append(_opt("batch-syn", d["batch_syn"]))
    if d["soft_labels"]:
        opts.append("--soft-labels")
    return " ".join(opts)


def distill_checkpoint(wildcards, output) -> str:
    """Checkpoint path of one distillation, beside its output and named by a digest of its
    settings and of its experts' settings: a job killed half-way resumes from it when rerun
    unchanged, a rerun with other settings (or other experts) starts afresh. The rule
    removes it when the job succeeds. (A function of `output`, so Snakemake counts it as
    derived from the files, not as a setting that triggers reruns.)"""
    ds = dataset_cfg(wildcards.dataset)
    key = repr((distill_options(wildcards), expert_options_for_digest(ds), ds["experts"]["count"], ds["zca"]))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return str(Path(output.synthetic).parent / f"checkpoint-{digest}.pt")


def job_device(wildcards, resources) -> str:
    """The device a training job runs on (config `device`). Where a job runs does not
    change what it computes, so, as a function of the job's `resources`, Snakemake does
    not count it among the settings whose change triggers a rerun."""
    return DEVICE


def distill_checkpoint_every(wildcards, output) -> int:
    """How often to checkpoint: does not change the result, so (as a function of `output`)
    it is not a rerun trigger."""
    return distill_cfg(wildcards.dataset, wildcards.ipc)["checkpoint_every"]


def distill_guard_options(wildcards, output) -> str:
    """The divergence guard's limits (max_lr, max_image_growth, max_loss; left out when null:
    tesla's defaults) and the wording of its advice: config keys under
    datasets.<dataset>.distill.<ipc>. They decide when a run stops, not what it computes, so
    (as a function of `output`) they are not a rerun trigger and not part of the checkpoint's
    name: after a stop, raising a limit resumes the run from its checkpoint."""
    d = distill_cfg(wildcards.dataset, wildcards.ipc)
    opts = [_opt("config-key-prefix", f"datasets.{wildcards.dataset}.distill.{int(wildcards.ipc)}")]
    for key in ("max_lr", "max_image_growth", "max_loss"):
        if d.get(key) is not None:
            opts.append(_opt(key.replace("_", "-"), d[key]))
    return " ".join(opts)


def expert_options_for_digest(ds) -> str:
    ex = ds["experts"]
    return repr((ds["source"], ds["input"], ds["resolution"], ds["model"], sorted(ex.items())))


def evaluate_options(wildcards) -> str:
    """The evaluation protocol of one architecture (a distilled set carries its own
    learning rate, augmentation and ZCA)."""
    ev = dataset_cfg(wildcards.dataset)["evaluate"]
    return " ".join(
        [
            _opt("arch", wildcards.arch),
            _opt("runs", ev["runs"]),
            _opt("epochs", ev["epochs"]),
            _opt("batch-size", ev["batch_size"]),
            _opt("seed", config["seed"]),
        ]
    )


def random_baseline_options(wildcards) -> str:
    """The random-real-images baseline: IPC, its learning rate, and the augmentation of
    the experts (the same protocol on real images)."""
    ds = dataset_cfg(wildcards.dataset)
    return " ".join(
        [
            _opt("ipc", int(wildcards.ipc)),
            _opt("lr-random", ds["evaluate"]["lr_random"]),
            _opt("dsa", ds["experts"]["dsa"]),
        ]
    )


def evaluation_files(wildcards) -> list[str]:
    """eval/<dataset>_ipc<ipc>/<method>_<arch>.csv for every configured architecture."""
    ev = dataset_cfg(wildcards.dataset)["evaluate"]
    distill_cfg(wildcards.dataset, wildcards.ipc)  # fail early for an unconfigured IPC
    methods = ["tesla"] + (["random"] if ev["random_baseline"] else [])
    base = f"eval/{wildcards.dataset}_ipc{wildcards.ipc}"
    return [f"{base}/{m}_{arch}.csv" for m in methods for arch in ev["architectures"]]


def full_data_experts(wildcards) -> list[str]:
    return expert_files(wildcards) if dataset_cfg(wildcards.dataset)["evaluate"]["full_data"] else []


def experts_option(wildcards, input) -> str:
    return ("--experts " + " ".join(input.experts)) if input.get("experts") else ""


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------
def result_dirs(names) -> list[str]:
    return [f"results/{name}_ipc{ipc}" for name in names for ipc in configured_ipcs(name)]


def default_targets() -> list[str]:
    dirs = result_dirs(config["default_datasets"])
    return [f"{d}/{f}" for d in dirs for f in ("acc.csv", "curves.png", "grid.png")]


# --------------------------------------------------------------------------------------
# run at parse time
# --------------------------------------------------------------------------------------
load_and_validate_config(config)
_put_tesla_on_path()

DEVICE = config["device"]


def _cuda_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes (a cheap check at parse
    time, without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


#: Training jobs (expert, distill, evaluate_*) ask for `gpu` = 1 when they will run on a
#: GPU, so that the global `--resources gpu=1` of the local profile runs one at a time on
#: it; on a CPU-only machine they ask for none and run side by side, one thread each,
#: as many as there are cores (tiny networks gain more from parallel jobs than from
#: threads). The SLURM profile sets gpu/cpus_per_task/threads per rule explicitly.
ON_GPU = DEVICE.startswith("cuda") or (DEVICE == "auto" and _cuda_visible())
TRAIN_GPU = 1 if ON_GPU else 0
TRAIN_THREADS = 4 if ON_GPU else 1

wildcard_constraints:
    dataset="|".join(sorted(map(re.escape, config["datasets"]), key=len, reverse=True)),
    ipc=r"[1-9][0-9]*",
    k=r"[0-9]+",
    arch=r"[A-Za-z0-9_-]+",
