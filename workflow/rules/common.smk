# Helpers shared by the rules: the config check, the file layout, the input functions and
# the command-line options each stage receives. Functions only: the rules are in the other
# rules/*.smk files, the wildcard constraints and the event handlers in the Snakefile.
#
# Rule parameters are the *command-line options* of a stage, built here as one string in a
# fixed order. Snakemake records them with every output it writes and reruns a job when
# they change (the default rerun triggers include `params`), so each rule gets exactly the
# settings that shape its result: a change reruns that job and everything downstream,
# nothing else. Options that do not change a result (device, checkpoint interval, guard
# limits) are functions of `output` or `resources`, which Snakemake does not compare. Every
# job below prepare also gets `upstream`, a digest of the settings of all jobs before it
# (see "upstream fingerprints" below), so that what follows a failed job reruns too.
#
# File layout (snakemake-workflows template): prepared inputs under resources/, everything
# a run makes under results/:
#
#   resources/<dataset>/{train,test}.h5, prepare_report.txt   tesla prepare
#   resources/<dataset>/zca_<normalisation>.h5                 tesla zca
#   results/<dataset>/experts/<input space>/expert_<k>.h5      tesla experts
#   results/<dataset>_ipc<N>/<engine>/synthetic.h5, metrics.csv, grids/, curves.png, grid.png
#   results/<dataset>_ipc<N>/eval/{<engine>,random}_<arch>.csv tesla evaluate
#   results/<dataset>_ipc<N>/acc.csv                           tesla results
#   results/logs/..., results/benchmarks/...                   every job's log and time/memory

import os
import re
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
CONFIG_FILE_HINT = "config/config.yaml (or a file given with --configfile)"

try:
    # Every name the config may use (data sources and their options, networks,
    # augmentation families, gradient engines, normalisations, step-size conventions) and
    # every stage's method version are declared once, in the package: the workflow asks it.
    from tesla import registries
    from tesla import distill_settings as distill_declared  # (distill_settings below is a fingerprint)
    from tesla import training_settings as training
    from tesla.zca_settings import ZcaSettings
    from tesla.settings import command_options
    from tesla import selection
    from tesla import sharding
    from tesla.devices import nvidia_gpu_visible
    from tesla.data.sources import workflow as data_sources
except ImportError as exc:
    raise WorkflowError(
        f"the tesla package is not importable by this Snakemake ({exc}); install it in the same "
        "environment (pip install -e '.[workflow]' from the project root, or conda env create -f "
        "workflow/envs/tesla.yaml)"
    ) from None

# The workflow's own Python (workflow/lib): the names of the rules it generates, what the
# profile sets, and the SLURM glue of the Snakefile's event handlers. The package knows none
# of it: only these modules read Snakemake's objects.
if str(Path(workflow.basedir) / "lib") not in sys.path:
    sys.path.insert(0, str(Path(workflow.basedir) / "lib"))
import rule_names
import slurm_glue
from profile_settings import profile_settings

#: what the profile sets (set-resources, set-threads), read once
PROFILE = profile_settings(workflow)


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
        if err.validator == "anyOf" and err.instance is not None:
            # the branch of the value's own type says what is wrong with it (a bound), not "any of the given schemas"
            bounds = [e.message for e in err.context if e.validator not in ("type", "const", "enum")]
            what = "; ".join(dict.fromkeys(bounds)) or what
        description = err.schema.get("description") or _referring_description(schema, err.absolute_schema_path)
        if description:
            what = f"{what} ({description})"
        lines.append(f"config key {_config_key(err.absolute_path)}: {what}")
    return lines


def _referring_description(schema, schema_path) -> str | None:
    """The description of the key whose value broke a shared definition: a key written
    `{description: ..., $ref: '#/$defs/positive_number'}` fails inside the definition, which has
    none of its own (the error's schema path passes through a `$ref` as if it were not there)."""
    node = schema
    for part in list(schema_path)[:-1]:
        while isinstance(node, dict) and part not in node and isinstance(node.get("$ref"), str):
            node = _schema_at(schema, node["$ref"])
        node = node[part]
    return node.get("description") if isinstance(node, dict) else None


def _schema_at(schema, ref: str):
    """The part of ``schema`` a local `$ref` ('#/$defs/name') names."""
    for step in ref.removeprefix("#/").split("/"):
        schema = schema[step]
    return schema


