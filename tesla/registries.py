"""The names a configuration may use, checked against the registries that define them, and
the method version of every stage.

Each name has one home: networks in :mod:`tesla.models`, augmentation families in
:mod:`tesla.dsa_strategy`, gradient engines in :mod:`tesla.engines`, normalisations in
:mod:`tesla.normalizations`, step-size conventions, label kinds and initialisations in
:mod:`tesla.distill_settings`, group modes in
:mod:`tesla.group_modes`, arithmetic in :mod:`tesla.numerics_options`, data sources in
:mod:`tesla.data.sources`. The workflow calls :func:`config_problems` while it builds the job
graph (the homes are declaration modules that do not import torch), so a misspelt name stops ``snakemake -n`` at once, naming the config key and the valid
names, instead of failing in a job hours later.

``METHOD_VERSIONS``: a stage's number goes up whenever the results of the same command line
change (a fix or a change of the method; not a refactor that leaves every output as it was).
The workflow passes it to every job as a parameter, so that Snakemake reruns the jobs whose
method changed and everything that follows them (``tests/test_method_versions.py`` keeps
this honest: it fails when a stage's code changes until its version or the recorded code
digest is updated).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from tesla.distill_settings import INITS, LR_IMG_CONVENTIONS, SOFT_LABELS, last_window_snapshot, soft_label_kind
from tesla.dsa_strategy import FAMILIES, parse_strategy
from tesla.engines import ENGINES
from tesla.errors import TeslaError
from tesla.group_modes import GROUP_MODES
from tesla.models import available_models, model_version, supports_resolution
from tesla.normalizations import NORMALIZATIONS, input_space_key
from tesla.numerics_options import PRECISIONS

__all__ = [
    "ENGINES",
    "FAMILIES",
    "GROUP_MODES",
    "INITS",
    "LR_IMG_CONVENTIONS",
    "METHOD_VERSIONS",
    "NORMALIZATIONS",
    "PRECISIONS",
    "SOFT_LABELS",
    "config_problems",
    "input_space_key",
    "last_snapshot_needed",
    "method_of",
    "non_finite_problems",
    "snapshot_shortfall",
    "soft_label_kind",
]

#: the method version of each stage: bumped when the same command line gives other results
METHOD_VERSIONS: dict[str, int] = {
    "prepare": 1,
    "zca": 1,
    # 2: with --keep-snapshots an expert stops after the last kept epoch (its final test
    # accuracy is measured there); TF32 on by default on GPUs that have it
    "experts": 2,
    # 2: IEEE float32 inside matching on GPUs (PyTorch's default had let cuDNN use TF32)
    "distill": 2,
    # 2: TF32 on by default for evaluation on GPUs that have it (matrix products too)
    "evaluate": 2,
    # 2: acc.csv v2 (test_epoch)
    "results": 2,
    "report": 1,
}

#: the alias of `tesla evaluate --arch` for the network a set was distilled with
DISTILL_ALIAS = "distill"


def method_of(stage: str, model: str) -> str:
    """`<stage> method vN`, and the network's own version where it is above 1
    (:func:`tesla.models.model_version`): a network whose construction changed reruns the
    jobs that train it (experts, evaluations of that architecture) and what follows, and
    only those."""
    tag = f"{stage} method v{METHOD_VERSIONS[stage]}"
    version = model_version(model)
    return tag if version == 1 else f"{tag}, {model} v{version}"


def _known(kind: str, names) -> str:
    return f"known {kind}: {', '.join(names)}"


def _network_problems(name: str, key: str, resolution: int | None, alias_ok: bool = False) -> list[str]:
    """A network name that the model registry does not know, or that cannot take the
    dataset's resolution."""
    if alias_ok and name == DISTILL_ALIAS:
        return []
    models = available_models()
    if name not in models:
        extra = [DISTILL_ALIAS] if alias_ok else []
        return [f"config key {key}: unknown network {name!r} ({_known('networks', [*models, *extra])})"]
    if resolution is not None and not supports_resolution(name, resolution):
        fits = [m for m in models if supports_resolution(m, resolution)]
        return [f"config key {key}: {name} cannot take {resolution}x{resolution} images (networks that can: {', '.join(fits)})"]
    return []


def _strategy_problems(strategy: str | None, key: str) -> list[str]:
    if strategy is None:
        return []
    try:
        parse_strategy(strategy)
    except TeslaError as exc:
        return [f"config key {key}: {exc}"]
    return []


def _choice_problems(value: Any, key: str, kind: str, names) -> list[str]:
    return [] if value in names else [f"config key {key}: unknown {kind} {value!r} ({_known(kind + 's', names)})"]


def last_snapshot_needed(row: Mapping[str, Any]) -> int:
    """The last expert snapshot a distill row of the config reads (what ``tesla distill``
    checks): the window's largest upper bound (``max_start_epoch``, or
    ``max_start_epoch_final`` when larger) + ``expert_epochs``, and the initialising snapshot
    ``init_epoch``. Absent keys take their defaults (a fixed window, no init_epoch)."""
    return max(last_window_snapshot(row), int(row.get("init_epoch") or 0))