def _normalise_config(cfg) -> None:
    """YAML reads `distill: {1: ...}` with integer keys (JSON schema needs strings), and an
    `engine` may be one name or a list of names."""
    for ds in (cfg.get("datasets") or {}).values():
        if isinstance(ds, dict) and isinstance(ds.get("distill"), dict):
            ds["distill"] = {str(k): v for k, v in ds["distill"].items()}
            for row in ds["distill"].values():
                if isinstance(row, dict) and isinstance(row.get("engine"), str):
                    row["engine"] = [row["engine"]]


def _fill_row_defaults(cfg) -> None:
    """A distill row's input space defaults to its dataset's (`normalize`, `zca`)."""
    for ds in cfg["datasets"].values():
        for row in ds["distill"].values():
            for key in ("normalize", "zca"):
                if row.get(key) is None:
                    row[key] = ds[key]


def _cross_checks(cfg) -> list[str]:
    """Rules the schema cannot express: references between keys, and names that only the
    package's registries know (checked here, before any job, naming the key)."""
    problems = []
    names = set(cfg["datasets"])
    for name in cfg["default_datasets"]:
        if name not in names:
            problems.append(
                f"config key default_datasets: '{name}' is not a configured dataset "
                f"(configured: {', '.join(sorted(names))})"
            )
    for name, ds in cfg["datasets"].items():
        where = f"datasets.{name}"
        problems += data_sources.unused_keys(ds, where)
        problems += selection.config_problems(ds, where)
        named = registries.config_problems(ds, where, data_sources.resolution_of(ds))
        if named:  # the checks below need valid names
            problems += named
            continue
        ex = ds["experts"]
        for space, rows in spaces_of(ds).items():
            kept = snapshots_kept(ds, space)
            for ipc, row in rows:
                short = registries.snapshot_shortfall(row, f"{where}.distill.{ipc}", f"{where}.experts", kept, ex)
                problems += [short] if short else []
        classes = data_sources.class_count(ds)
        for ipc, row in ds["distill"].items():
            key = f"{where}.distill.{ipc}"
            images = int(ipc) * (classes or 0)
            if classes and row["batch_syn"] is not None and row["batch_syn"] > images:
                problems.append(f"config key {key}.batch_syn: {row['batch_syn']} is more than the synthetic set ({ipc} x "
                                f"{classes} classes = {images} images); lower it to at most {images}, or null (all images)")
            problems += [f"config key {key}: {p}" for p in distill_declared.window_problems(row, str)]
            problems += sharding.row_problems(row, key, images or None, ds["model"], f"{where}.model")
            if row["init_expert"] >= ex["count"]:
                problems.append(f"config key {key}.init_expert: {row['init_expert']} is not an expert of the pool "
                                f"(experts 0..{ex['count'] - 1}, {where}.experts.count)")
        if isinstance(ex["keep_snapshots"], int) and ex["keep_snapshots"] > ex["epochs"]:
            problems.append(
                f"config key {where}.experts.keep_snapshots: {ex['keep_snapshots']} is more than the "
                f"{ex['epochs']} epochs trained ({where}.experts.epochs)"
            )
    return problems


def load_and_validate_config(cfg) -> None:
    """Validate `config` against workflow/schemas/config.schema.yaml (filling defaults),
    then the cross-key and registry checks. Fails before any job with every problem listed
    as `config key a.b.c: problem`."""
    _normalise_config(cfg)
    problems = registries.non_finite_problems(cfg)  # a NaN passes every bound of the schema
    try:
        validate(cfg, str(SCHEMA))
    except WorkflowError:
        problems += _schema_errors(cfg) or ["(see the schema)"]
    if problems:
        raise WorkflowError(
            f"invalid configuration in {CONFIG_FILE_HINT}; the schema is {SCHEMA}:\n  "
            + "\n  ".join(problems)
        ) from None
    _fill_row_defaults(cfg)
    problems = _cross_checks(cfg)
    if problems:
        raise WorkflowError(f"invalid configuration in {CONFIG_FILE_HINT}:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------
# the `tesla` command
# --------------------------------------------------------------------------------------
def put_tesla_on_path() -> None:
    """Rules call `tesla`. When snakemake runs from a virtual environment that was not
    activated (`.venv/bin/snakemake ...`), that environment's bin folder is not on PATH:
    add it, so the jobs use the tesla installed beside this snakemake."""
    if shutil.which("tesla"):
        return
    here = Path(sys.executable).parent
    if (here / "tesla").exists():
        os.environ.update(PATH=os.pathsep.join([str(here), os.environ.get("PATH", "")]))


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


def row_space(ds: dict, row: dict) -> str:
    """The input-space key of a distill row (its normalisation, and ZCA with the dataset's
    eps when on): the name of its experts' folder. Rows of one space share experts."""
    return registries.input_space_key(row["normalize"], ds["zca_eps"] if row["zca"] else None)


def spaces_of(ds: dict) -> dict[str, list[tuple[str, dict]]]:
    """{input-space key: [(ipc, row), ...]}: which rows each expert pool serves."""
    spaces = {}
    for ipc, row in ds["distill"].items():
        spaces.setdefault(row_space(ds, row), []).append((ipc, row))
    return spaces


def space_of_key(dataset: str, space: str) -> dict:
    """The first row of `dataset` whose input space is `space` (its normalize and zca)."""
    rows = spaces_of(dataset_cfg(dataset)).get(space)
    if not rows:
        raise WorkflowError(
            f"no distill row of dataset '{dataset}' uses the input space '{space}' "
            f"(used: {', '.join(spaces_of(dataset_cfg(dataset)))})"
        )
    return rows[0][1]


def snapshots_kept(ds: dict, space: str) -> int:
    """Snapshots theta*_0..theta*_K kept (and, unless experts.train_to_end, trained) for the
    experts of one input space: `keep_snapshots`, or with `auto` the largest
    max_start_epoch + expert_epochs of the rows that use these experts, or all epochs."""
    ex = ds["experts"]
    if ex["keep_snapshots"] == "auto":
        return min(ex["epochs"], max(registries.last_snapshot_needed(r) for _, r in spaces_of(ds)[space]))
    return ex["epochs"] if ex["keep_snapshots"] is None else ex["keep_snapshots"]


def row_engines(dataset: str, ipc) -> list[str]:
    return list(distill_cfg(dataset, ipc)["engine"])


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def split_file(dataset: str, split: str) -> str:
    return f"resources/{dataset}/{split}.h5"


def zca_file(dataset: str, normalize: str) -> str:
    return f"resources/{dataset}/zca_{normalize}.h5"


def expert_paths(dataset: str, space: str) -> list[str]:
    n = dataset_cfg(dataset)["experts"]["count"]
    return [f"results/{dataset}/experts/{space}/expert_{k}.h5" for k in range(n)]


def row_experts(wildcards) -> list[str]:
    """The expert pool of one (dataset, IPC): that of the row's input space."""
    ds = dataset_cfg(wildcards.dataset)
    return expert_paths(wildcards.dataset, row_space(ds, distill_cfg(wildcards.dataset, wildcards.ipc)))


def row_zca(wildcards) -> list[str]:
    """The ZCA file of a row's input space, or nothing."""
    row = distill_cfg(wildcards.dataset, wildcards.ipc)
    return [zca_file(wildcards.dataset, row["normalize"])] if row["zca"] else []


def space_zca(wildcards) -> list[str]:
    """The ZCA file of an expert pool's input space, or nothing."""
    row = space_of_key(wildcards.dataset, wildcards.space)
    return [zca_file(wildcards.dataset, row["normalize"])] if row["zca"] else []


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
    """Input function of the prepare rule: fail at DAG-building time when the raw data of a
    *requested* dataset is missing, unless its prepared splits already exist."""
    name = wildcards.dataset
    if all(Path(split_file(name, split)).exists() for split in ("train", "test")):
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
def method(stage: str) -> str:
    """`<stage> method vN`: a param of every rule, so a new method version of a stage (its
    results change: tesla.registries.METHOD_VERSIONS) reruns its jobs and what follows."""
    return f"{stage} method v{registries.METHOD_VERSIONS[stage]}"


def expert_method(wildcards) -> str:
    """The experts' method version, with their network's (tesla.models.model_version)."""
    return registries.method_of("experts", dataset_cfg(wildcards.dataset)["model"])


def evaluate_method(wildcards) -> str:
    """The evaluation's method version, with the evaluated network's."""
    arch = wildcards.arch
    model = dataset_cfg(wildcards.dataset)["model"] if arch == registries.DISTILL_ALIAS else arch
    return registries.method_of("evaluate", model)


def prepare_options(wildcards) -> str:
    """`tesla prepare` options of a dataset entry, generated from the data sources' declarations
    (defaults left implicit as before, so existing datasets are not re-prepared)."""
    return data_sources.prepare_command(dataset_cfg(wildcards.dataset), wildcards.dataset, _resolve)


def zca_options(wildcards) -> str:
    """`tesla zca` options of one ZCA file, generated from tesla.zca_settings.ZcaSettings: the
    normalisation it is fitted after (the file's wildcard) and the dataset's `zca_eps`, both
    written even at their defaults, as earlier workflows did (no ZCA fit reruns)."""
    given = {"normalize": wildcards.normalize}
    return " ".join(command_options(ZcaSettings, dataset_cfg(wildcards.dataset), result=True, given=given))


#: the order of the options earlier workflows wrote (generated strings equal theirs: no job reruns)
EXPERT_ORDER = ("model", "epochs", "lr", "batch_size", "dsa", "dtype", "precision", "tf32", "channels_last",
                "normalize", "keep_snapshots", "train_to_end")
EVALUATE_ORDER = ("arch", "runs", "epochs", "batch_size", "seed")
EVALUATE_RUN_ORDER = ("group_mode", "checkpoint", "checkpoint_every")
RANDOM_BASELINE_ORDER = ("ipc", "lr_random", "dsa", "normalize")


def expert_options(wildcards) -> str:
    """Everything that shapes the expert trajectories of one input space, the same for every
    expert, from the `experts:` block (tesla.training_settings.ExpertsCommand: the numerics
    only when not their defaults, so that jobs run before these keys existed are not rerun);
    the seed and the grouping are run options: regrouping finished experts with
    experts.per_job reruns none of them."""
    ds = dataset_cfg(wildcards.dataset)
    ex = ds["experts"]
    row = space_of_key(wildcards.dataset, wildcards.space)
    kept = snapshots_kept(ds, wildcards.space)
    given = {
        "model": ds["model"],
        # with ZCA the ZCA file fixes the normalisation; without, 'split' is the command's own
        "normalize": None if row["zca"] or row["normalize"] == "split" else row["normalize"],
        "keep_snapshots": kept if kept != ex["epochs"] else None,
        "train_to_end": kept != ex["epochs"] and ex["train_to_end"],
    }
    return " ".join(command_options(training.ExpertsCommand, ex, result=True, order=EXPERT_ORDER, given=given))


def expert_run_options(wildcards, output) -> str:
    """The seeds of the job's experts (config seed + k of each results/<dataset>/experts/
    <space>/expert_k.h5) and the group mode unless auto (how the experts of one job train
    together, equal to alone within float32 round-off): functions of `output` (read from the
    paths, so the generated group rules, which have no wildcards, use it as it is), so that
    regrouping experts reruns nothing."""
    ks = [int(re.fullmatch(r"expert_([0-9]+)\.h5", Path(f).name).group(1)) for f in output]
    dataset = Path(output[0]).parts[1]
    opts = ["--seed " + " ".join(str(config["seed"] + k) for k in ks)]
    opts += command_options(training.ExpertsCommand, dataset_cfg(dataset)["experts"], result=False)
    return " ".join(opts + tracking_options("experts", output))


def expert_groups() -> list[tuple[str, str, list[int]]]:
    """(dataset, input space, expert numbers) of every job of several experts: the experts of
    each pool taken `experts.per_job` at a time, in order (the last group may be smaller)."""
    groups = []
    for name, ds in config["datasets"].items():
        per_job = ds["experts"]["per_job"]
        if per_job == 1:
            continue
        for space in spaces_of(ds):
            ks = list(range(ds["experts"]["count"]))
            groups += [(name, space, ks[i : i + per_job]) for i in range(0, len(ks), per_job)]
    return groups


def single_expert_datasets() -> list[str]:
    """The datasets whose experts train one per job (the `expert` rule's); the others have
    one generated rule per group (rules/experts.smk)."""
    return [name for name, ds in config["datasets"].items() if ds["experts"]["per_job"] == 1]


def stand_in_resources(rule: str, declared: dict) -> dict:
    """The resources of a rule that the profile does not name (generated rules, the rules of
    select: validation rows): ``declared``, those written in the rule it stands in for, with
    the profile's set-resources of that one (set-resources applies by name only;
    rule_names.profile_rule says which)."""
    return {**declared, **PROFILE.resources(rule_names.profile_rule(rule))}


def stand_in_threads(rule: str, declared: int):
    """The threads of such a rule: the profile's set-threads of the rule it stands in for, else ``declared``."""
    return PROFILE.threads(rule_names.profile_rule(rule), declared)


def group_resources(per_job: int) -> dict:
    """The resources of a job of `per_job` experts: those of the `expert` rule (its
    set-resources in the profile: partition, GPU, memory), its runtime x per_job."""
    merged = stand_in_resources("expert", {**EXPERT_RESOURCES, "gpu": TRAIN_GPU})
    runtime = merged["runtime"]
    return {**merged, "runtime": runtime * per_job if isinstance(runtime, int) else runtime}


def distill_options(wildcards) -> str:
    """The settings of one (dataset, IPC, engine) distillation that change its result, and
    nothing else: the row's, as tesla.distill_settings declares them (which are written at
    their default, which only in some cases), with the IPC, the engine and the seed."""
    row = distill_cfg(wildcards.dataset, wildcards.ipc)
    given = dict(ipc=int(wildcards.ipc), engine=wildcards.engine, seed=config["seed"])
    return distill_declared.workflow_options(row, result=True, **given)


def job_device(wildcards, resources) -> str:
    """The device a training job runs on (config `device`). Where a job runs does not
    change what it computes, so, as a function of the job's `resources`, Snakemake does
    not count it among the settings whose change triggers a rerun."""
    return config["device"]


def distill_run_options(wildcards, output) -> str:
    """What does not change a distillation's result (functions of `output`, so not a rerun
    trigger): where its checkpoint lives (a folder: `tesla distill` names the checkpoint by
    everything the result depends on, its settings and its inputs' fingerprints, so a job
    killed half-way resumes when rerun unchanged and starts afresh otherwise; it removes
    the checkpoint when it succeeds), how often to write it, the divergence guard's limits
    (left out when null: tesla's defaults) and the wording of its advice (config keys
    under datasets.<dataset>.distill.<ipc>). After a stop, raising a limit resumes."""
    row = distill_cfg(wildcards.dataset, wildcards.ipc)
    given = dict(checkpoint_dir=Path(output.synthetic).parent,
                 config_key_prefix=f"datasets.{wildcards.dataset}.distill.{int(wildcards.ipc)}")
    return " ".join([distill_declared.workflow_options(row, result=False, **given), *tracking_options("distill", output)])


def evaluate_options(wildcards) -> str:
    """The evaluation protocol of one architecture, from the `evaluate:` block
    (tesla.training_settings.EvaluateCommand; a distilled set carries its own learning rate,
    augmentation and input space)."""
    ev = dataset_cfg(wildcards.dataset)["evaluate"]
    runs = distill_cfg(wildcards.dataset, wildcards.ipc)["eval_runs"] or ev["runs"]
    given = {"arch": wildcards.arch, "runs": runs, "seed": config["seed"]}
    return " ".join(command_options(training.EvaluateCommand, ev, result=True, order=EVALUATE_ORDER, given=given))


def evaluate_run_options(wildcards, output) -> str:
    """What does not change an evaluation's result (functions of `output`, so not a rerun
    trigger): how the job's runs train together (the group mode unless auto: equal to alone
    within float32 round-off), and where (`<output>.ckpt`) and how often (config
    `evaluate.checkpoint_every`, seconds) it saves the state of their training. The checkpoint
    is not an output: Snakemake deletes the outputs of a failed job, but the checkpoint must
    survive a kill or a time limit so that the rerun resumes from it. `tesla evaluate` resumes
    it only when it was saved by the same settings on the same inputs (it starts afresh
    otherwise) and removes it once the output is written."""
    ev = dataset_cfg(wildcards.dataset)["evaluate"]
    opts = command_options(training.EvaluateCommand, ev, result=False, order=EVALUATE_RUN_ORDER,
                           given={"checkpoint": f"{output[0]}.ckpt"})
    return " ".join(opts + tracking_options("evaluate", output))


def random_baseline_options(wildcards) -> str:
    """The random-real-images baseline (tesla.training_settings.BaselineSubject): IPC, its
    learning rate (`evaluate.lr_random`), the augmentation of the experts and their input
    space (the same protocol on the inputs the experts saw)."""
    ds = dataset_cfg(wildcards.dataset)
    row = distill_cfg(wildcards.dataset, wildcards.ipc)
    given = {
        "ipc": int(wildcards.ipc),
        "dsa": ds["experts"]["dsa"],
        "normalize": row["normalize"] if row["normalize"] != "split" or row["zca"] else None,
    }
    return " ".join(command_options(training.BaselineSubject, ds["evaluate"], result=True,
                                    order=RANDOM_BASELINE_ORDER, given=given))


def evaluation_files(wildcards) -> list[str]:
    """results/<dataset>_ipc<ipc>/eval/<method>_<arch>.csv: every engine's set and the
    random baseline, on every configured architecture."""
    ev = dataset_cfg(wildcards.dataset)["evaluate"]
    methods = row_engines(wildcards.dataset, wildcards.ipc) + (["random"] if ev["random_baseline"] else [])
    base = f"results/{wildcards.dataset}_ipc{wildcards.ipc}/eval"
    return [f"{base}/{m}_{arch}.csv" for m in methods for arch in ev["architectures"]]


def full_data_experts(wildcards) -> list[str]:
    return row_experts(wildcards) if dataset_cfg(wildcards.dataset)["evaluate"]["full_data"] else []


def experts_option(wildcards, input) -> str:
    return ("--experts " + " ".join(input.experts)) if input.get("experts") else ""


# --------------------------------------------------------------------------------------
# upstream fingerprints: the settings of everything before a job (the `upstream` param)
# --------------------------------------------------------------------------------------
# A job's own params hold only its own settings. After a config change, a job that fails (a
# guard stop, a kill, a cancelled cluster job) leaves its output missing, and Snakemake does
# not rerun a job whose output exists only because an input is missing (that is how temp()
# files work): the old evaluations and acc.csv would stay, made from the old settings. So
# every job below prepare also gets `upstream`, a digest of the settings of every job it
# depends on, directly or not (prepare -> zca -> experts -> distill -> evaluate -> results,
# report): a changed setting changes the fingerprint of everything downstream, which then
# reruns even while the changed job's own output is missing. The digests are built from the
# same option strings as the params, so what is not a rerun trigger (device, seeds of the
# experts, grouping, checkpoint interval, guard limits) is not in them either.
def _fingerprint(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def upstream_param(*settings: str) -> str:
    """The `upstream` param of a job from the settings digests of the jobs it reads."""
    return f"upstream {_fingerprint(*settings)}"


def prepare_settings(dataset: str) -> str:
    w = Namespace(dataset=dataset)
    return _fingerprint(prepare_options(w), method("prepare"))


def zca_settings(dataset: str, normalize: str) -> str:
    w = Namespace(dataset=dataset, normalize=normalize)
    return _fingerprint(zca_options(w), method("zca"), prepare_settings(dataset))


def space_settings(dataset: str, row: dict) -> list[str]:
    """The settings behind the inputs of an input space: the data, and its ZCA when on."""
    return [prepare_settings(dataset)] + ([zca_settings(dataset, row["normalize"])] if row["zca"] else [])


def experts_settings(dataset: str, space: str) -> str:
    """Every expert of one input space has the same settings (its seed is a run option)."""
    w = Namespace(dataset=dataset, space=space)
    return _fingerprint(expert_options(w), expert_method(w), *space_settings(dataset, space_of_key(dataset, space)))


def distill_settings(dataset: str, ipc, engine: str) -> str:
    w = Namespace(dataset=dataset, ipc=ipc, engine=engine)
    row = distill_cfg(dataset, ipc)
    experts = experts_settings(dataset, row_space(dataset_cfg(dataset), row))
    kept = [f"{keep_options(w)} {select_options(w)}"] if row["select"] == "validation" else []
    return _fingerprint(distill_options(w), method("distill"), experts, *space_settings(dataset, row), *kept)


def evaluation_settings(dataset: str, ipc, method_name: str, arch: str) -> str:
    """One evaluation: of an engine's distilled set, or of the random baseline."""
    w = Namespace(dataset=dataset, ipc=ipc, arch=arch)
    if method_name == "random":
        row = distill_cfg(dataset, ipc)
        inputs = [random_baseline_options(w), *space_settings(dataset, row)]
    else:
        inputs = [distill_settings(dataset, ipc, method_name), prepare_settings(dataset)]
    return _fingerprint(evaluate_options(w), evaluate_method(w), *inputs)


def zca_upstream(wildcards) -> str:
    return upstream_param(prepare_settings(wildcards.dataset))


def experts_upstream(wildcards) -> str:
    row = space_of_key(wildcards.dataset, wildcards.space)
    return upstream_param(*space_settings(wildcards.dataset, row))


def distill_upstream(wildcards) -> str:
    row = distill_cfg(wildcards.dataset, wildcards.ipc)
    experts = experts_settings(wildcards.dataset, row_space(dataset_cfg(wildcards.dataset), row))
    return upstream_param(experts, *space_settings(wildcards.dataset, row))


def evaluate_synthetic_upstream(wildcards) -> str:
    distilled = distill_settings(wildcards.dataset, wildcards.ipc, wildcards.engine)
    return upstream_param(distilled, prepare_settings(wildcards.dataset))


def evaluate_random_upstream(wildcards) -> str:
    return upstream_param(*space_settings(wildcards.dataset, distill_cfg(wildcards.dataset, wildcards.ipc)))


def results_upstream(wildcards) -> str:
    """Every evaluation of the table (its own settings and all before them), and the expert
    pool of the 'full' row when there is one."""
    ds, ipc = wildcards.dataset, wildcards.ipc
    ev = dataset_cfg(ds)["evaluate"]
    methods = row_engines(ds, ipc) + (["random"] if ev["random_baseline"] else [])
    parts = [evaluation_settings(ds, ipc, m, arch) for m in methods for arch in ev["architectures"]]
    if ev["full_data"]:
        parts.append(experts_settings(ds, row_space(dataset_cfg(ds), distill_cfg(ds, ipc))))
    return upstream_param(*parts)


def report_upstream(wildcards) -> str:
    return upstream_param(distill_settings(wildcards.dataset, wildcards.ipc, wildcards.engine))


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------
def result_files(name: str, ipc: int) -> list[str]:
    """acc.csv and every engine's curves and image grid of one (dataset, IPC)."""
    base = f"results/{name}_ipc{ipc}"
    plots = [f"{base}/{engine}/{f}" for engine in row_engines(name, ipc) for f in ("curves.png", "grid.png")]
    return [f"{base}/acc.csv", *plots]


def default_targets() -> list[str]:
    return [f for name in config["default_datasets"] for ipc in configured_ipcs(name) for f in result_files(name, ipc)]


# --------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------
def training_resources() -> tuple[int, int]:
    """(gpu, threads) of the training jobs (expert, distill, evaluate_*). They ask for
    `gpu` = 1 when they will run on a GPU, so that the local profile's `--resources gpu=1`
    runs one at a time on it; on a CPU-only machine they ask for none and run side by side,
    one thread each, as many as there are cores (tiny networks gain more from parallel jobs
    than from threads). The SLURM profile sets gpu/cpus_per_task/threads per rule."""
    device = config["device"]
    on_gpu = device.startswith("cuda") or (device == "auto" and nvidia_gpu_visible())
    return (1, 4) if on_gpu else (0, 1)


def wildcard_patterns() -> dict[str, str]:
    """The wildcard constraints: configured dataset names, registered engines, the known
    normalisations, input-space keys as tesla.registries.input_space_key writes them."""
    datasets = sorted(map(re.escape, config["datasets"]), key=len, reverse=True)
    return {
        "dataset": "|".join(datasets),
        "ipc": r"[1-9][0-9]*",
        "k": r"[0-9]+",
        "arch": r"[A-Za-z0-9_-]+",
        "engine": "|".join(registries.ENGINES),
        "normalize": "|".join(registries.NORMALIZATIONS),
        "space": r"[A-Za-z0-9_.+-]+",
    }


# --------------------------------------------------------------------------------------
# run at parse time
# --------------------------------------------------------------------------------------
load_and_validate_config(config)
put_tesla_on_path()
TRAIN_GPU, TRAIN_THREADS = training_resources()
#: what one expert job asks for unless the profile says otherwise (a group of P: runtime x P)
EXPERT_RESOURCES = {"mem_mb": 16000, "runtime": 12 * 60}