def _snapshot_terms(row: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(the sum that sets :func:`last_snapshot_needed`, spelt with its keys; those keys)."""
    top = "max_start_epoch"
    if (row.get("max_start_epoch_final") or 0) > int(row["max_start_epoch"]):
        top = "max_start_epoch_final"
    window = int(row[top]) + int(row["expert_epochs"])
    if int(row.get("init_epoch") or 0) > window:
        return f"init_epoch {row['init_epoch']}", ["init_epoch"]
    return f"{top} {row[top]} + expert_epochs {row['expert_epochs']}", ["expert_epochs", top]


def snapshot_shortfall(row: Mapping[str, Any], key: str, experts_key: str, kept: int, experts: Mapping[str, Any]) -> str | None:
    """The problem of a distill row (config key ``key``) that reads expert snapshots beyond the
    ``kept`` ones of its experts (``experts_key``: their config key; ``experts``: their
    settings, ``epochs`` and ``keep_snapshots``), naming the keys that set both sides and the
    fixes; None when the snapshots suffice."""
    needed = last_snapshot_needed(row)
    if needed <= kept:
        return None
    terms, keys = _snapshot_terms(row)
    epochs, keep = int(experts["epochs"]), experts.get("keep_snapshots")
    if isinstance(keep, int) and not isinstance(keep, bool):
        limit = f"{experts_key}.keep_snapshots is {kept} (of {epochs} epochs trained, {experts_key}.epochs)"
        raise_ = f"{experts_key}.keep_snapshots" if needed <= epochs else f"{experts_key}.epochs and keep_snapshots"
    else:
        limit, raise_ = f"{experts_key}.epochs is {epochs}", f"{experts_key}.epochs"
    lower = " or ".join(f"{key}.{k}" for k in keys)
    target = f"{'their sum ' if len(keys) > 1 else ''}to at most {kept}"
    return (f"config key {key}: reads expert snapshots up to epoch {needed} ({terms}), but {limit}; "
            f"lower {lower} ({target}), or raise {raise_} to {needed}")


def non_finite_problems(value: Any, path: tuple = ()) -> list[str]:
    """'config key <a.b.c>: ...' for every NaN or infinite number anywhere in a loaded config.
    YAML reads ``.nan`` and ``.inf`` as floats, and a NaN compares False with every bound, so
    a JSON schema's minimum and maximum let it through: this walk refuses them by key."""
    if isinstance(value, float) and not math.isfinite(value):
        key = ".".join(str(p) for p in path) or "(top level)"
        return [f"config key {key}: {value} is not a finite number (YAML's .nan and .inf are refused); give a number"]
    if isinstance(value, Mapping):
        return [line for k, v in value.items() for line in non_finite_problems(v, (*path, k))]
    if isinstance(value, (list, tuple)):
        return [line for i, v in enumerate(value) for line in non_finite_problems(v, (*path, i))]
    return []


def config_problems(ds: Mapping[str, Any], where: str, resolution: int | None = None) -> list[str]:
    """'config key <where>.<key>: ...' for every name of a dataset entry that no registry
    knows: its network (and whether it takes ``resolution``), the evaluation architectures,
    augmentation strategies, engines, normalisations, step-size conventions, group modes and
    precisions."""
    problems = _network_problems(ds["model"], f"{where}.model", resolution)
    for i, arch in enumerate(ds["evaluate"]["architectures"]):
        problems += _network_problems(arch, f"{where}.evaluate.architectures[{i}]", resolution, alias_ok=True)
    problems += _strategy_problems(ds["experts"]["dsa"], f"{where}.experts.dsa")
    problems += _choice_problems(ds["normalize"], f"{where}.normalize", "normalisation", NORMALIZATIONS)
    for stage in ("experts", "evaluate"):
        problems += _choice_problems(ds[stage]["group_mode"], f"{where}.{stage}.group_mode", "group mode",
                                     ["auto", *GROUP_MODES])
        problems += _choice_problems(ds[stage]["precision"], f"{where}.{stage}.precision", "precision", PRECISIONS)
    for ipc, row in ds["distill"].items():
        key = f"{where}.distill.{ipc}"
        for engine in row["engine"]:
            problems += _choice_problems(engine, f"{key}.engine", "engine", ENGINES)
        if len(set(row["engine"])) != len(row["engine"]):
            problems.append(f"config key {key}.engine: an engine is named twice ({', '.join(row['engine'])})")
        problems += _strategy_problems(row["dsa"], f"{key}.dsa")
        if row.get("normalize") not in (None, ds["normalize"]):  # a row's own value (else the dataset's, checked above)
            problems += _choice_problems(row["normalize"], f"{key}.normalize", "normalisation", NORMALIZATIONS)
        problems += _choice_problems(row["lr_img_convention"], f"{key}.lr_img_convention", "convention", LR_IMG_CONVENTIONS)
        problems += _choice_problems(soft_label_kind(row["soft_labels"]), f"{key}.soft_labels", "label kind", SOFT_LABELS)
        problems += _choice_problems(row["init"], f"{key}.init", "initialisation", INITS)
    return problems
